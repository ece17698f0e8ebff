"""The fleet report in a real browser: Debian's headless Chromium, driven by selenium through chromedriver,
opens the file from disk with the network switched off. Without Chromium the module is skipped, except under CI
(tests/conftest.py needs_tool), where it fails the run: .ci/run installs it."""
import json
import shutil
import struct
import zlib
from datetime import datetime, timedelta, timezone

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from chalicelib.adapters.registry.sqlite import SqliteRegistry
from tests.conftest import LONDON_IP, SYDNEY_IP, TOKYO_IP, needs_tool
from tests.test_report import provision_from

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = needs_tool(shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), "chromium or chromium-driver")


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every Network.* event, for the checks
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        yield driver
    finally:
        driver.quit()


def requests_made(driver) -> list[str]:
    """URLs of every request the page started since the last call (Chromium's DevTools Network events)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_the_request_check_sees_a_page_that_loads_something(browser, tmp_path):
    """The check below can fail: a page with one remote image is caught, though the network is off."""
    page = tmp_path / "control.html"
    page.write_text('<!doctype html><img src="http://report-check.invalid/x.png"><p>control</p>')
    requests_made(browser)  # forget the browser's own start-up pages
    browser.get(page.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert [url for url in requests_made(browser) if url != page.as_uri()] == ["http://report-check.invalid/x.png"]


def _hover_point(driver, element) -> tuple[float, float]:
    """A point of `element` that the pointer would really reach (not under a line or a marker)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    found = driver.execute_script("""
        const el = arguments[0], box = el.getBoundingClientRect();
        for (let i = 1; i < 20; i++) for (let j = 1; j < 20; j++) {
            const x = Math.round(box.left + box.width * i / 20), y = Math.round(box.top + box.height * j / 20);
            if (document.elementFromPoint(x, y) === el) return [x, y];
        }
        return null;""", element)
    assert found, "no visible point on the element"
    return found


def _hover(driver, element) -> str:
    x, y = _hover_point(driver, element)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(x), int(y))  # a real pointer move, in viewport pixels
    actions.perform()
    tip = driver.find_element(By.ID, "tip")
    WebDriverWait(driver, 5).until(lambda d: tip.is_displayed())
    return tip.text


def _png_looks_like_a_page(data: bytes) -> bool:
    """Loosely: a real PNG of the window's size with many different pixel values (not blank)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat, at = b"", 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            idat += data[at + 8:at + 8 + length]
        at += 12 + length
    pixels = zlib.decompress(idat)
    return width >= 1000 and height >= 800 and len(set(pixels[::7])) > 60


def test_the_report_opens_offline_shows_the_fleet_and_answers_a_hover(stage, tmp_path, browser):
    provision_from(stage, [("mydevice1", LONDON_IP), ("mydevice2", TOKYO_IP), ("mydevice3", SYDNEY_IP),
                           ("mydevice4", LONDON_IP)])
    SqliteRegistry(stage.state_dir / "registry.sqlite3").claim(  # a claim whose process died
        "mydevice5", datetime.now(timezone.utc) - timedelta(hours=1), lease_seconds=60)
    page = tmp_path / "report.html"
    assert stage.admin("report", "--html", str(page), "--audit") == 0

    requests_made(browser)  # forget the browser's own start-up pages
    browser.get(page.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert [url for url in requests_made(browser) if url != page.as_uri()] == []
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0

    # One marker per region with devices, sized by them; the other enabled regions are idle rings.
    used = {m.get_attribute("data-region"): int(m.get_attribute("data-count"))
            for m in browser.find_elements(By.CSS_SELECTOR, "#map circle.region.used")}
    assert used == {"eu-west-2": 2, "ap-northeast-1": 1, "ap-southeast-2": 1}
    radius = {m.get_attribute("data-region"): float(m.get_attribute("r"))
              for m in browser.find_elements(By.CSS_SELECTOR, "#map circle.region.used")}
    assert radius["eu-west-2"] > radius["ap-northeast-1"] == radius["ap-southeast-2"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map circle.region.idle")) == 11 - 3

    # A shaded shape for each country with devices, and its fill is not the unshaded countries' grey.
    grey = browser.execute_script(
        "return getComputedStyle(document.querySelector('#map path.country:not(.shaded)')).fill")
    shaded = browser.find_elements(By.CSS_SELECTOR, "#map path.country.shaded")
    assert {s.get_attribute("data-code"): s.get_attribute("data-count") for s in shaded} == \
        {"GB": "2", "JP": "1", "AU": "1"}
    for shape in shaded:
        assert shape.value_of_css_property("fill") != grey
    # Lines from each country to its region, coloured by the reason (here: nearest).
    flows = browser.find_elements(By.CSS_SELECTOR, "#map path.flow")
    assert sorted(f.get_attribute("data-reason") for f in flows) == ["nearest"] * 3

    # Hovering shows the numbers.
    marker = browser.find_element(By.CSS_SELECTOR, '#map circle[data-region="eu-west-2"]')
    text = _hover(browser, marker)
    assert "eu-west-2" in text and "2 provisioned devices" in text and "GB 2" in text
    text = _hover(browser, browser.find_element(By.CSS_SELECTOR, '#map path.country[data-code="AU"]'))
    assert "Australia (AU)" in text and "1 device" in text and "ap-southeast-2: 1" in text

    # The rest of the page: the stuck claim found by --audit.
    audit = browser.find_element(By.XPATH, "//section[h2[contains(., 'Stuck claims')]]").text
    assert "stuck claim" in audit and "mydevice5" in audit

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert len(data) > 30_000 and _png_looks_like_a_page(data)
    assert [url for url in requests_made(browser) if url != page.as_uri()] == []
