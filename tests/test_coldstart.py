"""chalicelib/edge/coldstart.py: inside Lambda the cyclic GC is paused from the app's import to the end of the first
event, then resumes with the cold start's objects frozen; elsewhere nothing changes. Fresh interpreters, since
the pause happens at import."""
import json
import os
import subprocess
import sys

from chalicelib.config import PROJECT_DIR

SCRIPT = """import gc, json, sys
import app
paused = not gc.isenabled()
event = {"resource": "/nowhere", "path": "/nowhere", "httpMethod": "GET", "headers": {}, "multiValueHeaders": {},
         "queryStringParameters": None, "multiValueQueryStringParameters": None, "pathParameters": None,
         "stageVariables": None, "body": None, "isBase64Encoded": False,
         "requestContext": {"resourcePath": "/nowhere", "httpMethod": "GET", "stage": "api", "requestId": "r1",
                            "path": "/api/nowhere", "identity": {"sourceIp": "81.2.69.142"}}}
status = app.app(event, None)["statusCode"]
print(json.dumps({"paused_after_import": paused, "status": status, "enabled_after_event": gc.isenabled(),
                  "frozen": gc.get_freeze_count()}))
"""


def cold_start(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GIP_"))}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_DIR, env={**base, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_inside_lambda_the_gc_waits_for_the_end_of_the_first_event_then_skips_the_cold_start_objects():
    result = cold_start(AWS_LAMBDA_FUNCTION_NAME="cold-start-test", GIP_STAGE="prod")
    assert result["paused_after_import"] is True
    assert result["status"] == 403  # answered (as API Gateway answers a path it does not have)
    assert result["enabled_after_event"] is True
    assert result["frozen"] > 10_000


def test_outside_lambda_nothing_changes():
    result = cold_start()
    assert result == {"paused_after_import": False, "status": 403, "enabled_after_event": True, "frozen": 0}
