"""make chaos at a tiny size: real `make local`, real `kill -9` of its process group during bursts of provisioning,
then every device retries with its own key. No timing is asserted; what must hold at any size is the outcome:
every device provisioned with the certificate its registry row names, no orphan, no device with two active
certificates, `admin audit` clean without --fix, and a damaged registry answered (503, one CLI line)."""
import json
import subprocess
import sys

from chalicelib.config import PROJECT_DIR


def test_tiny_chaos_run_leaves_every_device_provisioned_and_nothing_behind(tmp_path):
    out = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--size", "tiny", "--seed", "7", "--json", str(out)],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    report = json.loads(out.read_text())
    assert report["kills"] == 2 and len(report["rounds"]) == 2
    # the kills cut requests short (tiny kills as soon as the seeded number of answers is in: the rest are in flight)
    assert report["in_flight_at_kills"] > 0
    assert report["devices"] == report["provisioned"] == 12 and report["unprovisioned"] == [] == report["stuck"]
    assert report["with_csr"] == 6 and report["own_keys"] > 0
    assert report["orphans"] == 0 and report["doubles"] == 0 and report["certificates_replaced_on_retry"] == 0
    assert report["active_certificates"] == 12  # one per device, read from the CA's records
    assert report["audit_exit"] == 0 and report["audit_output"][-1].startswith("0 finding(s)")
    assert report["audit_during_lease"]["hidden"] == 0  # during the lease the audit listed every unnamed certificate
    damaged = report["damaged_registry"]
    assert damaged["health_status"] == 503 and damaged["health_code"] == "unhealthy"
    assert damaged["health_names_registry"] and damaged["cli_exit"] != 0
    assert damaged["cli_lines"] == 1 and not damaged["cli_traceback"] and "registry" in damaged["cli_message"]
    assert "| targets met | yes |" in done.stdout
