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
    assert set(results) >= {"inprocess", "http", "aws", "cold", "bulk"}
    assert results["http"]["errors"] == 0
    assert results["aws"]["bundled"]["steady_calls"] == sorted(
        ["dynamodb.PutItem", "dynamodb.UpdateItem", "dynamodb.UpdateItem", "dynamodb.UpdateItem",  # + admission's
         "iot.CreateThing", "iot.CreateKeysAndCertificate",
         "iot.AttachPolicy", "iot.AttachThingPrincipal"])
    assert "| Throughput / crypto floor |" in result.stdout
