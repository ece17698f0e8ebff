"""The documentation holds together: docs/performance.md is what the committed bench JSON makes (bench/docs.py), a quick
bench run never writes the committed JSON, and every relative link of the README and docs/*.md resolves, anchors
included. (The pages' commands are run by tests/test_readme.py.)"""
import copy
import re
from pathlib import Path

from bench import docs, provenance
from chalicelib.config import PROJECT_DIR

PAGES = [PROJECT_DIR / "README.md", PROJECT_DIR / "CHANGELOG.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]


def test_the_performance_page_is_what_the_committed_json_makes():
    page = docs.PAGE.read_text()
    assert docs.render(page, docs.load()) == page, "docs/performance.md is stale: run python -m bench.docs"


def test_the_page_follows_the_json_and_says_how_each_run_was_made():
    sources = docs.load()
    for name, data in sources.items():
        assert data["run"]["command"].startswith(f"python -m bench.{'run' if name == 'bench' else name} "), name
    changed = copy.deepcopy(sources)
    changed["bench"]["aws"]["bundled"]["speedup"] = 1.75  # a run that missed its target
    changed["storm"]["with_admission"]["gave_up"] = 3
    page = docs.PAGE.read_text()
    text = docs.render(page, changed)
    assert "AWS path, bundled geolocation, measured at least 2.8x faster than the original sample: **missed** (1.75x" \
        in text
    assert "with admission control, no device gave up: **missed** (3)" in text
    assert text.replace("1.75", "").replace("**missed** (3)", "") != page  # and only the blocks changed
    assert text.split("<!-- generated: bench")[0] == page.split("<!-- generated: bench")[0]


def test_only_a_full_bench_writes_the_committed_json():
    assert provenance.bench_out("full") == provenance.BENCH_JSON
    assert {provenance.bench_out(size) for size in ("quick", "tiny")} == {provenance.SCRATCH_JSON}
    makefile = (PROJECT_DIR / "Makefile").read_text()
    assert re.search(r"^bench:.*\n\t\$\(PY\) -m bench\.run --size full$", makefile, re.M)
    assert re.search(r"^bench-quick:.*\n\t\$\(PY\) -m bench\.run --size quick$", makefile, re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", without_fences(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", without_fences(text))


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []
    readme = (PROJECT_DIR / "README.md").read_text()
    assert len(set(re.findall(r"\]\(docs/([a-z-]+\.md)", readme))) >= 6  # the map reaches the pages
