"""HTTP routes only: parse -> one service call -> map domain errors to HTTP (design.md)."""
# First of all: inside Lambda this pauses the cyclic GC for the cold start (chalicelib/coldstart.py).
from chalicelib import coldstart  # isort: skip
import os
import uuid
from email.utils import format_datetime
from typing import Any, Callable

from chalice import Chalice, Response
from chalice.app import Request

from chalicelib import observability, wiring
from chalicelib.clock import timestamp, utcnow
from chalicelib.deadline import Deadline
from chalicelib.errors import (
    AlreadyProvisioned,
    BodyTooLarge,
    ConfigError,
    MalformedRequest,
    NotRegistered,
    ProvisioningError,
    ProvisioningInProgress,
    RegionBlocked,
    RenewalInProgress,
    RenewalRefused,
    ServiceUnavailable,
    SignatureInvalid,
)
from chalicelib.geo import client_ip
from chalicelib.health import failing_parts
from chalicelib.observability import Steps
from chalicelib.provisioning import ProvisioningResult
from chalicelib.renewal import RenewalResult
from chalicelib.storage import DEVICE_MESSAGE, StorageUnavailable
from chalicelib.wire import (
    ProvisioningRequest,
    RenewalRequest,
    error_body,
    parse_json,
    renewal_response_body,
    response_body,
)

app = Chalice(app_name="iot-global-provisioning")  # its app.log is observability.logger's logger too
wiring.validate()

HTTP_STATUS: dict[type[ProvisioningError], int] = {
    BodyTooLarge: 413,
    MalformedRequest: 400,
    SignatureInvalid: 403,
    NotRegistered: 403,
    AlreadyProvisioned: 409,
    ProvisioningInProgress: 409,
    RegionBlocked: 403,
    ServiceUnavailable: 503,
    RenewalRefused: 403,
    RenewalInProgress: 409,
}


@app.middleware("all")
def resume_gc_after_the_first_event(event: Any, get_response: Callable[[Any], Any]) -> Any:
    try:
        return get_response(event)
    finally:
        coldstart.resume()  # a cold start's objects frozen, the collector back on (chalicelib/coldstart.py)


@app.middleware("http")
def refuse_local_backends_on_lambda(event: Request, get_response: Callable[[Request], Response]) -> Response:
    """Chalice gives `chalice local`, `package` and `deploy` one stage's environment and the default stage `dev`
    is local: a function deployed without --stage prod would run SQLite and a local CA on Lambda. Refuse."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and wiring.settings().stage != "prod":
        message = (f"this function runs the {wiring.settings().stage!r} stage's local backends on AWS Lambda: it "
                   "was deployed without --stage prod; redeploy with `chalice deploy --stage prod`")
        observability.logger.error(message)
        return Response(error_body("stage-not-deployable", message), status_code=503,
                        headers={"Content-Type": "application/json", "Retry-After": "3600"})
    return get_response(event)


@app.middleware("http")
def answer_undefined_methods_like_api_gateway(event: Request,
                                              get_response: Callable[[Request], Response]) -> Response:
    """On AWS, API Gateway itself answers a method a path does not have (the function never sees it); chalice
    local would let Chalice answer 405 in its own body shape. Answer as API Gateway does, on every stage."""
    if event.method not in app.routes.get(event.context.get("resourcePath", ""), {}):
        return Response({"message": "Missing Authentication Token"}, status_code=403,
                        headers={"x-amzn-ErrorType": "MissingAuthenticationTokenException"})
    return get_response(event)


# Any Content-Type: the original device and many embedded HTTP stacks send none or an odd one, and the body is
# parsed as JSON whatever it says (Chalice would answer 415 in its own body shape before the handler).
@app.route("/device-provisioning", methods=["POST"], content_types=["*/*"])
def device_provisioning() -> Response:
    request = app.current_request
    assert request is not None  # chalice sets it for every routed call
    steps = Steps()
    request_id = request.context.get("requestId") or uuid.uuid4().hex  # chalice local gives none
    thing_name: str | None = None
    result: ProvisioningResult | None = None
    headers = {"X-Request-Id": request_id}
    detail: dict[str, Any] = {}
    try:
        provisioning_request = ProvisioningRequest.from_body(parse_json(request.raw_body or b""))
        thing_name = provisioning_request.thing_name
        ip = client_ip(request.context.get("identity", {}).get("sourceIp", ""), request.headers,
                       wiring.settings().trust_forwarded_for)
        detail = {"client_ip": ip, "signature_version": provisioning_request.version,
                  "csr": provisioning_request.csr is not None}
        deadline = Deadline.for_request(request.lambda_context, wiring.settings().request_budget_seconds)
        result = wiring.service().provision(provisioning_request, ip, steps, deadline)
        status, code = 200, observability.SUCCESS
        body: dict[str, Any] = response_body(result)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer (error_answer)
        status, code, body, more = error_answer(exc, request_id)
        headers.update(more)
    choice = result.choice if result else None
    try:
        observability.request_done(request_id=request_id, thing_name=thing_name, status=status, code=code,
                                   steps=steps, region=choice.region if choice else None,
                                   reason=choice.reason if choice else None,
                                   country=choice.country if choice else None,
                                   detail={**detail,
                                           "certificate_id": result.issued.certificate_id if result else None})
    except OSError:  # the log's disk is full: the device's answer comes first
        pass
    return Response(body, status_code=status, headers={"Content-Type": "application/json", **headers})


@app.route("/device-renewal", methods=["POST"], content_types=["*/*"])
def device_renewal() -> Response:
    """Renewal, key rotation and relocation (README, "Renewal"); errors mapped as provisioning's are."""
    request = app.current_request
    assert request is not None
    steps = Steps()
    request_id = request.context.get("requestId") or uuid.uuid4().hex
    thing_name: str | None = None
    result: RenewalResult | None = None
    headers = {"X-Request-Id": request_id}
    try:
        renewal_request = RenewalRequest.from_body(parse_json(request.raw_body or b""))
        thing_name = renewal_request.thing_name
        ip = client_ip(request.context.get("identity", {}).get("sourceIp", ""), request.headers,
                       wiring.settings().trust_forwarded_for)
        deadline = Deadline.for_request(request.lambda_context, wiring.settings().request_budget_seconds)
        result = wiring.renewal_service().renew(renewal_request, ip, steps, deadline)
        status, body = 200, renewal_response_body(result)
        code = "recovered" if result.recovered else ("relocated" if result.choice.reason == "relocated" else "renewed")
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer, as for provisioning
        status, code, body, more = error_answer(exc, request_id)
        headers.update(more)
    try:
        observability.renewal_done(
            request_id=request_id, thing_name=thing_name, status=status, code=code, steps=steps,
            region=result.choice.region if result else None, reason=result.choice.reason if result else None,
            detail={"certificate_id": result.issued.certificate_id, "previous_certificate_id":
                    result.previous_certificate_id} if result else None)
    except OSError:  # the log's disk is full: the device's answer comes first
        pass
    return Response(body, status_code=status, headers={"Content-Type": "application/json", **headers})


def error_answer(exc: Exception, request_id: str) -> tuple[int, str, dict[str, Any], dict[str, str]]:
    """HTTP status, outcome code, body and extra headers of a failed request (both device routes). Call it in
    the `except` block: an unforeseen failure is logged with its traceback."""
    if isinstance(exc, ProvisioningError):
        status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 400)
        code, body, headers = exc.code, error_body(exc.code, exc.message), {}
        if isinstance(exc, StorageUnavailable):  # the operator's message names paths: log it, tell the device less
            observability.logger.error("storage fault: %s", exc.message)
            body = error_body(exc.code, DEVICE_MESSAGE)
        retry_after = getattr(exc, "retry_after", None)  # 503s, and a 409 in progress: the lease's time left
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if code == "stale-timestamp":  # a device without NTP learns the time here and corrects its clock
            now = utcnow()
            headers["Date"], body["serverTime"] = format_datetime(now, usegmt=True), timestamp(now)
        return status, code, body, headers
    if isinstance(exc, ConfigError):
        observability.logger.error("stage misconfigured: %s", exc)
        code = "service-misconfigured"
        return 503, code, error_body(code, "the service is not configured; try again later"), {"Retry-After": "60"}
    # a bug or an unforeseen failure: logged in full here, never a 500 or a trace outside
    observability.logger.exception("unexpected failure", extra={"request_id": request_id})
    code = "service-unavailable"
    return 503, code, error_body(code, "the service failed unexpectedly; try again later"), {"Retry-After": "30"}


@app.route("/health", methods=["GET"])
def health() -> Response | dict[str, Any]:
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
    assert config is not None  # set whenever the checks ran
    return {"status": result["status"], "stage": config.stage, "regions": list(config.enabled_regions),
            "checks": result["checks"]}
