"""make storm at a tiny size: the harness runs both storms and reports what the README's table is made of.

No timing is asserted (this machine is shared); what must hold at any size is structural: with admission
control no device gives up and the audit finds nothing, and the report has its shape.
"""
import json
import subprocess
import sys

from chalicelib.config import PROJECT_DIR

KEYS = {"devices", "makespan_s", "quota_bound_s", "throttled_calls", "iot_calls", "gave_up", "orphans", "p50_s",
        "p99_s"}


def test_tiny_storm_with_and_without_admission(tmp_path):
    out, chart = tmp_path / "storm.json", tmp_path / "storm.png"
    done = subprocess.run([sys.executable, str(PROJECT_DIR / "bench" / "storm.py"), "--size", "tiny",
                           "--out", str(out), "--chart", str(chart)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    with_admission, without = report["with_admission"], report["without_admission"]
    assert KEYS <= set(with_admission) and KEYS <= set(without)
    assert with_admission["devices"] == without["devices"] == report["parameters"]["devices"]
    # with admission control every device is provisioned, none gives up, and nothing is left behind
    assert with_admission["gave_up"] == 0 and with_admission["unprovisioned"] == 0
    assert with_admission["orphans"] == 0 and with_admission["audit_clean"] is True
    assert with_admission["makespan_s"] is not None and with_admission["p50_s"] <= with_admission["p99_s"]
    # the layer really counted the calls it throttled, and never more than it saw
    assert with_admission["iot_calls"] >= 4 * with_admission["devices"]
    assert 0 <= with_admission["throttled_calls"] <= with_admission["iot_calls"]
    assert sum(with_admission["throttled_by_operation"].values()) == with_admission["throttled_calls"]
    # the deployment step recorded every region's endpoint and nobody reads the policy: no container of either
    # storm spends those small quotas
    for storm in (with_admission, without):
        assert storm["calls_by_operation"].get("DescribeEndpoint", 0) == storm["calls_by_operation"].get("GetPolicy", 0) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| makespan |" in done.stdout
