"""HTTP routes only: parse -> one service call -> map domain errors to HTTP (design.md)."""
import json
import uuid

from chalice import Chalice, Response

from chalicelib import observability, wiring
from chalicelib.errors import (AlreadyProvisioned, BodyTooLarge, ConfigError, MalformedRequest, NotRegistered,
                               ProvisioningError, ProvisioningInProgress, RegionBlocked, ServiceUnavailable,
                               SignatureInvalid)
from chalicelib.deadline import Deadline
from chalicelib.geo import client_ip
from chalicelib.health import failing_parts
from chalicelib.storage import DEVICE_MESSAGE, StorageUnavailable
from chalicelib.observability import Steps
from chalicelib.provisioning import ProvisioningRequest

app = Chalice(app_name="iot-global-provisioning")  # its app.log is observability.logger's logger too
wiring.validate()

MAX_BODY_BYTES = 16 * 1024
HTTP_STATUS = {
    BodyTooLarge: 413,
    MalformedRequest: 400,
    SignatureInvalid: 403,
    NotRegistered: 403,
    AlreadyProvisioned: 409,
    ProvisioningInProgress: 409,
    RegionBlocked: 403,
    ServiceUnavailable: 503,
}


@app.route("/device-provisioning", methods=["POST"])
def device_provisioning():
    request = app.current_request
    steps = Steps()
    request_id = request.context.get("requestId") or uuid.uuid4().hex  # chalice local gives none
    thing_name, result, headers, detail = None, None, {"X-Request-Id": request_id}, {}
    try:
        provisioning_request = ProvisioningRequest.from_body(parse_json(request.raw_body or b""))
        thing_name = provisioning_request.thing_name
        ip = client_ip(request.context.get("identity", {}).get("sourceIp", ""), request.headers,
                       wiring.settings().trust_forwarded_for)
        detail = {"client_ip": ip, "signature_version": provisioning_request.version,
                  "csr": provisioning_request.csr is not None}
        deadline = Deadline.for_request(request.lambda_context, wiring.settings().request_budget_seconds)
        result = wiring.service().provision(provisioning_request, ip, steps, deadline)
        status, code, body = 200, "provisioned", result.response_body()
    except ProvisioningError as exc:
        status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 400)
        code, body = exc.code, error_body(exc.code, exc.message)
        if isinstance(exc, StorageUnavailable):  # the operator's message names paths: log it, tell the device less
            observability.logger.error("storage fault: %s", exc.message)
            body = error_body(exc.code, DEVICE_MESSAGE)
        if isinstance(exc, ServiceUnavailable) or getattr(exc, "retry_after", None):
            headers["Retry-After"] = str(exc.retry_after)
    except ConfigError as exc:
        observability.logger.error("stage misconfigured: %s", exc)
        status, code = 503, "service-misconfigured"
        body = error_body(code, "the service is not configured; try again later")
        headers["Retry-After"] = "60"
    except Exception:  # a bug or an unforeseen failure: logged in full here, never a 500 or a trace outside
        observability.logger.exception("unexpected failure", extra={"request_id": request_id})
        status, code = 503, "service-unavailable"
        body = error_body(code, "the service failed unexpectedly; try again later")
        headers["Retry-After"] = "30"
    choice = result.choice if result else None
    try:
        observability.request_done(request_id=request_id, thing_name=thing_name, status=status, code=code,
                                   steps=steps, region=choice and choice.region, reason=choice and choice.reason,
                                   country=choice and choice.country,
                                   detail={**detail, "certificate_id": result and result.issued.certificate_id})
    except OSError:  # the log's disk is full: the device's answer comes first
        pass
    return Response(body, status_code=status, headers={"Content-Type": "application/json", **headers})


def parse_json(raw: bytes):
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"the body must be at most {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise MalformedRequest("the body is not valid JSON") from None


def error_body(code: str, message: str) -> dict:
    return {"status": "error", "code": code, "message": message}


@app.route("/health", methods=["GET"])
def health():
    """200 ok or degraded (e.g. ipstack unusable, the bundled database used); 503 naming each failing part."""
    try:
        config = wiring.settings()
        result = wiring.health().check()
    except Exception as exc:  # the stage cannot even be set up: that is the failing part
        observability.logger.exception("health check failed")
        result = {"status": "failing", "checks": {"configuration": {"status": "failing", "detail": str(exc)[:200]}}}
        config = None
    if result["status"] == "failing":
        body = {**error_body("unhealthy", f"not ready: {failing_parts(result)}"), "checks": result["checks"]}
        return Response(body, status_code=503, headers={"Content-Type": "application/json", "Retry-After": "5"})
    return {"status": result["status"], "stage": config.stage, "regions": list(config.enabled_regions),
            "checks": result["checks"]}
