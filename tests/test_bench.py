"""The benchmark runs end to end at a tiny size, so it cannot rot. No timing is asserted."""
import json
import subprocess
import sys

from chalicelib.config import PROJECT_DIR


def test_bench_runs_and_reports_every_measurement(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "bench.run", "--size", "tiny", "--out", str(out)], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) >= {"inprocess", "http", "local_http", "timing", "aws", "cold", "bulk"}
    assert all(comparison["one_answer"] for comparison in results["timing"].values())  # one 403 body, every time
    assert [r["errors"] for route in ("health", "provisioning") for r in results["local_http"][route]] == [0] * 4
    assert results["http"]["errors"] == 0
    aws = results["aws"]
    assert aws["bundled"]["steady_calls"] == sorted(
        # admission's schedule beside the claim (with its nonce and write-ahead intent); the thing beside the
        # certificate; the two attachments; the commit, which is the certificate's record
        ["dynamodb.UpdateItem", "dynamodb.UpdateItem", "iot.CreateThing", "iot.CreateKeysAndCertificate",
         "iot.AttachPolicy", "iot.AttachThingPrincipal", "dynamodb.UpdateItem"])
    for geo in ("bundled", "ipstack"):  # every row the issue asks for is there (their values are the bench's)
        assert {"first_calls", "steady_calls", "steady_ms", "sample_ms", "critical_path_ms", "runs", "csr",
                "renewal", "relocation"} <= set(aws[geo])
        assert {"calls", "critical_path_ms", "rounds", "ms"} <= set(aws[geo]["relocation"])
    assert "iot.DeleteThing" in aws["bundled"]["relocation"]["calls"]  # the device moved: its old thing went
    assert "| Throughput / crypto floor |" in result.stdout
    assert "| Local HTTP latency, GET /health, 1 client(s), chalice local | p50 " in result.stdout
    inprocess, cold = results["inprocess"], results["cold"]
    assert inprocess["handler_us_per_device"] > 0 and inprocess["service_us_per_device"] > 0
    assert 0 < inprocess["log_and_metrics_share_of_handler"] < 1
    assert cold["prod_cpu_ms"] > 0 and cold["bare_cpu_ms"] > 0 and cold["prod_to_bare_cpu_ratio"] > 0
