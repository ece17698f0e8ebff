"""HTTP routes only: parse -> one service call -> map domain errors to HTTP (design.md)."""
import uuid
from typing import Any

from chalice import Chalice, Response

from chalicelib import observability, wiring
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
from chalicelib.observability import Steps
from chalicelib.provisioning import ProvisioningResult
from chalicelib.renewal import RenewalResult
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


@app.route("/device-provisioning", methods=["POST"])
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
        result = wiring.service().provision(provisioning_request, ip, steps)
        status, code = 200, observability.SUCCESS
        body: dict[str, Any] = response_body(result)
    except ProvisioningError as exc:
        status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 400)
        code, body = exc.code, error_body(exc.code, exc.message)
        if isinstance(exc, ServiceUnavailable):
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
    observability.request_done(request_id=request_id, thing_name=thing_name, status=status, code=code,
                               steps=steps, region=choice.region if choice else None,
                               reason=choice.reason if choice else None, country=choice.country if choice else None,
                               detail={**detail, "certificate_id": result.issued.certificate_id if result else None})
    return Response(body, status_code=status, headers={"Content-Type": "application/json", **headers})


@app.route("/device-renewal", methods=["POST"])
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
        result = wiring.renewal_service().renew(renewal_request, ip, steps)
        status, body = 200, renewal_response_body(result)
        code = "recovered" if result.recovered else ("relocated" if result.choice.reason == "relocated" else "renewed")
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer, as for provisioning
        status, code, body, retry_after = error_answer(exc, request_id)
        if retry_after:
            headers["Retry-After"] = retry_after
    observability.renewal_done(
        request_id=request_id, thing_name=thing_name, status=status, code=code, steps=steps,
        region=result.choice.region if result else None, reason=result.choice.reason if result else None,
        detail={"certificate_id": result.issued.certificate_id, "previous_certificate_id":
                result.previous_certificate_id} if result else None)
    return Response(body, status_code=status, headers={"Content-Type": "application/json", **headers})


def error_answer(exc: Exception, request_id: str) -> tuple[int, str, dict[str, Any], str | None]:
    """HTTP status, outcome code, body and Retry-After (or None) of a failed request."""
    if isinstance(exc, ProvisioningError):
        status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 400)
        retry_after = getattr(exc, "retry_after", None)
        return status, exc.code, error_body(exc.code, exc.message), str(retry_after) if retry_after else None
    if isinstance(exc, ConfigError):
        observability.logger.error("stage misconfigured: %s", exc)
        code = "service-misconfigured"
        return 503, code, error_body(code, "the service is not configured; try again later"), "60"
    observability.logger.exception("unexpected failure", extra={"request_id": request_id})
    code = "service-unavailable"
    return 503, code, error_body(code, "the service failed unexpectedly; try again later"), "30"


@app.route("/health", methods=["GET"])
def health() -> dict[str, Any]:
    config = wiring.settings()
    return {"status": "ok", "stage": config.stage, "regions": list(config.enabled_regions)}
