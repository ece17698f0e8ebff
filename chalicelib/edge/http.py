"""The HTTP edge: parse -> one service call -> map domain errors to HTTP (the design's wire protocol).

`create_app(services)` builds the Chalice app over a container's services: app.py's for Lambda and chalice local,
a test's own in the tests.
"""
from __future__ import annotations

import os
import uuid
from email.utils import format_datetime
from typing import Any, Callable, Protocol

from chalice import Chalice, Response
from chalice.app import Request

from chalicelib.adapters import observability
from chalicelib.adapters.storage import DEVICE_MESSAGE, StorageUnavailable
from chalicelib.config import Settings
from chalicelib.domain.answers import Answer
from chalicelib.domain.clock import timestamp, utcnow
from chalicelib.domain.deadline import Deadline
from chalicelib.domain.errors import (
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
from chalicelib.domain.requests import ProvisioningRequest, RenewalRequest
from chalicelib.domain.steps import Steps
from chalicelib.edge import coldstart
from chalicelib.edge.forwarded import client_ip
from chalicelib.edge.health import Health, failing_parts
from chalicelib.edge.wire import error_body, parse_json, response_body
from chalicelib.services.provisioning import ProvisioningService
from chalicelib.services.renewal import RenewalService

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


class Services(Protocol):
    """What the edge needs of the composition root (container.Container)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def provisioning(self) -> ProvisioningService: ...

    @property
    def renewal(self) -> RenewalService: ...

    @property
    def health(self) -> Health: ...



def create_app(services: Services) -> Chalice:
    app = Chalice(app_name=observability.SERVICE)  # its app.log is observability.logger's logger too

    @app.middleware("all")
    def resume_gc_after_the_first_event(event: Any, get_response: Callable[[Any], Any]) -> Any:
        try:
            return get_response(event)
        finally:
            coldstart.resume()  # a cold start's objects frozen, the collector back on (edge/coldstart.py)

    @app.middleware("http")
    def refuse_local_backends_on_lambda(event: Request, get_response: Callable[[Request], Response]) -> Response:
        """Chalice gives `chalice local`, `package` and `deploy` one stage's environment and the default stage
        `dev` is local: a function deployed without --stage prod would run SQLite and a local CA on Lambda."""
        stage = services.settings.stage
        if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and stage != "prod":
            message = (f"this function runs the {stage!r} stage's local backends on AWS Lambda: it was deployed "
                       "without --stage prod; redeploy with `chalice deploy --stage prod`")
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

    def device_route(parse: Callable[[Any], Any], call: Callable[[Any, str, Steps, Deadline], Any],
                     answer: Callable[[Any], dict[str, Any]], done: Callable[..., None]) -> Response:
        """One device request: parse the body, one service call, the answer's body; every failure becomes an
        answer (error_answer); then one log line and the metrics (`done`)."""
        request = app.current_request
        assert request is not None  # chalice sets it for every routed call
        steps = Steps()
        request_id = request.context.get("requestId") or uuid.uuid4().hex  # chalice local gives none
        headers = {"X-Request-Id": request_id}
        parsed, ip, result = None, None, None
        try:
            ip = client_ip(request.context.get("identity", {}).get("sourceIp", ""), request.headers,
                           services.settings.trust_forwarded_for)
            deadline = Deadline.for_request(request.lambda_context, services.settings.request_budget_seconds)
            parsed = parse(parse_json(request.raw_body or b""))
            result = call(parsed, ip, steps, deadline)
            status, code, body = 200, "", answer(result)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer (error_answer)
            status, code, body, more = error_answer(exc, request_id)
            headers.update(more)
        try:
            done(request_id=request_id, thing_name=parsed.thing_name if parsed else None, status=status, code=code,
                 steps=steps, result=result, request=parsed, ip=ip)
        except OSError:  # the log's disk is full: the device's answer comes first
            pass
        return Response(body, status_code=status, headers={"Content-Type": "application/json", **headers})

    # Any Content-Type: the original device and many embedded HTTP stacks send none or an odd one, and the body is
    # parsed as JSON whatever it says (Chalice would answer 415 in its own body shape before the handler).
    @app.route("/device-provisioning", methods=["POST"], content_types=["*/*"])
    def device_provisioning() -> Response:
        def done(result: Answer | None, request: ProvisioningRequest | None, ip: str | None, code: str,
                 **line: Any) -> None:
            choice = result.choice if result else None
            detail: dict[str, Any] = {"client_ip": ip,
                                      "certificate_id": result.issued.certificate_id if result else None}
            if request is not None:
                detail.update(signature_version=request.version, csr=request.csr is not None)
            observability.request_done(**line, code=code or observability.SUCCESS,
                                       region=choice.region if choice else None,
                                       reason=choice.reason if choice else None,
                                       country=choice.country if choice else None, detail=detail)
        return device_route(ProvisioningRequest.from_body, lambda *args: services.provisioning.provision(*args),
                            response_body, done)

    @app.route("/device-renewal", methods=["POST"], content_types=["*/*"])
    def device_renewal() -> Response:
        """Renewal, key rotation and relocation; errors mapped as provisioning's are."""
        def done(result: Answer | None, code: str, request: Any, ip: Any, **line: Any) -> None:
            if result is not None:
                code = "recovered" if result.recovered else (
                    "relocated" if result.choice.reason == "relocated" else "renewed")
            observability.renewal_done(
                **line, code=code, region=result.choice.region if result else None,
                reason=result.choice.reason if result else None,
                detail={"certificate_id": result.issued.certificate_id,
                        "previous_certificate_id": result.previous_certificate_id} if result else None)
        return device_route(RenewalRequest.from_body, lambda *args: services.renewal.renew(*args), response_body,
                            done)

    @app.route("/health", methods=["GET"])
    def health() -> Response | dict[str, Any]:
        """200 ok or degraded (e.g. ipstack unusable, the bundled database used); 503 naming each failing part."""
        try:
            config = services.settings
            result = services.health.check()
        except Exception as exc:  # the stage cannot even be set up: that is the failing part
            observability.logger.exception("health check failed")
            result = {"status": "failing",
                      "checks": {"configuration": {"status": "failing", "detail": str(exc)[:200]}}}
            config = None
        if result["status"] == "failing":
            body = {**error_body("unhealthy", f"not ready: {failing_parts(result)}"), "checks": result["checks"]}
            return Response(body, status_code=503, headers={"Content-Type": "application/json", "Retry-After": "5"})
        assert config is not None  # set whenever the checks ran
        return {"status": result["status"], "stage": config.stage, "regions": list(config.enabled_regions),
                "checks": result["checks"]}

    return app


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
