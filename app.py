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
    ServiceUnavailable,
    SignatureInvalid,
)
from chalicelib.geo import client_ip
from chalicelib.observability import Steps
from chalicelib.provisioning import ProvisioningResult
from chalicelib.wire import ProvisioningRequest, error_body, parse_json, response_body

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


@app.route("/health", methods=["GET"])
def health() -> dict[str, Any]:
    config = wiring.settings()
    return {"status": "ok", "stage": config.stage, "regions": list(config.enabled_regions)}
