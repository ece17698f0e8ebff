"""The prod stage's issuer: AWS IoT Core in the chosen region, through one boto3 client per region."""
import concurrent.futures as cf
import functools
import json
import logging
import random
import threading
import time
from typing import Any, Callable, Iterator

from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from chalicelib.aws import error_code as _code
from chalicelib.errors import IssueIncomplete, MalformedRequest, ProvisioningError, ServiceUnavailable
from chalicelib.issuers.base import ACTIVE, CertificateInfo, CertificateRef, Endpoint, IssuedCertificate

log = logging.getLogger(__name__)

DEVICE_POLICY_NAME = "iot-global-provisioning-device"
MQTT_PORT = 8883
_THING = "${iot:Connection.Thing.ThingName}"

# Codes after which the same request may well succeed later; any 5xx counts too.
_AWS_ERRORS = (ClientError, BotoCoreError)
_TRANSIENT = {"ThrottlingException", "LimitExceededException", "ServiceUnavailableException",
              "InternalFailureException", "InternalException", "RequestTimeoutException"}
# Detaching a principal is asynchronous in AWS IoT: deleting right after may still meet a conflict.
DETACH_WAITS = (0.2, 0.5, 1.0, 2.0)
# A throttled create/attach/detach/delete is tried again after about the time a bucket takes to refill, at
# most twice: within the request's deadline, and inside the budget admission control keeps in reserve.
_THROTTLE_WAITS = (0.5, 1.0)
MUTATING_OPERATIONS = frozenset({"CreateThing", "CreateCertificateFromCsr", "CreateKeysAndCertificate",
                                 "AttachPolicy", "AttachThingPrincipal", "DetachThingPrincipal", "DetachPolicy",
                                 "UpdateCertificate", "DeleteCertificate", "DeleteThing"})


def device_policy_document() -> dict[str, Any]:
    """Each device may connect as itself and use only data/<its thing name>/..., like the local ACL data/%u/#.

    ${iot:Connection.Thing.ThingName} resolves only when the certificate is attached to the thing and the
    MQTT client id equals the thing name, so the device must connect with its thing name as client id.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": f"arn:aws:iot:*:*:client/{_THING}",
             "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": f"arn:aws:iot:*:*:topic/data/{_THING}/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": f"arn:aws:iot:*:*:topicfilter/data/{_THING}/*"},
        ],
    }


def _is_not_found(exc: Exception) -> bool:
    return isinstance(exc, ClientError) and _code(exc) == "ResourceNotFoundException"


def _domain_error(exc: Exception, region: str | None) -> ProvisioningError:
    """AWS errors become domain errors, so no raw ClientError reaches the orchestrator or the device."""
    if not isinstance(exc, ClientError):  # connection errors, timeouts: AWS IoT could not be reached
        return ServiceUnavailable(f"AWS IoT in {region} cannot be reached; try again later", retry_after=5)
    code, operation = _code(exc), exc.operation_name
    if operation == "CreateCertificateFromCsr" and code == "InvalidRequestException":
        return MalformedRequest(f"AWS IoT in {region} refused the CSR", "malformed-csr")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _TRANSIENT or status >= 500:
        return ServiceUnavailable(f"AWS IoT {operation} in {region} is busy or unavailable; try again later",
                                  retry_after=5)
    log.error("AWS IoT %s in %s failed: %s", operation, region, code)
    return ServiceUnavailable(f"AWS IoT {operation} in {region} failed; try again later", retry_after=30)


class AwsIotIssuer:
    """Creates the thing and its certificate in the chosen region, with the device policy attached.

    issue() runs its AWS calls side by side on `executor` (the composition root's pool) and waits for them:
    never call it from that executor's own threads. `sleep` waits between retries of a delete while a
    detachment propagates.
    """

    def __init__(self, client_for_region: Callable[[str | None], Any], executor: cf.Executor,
                 policy_name: str = DEVICE_POLICY_NAME, sleep: Callable[[float], None] = time.sleep,
                 detach_waits: tuple[float, ...] = DETACH_WAITS,
                 mutating_client_for_region: Callable[[str], Any] | None = None,
                 on_throttle: Callable[[str], None] | None = None) -> None:
        self._client = client_for_region
        # Clients for the calls that change things, without botocore's own retries (see _mutate).
        self._mutating = mutating_client_for_region or client_for_region
        self._on_throttle = on_throttle
        self._policy_name = policy_name
        self._executor = executor
        self._sleep = sleep
        self._detach_waits = detach_waits
        self._lock = threading.Lock()
        self._once_per_region: dict[tuple[str, str], cf.Future] = {}

    def _once(self, what: str, region: str, fn: Callable[[str], Any]) -> cf.Future:
        """One shared call per region for the container's life; a failed one is tried again next time."""
        with self._lock:
            future = self._once_per_region.get((what, region))
            if future is None or (future.done() and future.exception() is not None):
                future = self._once_per_region[(what, region)] = self._executor.submit(fn, region)
        return future

    def _mutate(self, region: str, operation: str, **kwargs: Any) -> Any:
        """One create/attach/detach/delete call; a throttle is reported (admission control slows the whole
        region) and the call tried again after a jittered wait, at most len(_THROTTLE_WAITS) times."""
        for wait in (*_THROTTLE_WAITS, None):
            try:
                return getattr(self._mutating(region), operation)(**kwargs)
            except ClientError as exc:
                if _code(exc) != "ThrottlingException":
                    raise
                if self._on_throttle is not None:
                    self._on_throttle(region)
                if wait is None:
                    raise
                self._sleep(wait * random.uniform(0.75, 1.25))
        raise AssertionError("unreachable")

    def _mutating_client(self, region: str) -> "_Mutating":
        return _Mutating(self, region)

    def _describe_endpoint(self, region: str) -> Endpoint:
        address = self._client(region).describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
        return Endpoint(address, MQTT_PORT)

    def _ensure_policy(self, region: str) -> None:
        client = self._client(region)
        try:
            client.get_policy(policyName=self._policy_name)
            return
        except ClientError as exc:
            if not _is_not_found(exc):
                raise
        try:
            client.create_policy(policyName=self._policy_name,
                                 policyDocument=json.dumps(device_policy_document()))
        except ClientError as exc:
            if _code(exc) != "ResourceAlreadyExistsException":  # another container made it meanwhile
                raise

    def endpoint(self, region: str) -> Endpoint:
        try:
            return self._once("endpoint", region, self._describe_endpoint).result()
        except _AWS_ERRORS as exc:
            raise _domain_error(exc, region) from exc

    def issue(self, thing_name: str, region: str,
              csr: x509.CertificateSigningRequest | None) -> IssuedCertificate:
        client = self._mutating_client(region)
        endpoint_f = self._once("endpoint", region, self._describe_endpoint)
        policy_f = self._once("policy", region, self._ensure_policy)
        thing_f = self._executor.submit(client.create_thing, thingName=thing_name)
        cert_f = self._executor.submit(_create_certificate, client, csr)
        cf.wait([endpoint_f, policy_f, thing_f, cert_f])
        # Whatever succeeded is ours to undo if anything else failed.
        made_thing = thing_f.exception() is None
        cert: dict[str, Any] | None = cert_f.result() if cert_f.exception() is None else None
        try:
            for future in (cert_f, thing_f, policy_f, endpoint_f):
                future.result()
            assert cert is not None  # cert_f.result() above raised otherwise
            attached = [self._executor.submit(client.attach_policy, policyName=self._policy_name,
                                              target=cert["certificateArn"]),
                        self._executor.submit(client.attach_thing_principal, thingName=thing_name,
                                              principal=cert["certificateArn"])]
            cf.wait(attached)
            for future in attached:
                future.result()
        except Exception as exc:
            incomplete = self._undo(client, region, thing_name if made_thing else None, cert)
            error = _domain_error(exc, region) if isinstance(exc, _AWS_ERRORS) else exc
            if incomplete:  # the orchestrator records it, for the operator and the audit
                raise IssueIncomplete(error, f"thing {thing_name} or certificate "
                                             f"{cert and cert['certificateId']} in {region}") from exc
            if error is exc:
                raise
            raise error from exc
        return IssuedCertificate(region, cert["certificateId"], cert["certificatePem"], endpoint_f.result(),
                                 cert.get("keyPair", {}).get("PrivateKey"), thing_name, cert["certificateArn"])

    def revoke(self, issued: IssuedCertificate | CertificateRef) -> None:
        """Undo `issue` fully; parts already gone are fine.

        What issue() returned names the thing and the certificate ARN; from a certificate id alone (an
        operator's reset) they are looked up first.
        """
        region, client = issued.region, self._client(issued.region)
        things: list[str | None]
        if issued.certificate_arn and issued.thing_name:
            arn, things = issued.certificate_arn, [issued.thing_name]
        else:
            try:
                arn = client.describe_certificate(
                    certificateId=issued.certificate_id)["certificateDescription"]["certificateArn"]
                things = client.list_principal_things(principal=arn)["things"]
            except ClientError as exc:
                if _is_not_found(exc):
                    return
                raise _domain_error(exc, region) from exc
        cert = {"certificateId": issued.certificate_id, "certificateArn": arn}
        failures = [self._undo(self._mutating_client(region), region, thing, cert) for thing in things or [None]]
        if any(failures):
            raise ServiceUnavailable(f"revoking certificate {issued.certificate_id} in {region} is incomplete")

    def certificate(self, certificate_id: str, region: str | None = None) -> CertificateInfo | None:
        try:
            found = self._client(region).describe_certificate(certificateId=certificate_id)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise _domain_error(exc, region) from exc
        cert = found["certificateDescription"]
        return CertificateInfo(cert["certificateId"], region, cert["status"], None, cert["certificatePem"],
                               cert.get("creationDate"), cert.get("validity", {}).get("notAfter"),
                               arn=cert["certificateArn"])

    def active_certificates(self, region: str) -> Iterator[CertificateInfo]:
        client = self._client(region)
        try:
            for page in client.get_paginator("list_certificates").paginate():
                for cert in page["certificates"]:
                    if cert["status"] != ACTIVE:
                        continue
                    things = client.list_principal_things(principal=cert["certificateArn"])["things"]
                    yield CertificateInfo(cert["certificateId"], region, cert["status"], things[0] if things else None,
                                          arn=cert["certificateArn"])
        except _AWS_ERRORS as exc:
            raise _domain_error(exc, region) from exc

    def things(self, region: str) -> Iterator[str]:
        client = self._client(region)
        try:
            for page in client.get_paginator("list_things").paginate():
                yield from (thing["thingName"] for thing in page["things"])
        except _AWS_ERRORS as exc:
            raise _domain_error(exc, region) from exc

    def delete_thing(self, region: str, thing_name: str) -> None:
        """Detach whatever is attached to the thing, then delete it; gone already is fine."""
        client = self._client(region)
        try:
            principals = client.list_thing_principals(thingName=thing_name)["principals"]
            for principal in principals:
                client.detach_thing_principal(thingName=thing_name, principal=principal)
            self._after_detach("InvalidRequestException", client.delete_thing, thingName=thing_name)
        except ClientError as exc:
            if not _is_not_found(exc):
                raise _domain_error(exc, region) from exc

    def _undo(self, client: Any, region: str, thing_name: str | None, cert: dict[str, Any] | None) -> bool:
        """Remove, in reverse order of creation, what issue made; logs failures and returns whether any."""
        steps: list[tuple[str, Callable[[], Any]]] = []
        if cert:
            arn, cert_id = cert["certificateArn"], cert["certificateId"]
            if thing_name:
                steps.append(("detach thing", lambda: client.detach_thing_principal(
                    thingName=thing_name, principal=arn)))
            steps += [
                ("detach policy", lambda: client.detach_policy(policyName=self._policy_name, target=arn)),
                ("deactivate certificate", lambda: client.update_certificate(
                    certificateId=cert_id, newStatus="INACTIVE")),
                ("delete certificate", lambda: self._after_detach(
                    "DeleteConflictException", client.delete_certificate, certificateId=cert_id)),
            ]
        if thing_name:
            # AWS answers InvalidRequestException while the thing still has a principal attached.
            steps.append(("delete thing", lambda: self._after_detach(
                "InvalidRequestException", client.delete_thing, thingName=thing_name)))
        failed = False
        for step, call in steps:
            try:
                call()
            except Exception as exc:
                if _is_not_found(exc):
                    continue
                failed = True
                log.error("cleanup step %r failed for thing %s in %s (certificate %s): %s: %s", step,
                          thing_name, region, cert and cert["certificateId"], type(exc).__name__,
                          _code(exc) if isinstance(exc, ClientError) else exc)
        return failed

    def _after_detach(self, conflict_code: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        """Retry a delete while a just-made detachment propagates."""
        for wait in (*self._detach_waits, None):
            try:
                return call(**kwargs)
            except ClientError as exc:
                if wait is None or _code(exc) != conflict_code:
                    raise
                self._sleep(wait)


class _Mutating:
    """A region's client as issue() and _undo() use it: every call goes through the issuer's _mutate."""

    def __init__(self, issuer: AwsIotIssuer, region: str) -> None:
        self._issuer, self._region = issuer, region

    def __getattr__(self, operation: str) -> Callable[..., Any]:
        return functools.partial(self._issuer._mutate, self._region, operation)


def _create_certificate(client: Any, csr: x509.CertificateSigningRequest | None) -> dict[str, Any]:
    if csr is None:
        return client.create_keys_and_certificate(setAsActive=True)
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    return client.create_certificate_from_csr(certificateSigningRequest=pem, setAsActive=True)


