"""HTTP routes only: parse -> one service call -> map domain errors to HTTP (design.md)."""
import json
import logging

from chalice import Chalice, Response

from chalicelib import wiring
from chalicelib.errors import (AlreadyProvisioned, ConfigError, MalformedRequest, NotRegistered,
                               ProvisioningError, ProvisioningInProgress, ServiceUnavailable,
                               SignatureInvalid)
from chalicelib.geo import client_ip
from chalicelib.provisioning import ProvisioningRequest
from chalicelib.regions import RegionBlocked

app = Chalice(app_name="iot-global-provisioning")
app.log.setLevel(logging.INFO)
wiring.validate()

MAX_BODY_BYTES = 16 * 1024
HTTP_STATUS = {
    MalformedRequest: 400,
    SignatureInvalid: 403,
    NotRegistered: 403,
    AlreadyProvisioned: 409,
    ProvisioningInProgress: 409,
    RegionBlocked: 403,
    ServiceUnavailable: 503,
}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return Response({"status": "error", "code": code, "message": message}, status_code=status,
                    headers={"Content-Type": "application/json", **(headers or {})})


@app.route("/device-provisioning", methods=["POST"])
def device_provisioning():
    request = app.current_request
    raw = request.raw_body or b""
    if len(raw) > MAX_BODY_BYTES:
        return error_response(413, "body-too-large", f"the body must be at most {MAX_BODY_BYTES} bytes")
    thing_name = None
    try:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            raise MalformedRequest("the body is not valid JSON") from None
        provisioning_request = ProvisioningRequest.from_body(body)
        thing_name = provisioning_request.thing_name
        config = wiring.settings()
        ip = client_ip(request.context.get("identity", {}).get("sourceIp", ""), request.headers,
                       config.trust_forwarded_for)
        result = wiring.service().provision(provisioning_request, ip)
    except ProvisioningError as exc:
        status = next((s for cls, s in HTTP_STATUS.items() if isinstance(exc, cls)), 400)
        app.log.info("provisioning refused thing=%s status=%d code=%s", thing_name, status, exc.code)
        retry = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ServiceUnavailable) else None
        return error_response(status, exc.code, exc.message, retry)
    except ConfigError as exc:
        app.log.error("stage misconfigured: %s", exc)
        return error_response(503, "service-misconfigured", "the service is not configured; try again later",
                              {"Retry-After": "60"})
    app.log.info("provisioned thing=%s region=%s reason=%s", thing_name, result.choice.region,
                 result.choice.reason)
    return result.response_body()


@app.route("/health", methods=["GET"])
def health():
    config = wiring.settings()
    return {"status": "ok", "stage": config.stage, "regions": list(config.enabled_regions)}
