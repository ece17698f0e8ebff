"""The prod stage's issuer: AWS IoT Core in the chosen region, through one boto3 client per region."""
import concurrent.futures as cf
import contextvars
import functools
import json
import logging
import random
import secrets
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Iterator, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from chalicelib.adapters.aws import ATTEMPT_SECONDS
from chalicelib.adapters.aws import error_code as _code
from chalicelib.domain import deadline
from chalicelib.domain.certificates import ACTIVE, CertificateInfo, CertificateRef, Endpoint, IssuedCertificate
from chalicelib.domain.errors import (
    AlreadyProvisioned,
    IssueIncomplete,
    MalformedRequest,
    ProvisioningError,
    ServiceUnavailable,
)

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
# CreationDate of a certificate and the write-ahead record's time come from two clocks.
_CLOCK_SLACK = timedelta(seconds=60)
# Backoff between tries of one rollback step that AWS throttles (with admission on, the mutating calls have no
# botocore retries: these are the only ones).
THROTTLED_WAITS = (0.2, 0.4, 0.8, 1.6, 3.2)
# A throttled create/attach of issue() is tried again after about the time a bucket takes to refill, at most
# twice: within the request's deadline, and inside the budget admission control keeps in reserve.
_THROTTLE_WAITS = (0.5, 1.0)
# CreateThing, https://docs.aws.amazon.com/iot/latest/apireference/API_CreateThing.html : "If this call is made
# multiple times using the same thing name and configuration, the call will succeed. If this call is made with the
# same thing name but different configuration a ResourceAlreadyExistsException is thrown." Each CreateThing carries
# this attribute with a value of its own, so no thing made before (by anyone) has its configuration. (A thing
# without a thing type has at most three attributes; this is one.)
ATTEMPT_ATTRIBUTE = "gip_attempt"
MUTATING_OPERATIONS = frozenset({"CreateThing", "CreateCertificateFromCsr", "CreateKeysAndCertificate",
                                 "AttachPolicy", "AttachThingPrincipal", "DetachThingPrincipal", "DetachPolicy",
                                 "UpdateCertificate", "DeleteCertificate", "DeleteThing"})


class SharedEndpoints(Protocol):
    """Each region's device endpoint (DescribeEndpoint's iot:Data-ATS address), kept where every container reads it."""

    def get(self, region: str) -> str | None: ...

    def put(self, region: str, address: str) -> None: ...


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
                 on_throttle: Callable[[str], None] | None = None,
                 shared_endpoints: "SharedEndpoints | None" = None) -> None:
        self._client = client_for_region
        # Where every container finds a region's endpoint another one looked up (DescribeEndpoint has its own,
        # small quota: a storm's hundreds of cold containers must not each ask for it).
        self._shared_endpoints = shared_endpoints
        # Clients for the calls that change things, without botocore's own retries (see _mutate).
        self._mutating = mutating_client_for_region or client_for_region
        self._on_throttle = on_throttle
        self._policy_name = policy_name
        self._executor = executor
        self._sleep = sleep
        self._detach_waits = detach_waits
        self._lock = threading.Lock()
        self._once_per_region: dict[tuple[str, str], cf.Future] = {}

    def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future:
        """Run on the executor in a copy of this thread's context: the request's deadline goes along."""
        return self._executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def _once(self, what: str, region: str, fn: Callable[[str], Any]) -> cf.Future:
        """One shared call per region for the container's life; a failed one is tried again next time."""
        with self._lock:
            future = self._once_per_region.get((what, region))
            if future is None or (future.done() and future.exception() is not None):
                future = self._once_per_region[(what, region)] = self._submit(fn, region)
        return future

    def _mutate(self, region: str, method: str, waits: tuple[float, ...], **kwargs: Any) -> Any:
        """One create/attach/detach/delete call; a throttle is reported (admission control slows the whole
        region) and the call tried again after a jittered wait, at most len(waits) times and only while the
        request's deadline leaves room for another attempt."""
        for wait in (*waits, None):
            try:
                return getattr(self._mutating(region), method)(**kwargs)
            except ClientError as exc:
                if _code(exc) != "ThrottlingException":
                    raise
                if self._on_throttle is not None:
                    self._on_throttle(region)
                current = deadline.current()
                if wait is None or (current is not None and current.for_work() < wait * 1.25 + ATTEMPT_SECONDS):
                    raise
                self._sleep(wait * random.uniform(0.75, 1.25))
        raise AssertionError("unreachable")

    def _mutating_client(self, region: str, waits: tuple[float, ...] = _THROTTLE_WAITS) -> "_Mutating":
        """issue()'s client; the rollback's (waits=()) leaves retrying to _while_throttled."""
        return _Mutating(self, region, waits)

    def _describe_endpoint(self, region: str) -> Endpoint:
        address = self._client(region).describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
        return Endpoint(address, MQTT_PORT)

    def _find_endpoint(self, region: str) -> Endpoint:
        """The region's endpoint, once per container: from the shared store when another container put it there
        (an account's endpoint in a region never changes), else DescribeEndpoint, then shared."""
        shared = self._shared_endpoints
        if shared is not None:
            try:
                address = shared.get(region)
                if address:
                    return Endpoint(address, MQTT_PORT)
            except Exception as exc:  # the store is a shortcut: without it, ask AWS IoT
                log.warning("shared endpoint of %s unreadable: %s: %s", region, type(exc).__name__, exc)
        endpoint = self._describe_endpoint(region)
        if shared is not None:
            try:
                shared.put(region, endpoint.address)
            except Exception as exc:
                log.warning("could not share the endpoint of %s: %s: %s", region, type(exc).__name__, exc)
        return endpoint

    def _create_policy(self, region: str) -> None:
        try:
            self._client(region).create_policy(policyName=self._policy_name,
                                               policyDocument=json.dumps(device_policy_document()))
        except ClientError as exc:
            if _code(exc) != "ResourceAlreadyExistsException":  # another container made it meanwhile
                raise

    def _attach_policy(self, client: Any, region: str, arn: str) -> None:
        """AttachPolicy; the device policy is made only when AWS says it does not exist (once per region for
        the account's life), so no container spends a GetPolicy, whose quota is small, to look first."""
        try:
            client.attach_policy(policyName=self._policy_name, target=arn)
            return
        except ClientError as exc:
            if not _is_not_found(exc):
                raise
        # The certificate was just made by this request, so what is missing is the policy.
        self._once("policy", region, self._create_policy).result()
        client.attach_policy(policyName=self._policy_name, target=arn)

    def check(self, regions: Iterable[str]) -> None:
        """Raise unless the IoT client of every region answered once (its endpoint, kept for the container)."""
        for region in regions:
            self.endpoint(region)

    def endpoint(self, region: str) -> Endpoint:
        try:
            return self._once("endpoint", region, self._find_endpoint).result()
        except _AWS_ERRORS as exc:
            raise _domain_error(exc, region) from exc

    def issue(self, thing_name: str, region: str, csr: x509.CertificateSigningRequest | None,
              in_place: bool = False) -> IssuedCertificate:
        """In place, the thing exists and holds the current certificate: it is neither made nor, on failure, deleted."""
        client = self._mutating_client(region)
        endpoint_f = self._once("endpoint", region, self._find_endpoint)
        if not endpoint_f.done():  # a cold container: a failed lookup must not cost a thing and a certificate
            try:
                endpoint_f.result()
            except _AWS_ERRORS as exc:
                raise _domain_error(exc, region) from exc
        # created False (not made, not adopted): a failure detaches the new certificate and keeps the thing.
        thing_f = _done(False) if in_place else self._submit(self._ensure_thing, client, region, thing_name)
        cert_f = self._submit(_create_certificate, client, csr)
        cf.wait([endpoint_f, thing_f, cert_f])
        # Whatever succeeded is ours to undo if anything else failed; a thing we did not make stays.
        created: bool | None = thing_f.result() if thing_f.exception() is None else None
        cert: dict[str, Any] | None = cert_f.result() if cert_f.exception() is None else None
        try:
            for future in (cert_f, thing_f, endpoint_f):
                future.result()
            assert cert is not None  # cert_f.result() above raised otherwise
            attached = [self._submit(self._attach_policy, client, region, cert["certificateArn"]),
                        self._submit(client.attach_thing_principal, thingName=thing_name,
                                     principal=cert["certificateArn"])]
            cf.wait(attached)
            for future in attached:
                future.result()
        except Exception as exc:
            incomplete = self._undo(self._mutating_client(region, ()), region,
                                    thing_name if created is not None else None, cert, delete_thing=bool(created))
            error = _domain_error(exc, region) if isinstance(exc, _AWS_ERRORS) else exc
            if incomplete:  # the orchestrator records it, for the operator and the audit
                raise IssueIncomplete(error, f"thing {thing_name} or certificate "
                                             f"{cert and cert['certificateId']} in {region}",
                                      (cert["certificateId"], bool(created)) if cert else None) from exc
            if error is exc:
                raise
            raise error from exc
        return IssuedCertificate(region, cert["certificateId"], cert["certificatePem"], endpoint_f.result(),
                                 cert.get("keyPair", {}).get("PrivateKey"), thing_name, cert["certificateArn"],
                                 created_thing=bool(created))

    def _ensure_thing(self, client: Any, region: str, thing_name: str, principal: str | None = None) -> bool:
        """The device's thing, made now (True) or adopted (False) when it exists with no certificate attached
        other than `principal`; never take over a thing that some other certificate uses, nor delete one this
        attempt did not make. One CreateThing, no look first: it carries an attribute of this call's own
        (ATTEMPT_ATTRIBUTE), and AWS answers CreateThing for an existing thing with the same configuration as
        made, with another one by ResourceAlreadyExistsException (API_CreateThing.html, quoted above): so a
        success means this very call made the thing, and only a thing that was there already is looked at."""
        try:
            client.create_thing(thingName=thing_name,
                                attributePayload={"attributes": {ATTEMPT_ATTRIBUTE: secrets.token_hex(8)}})
            return True
        except ClientError as exists:
            if _code(exists) != "ResourceAlreadyExistsException":
                raise
        others = [p for p in client.list_thing_principals(thingName=thing_name)["principals"] if p != principal]
        if others:
            raise AlreadyProvisioned(
                f"thing {thing_name} already exists in {region} with {len(others)} other certificate(s) attached; "
                "an operator must reset the device or remove that thing", "thing-exists")
        return False

    def find_issued(self, thing_name: str, region: str, since: datetime, fingerprint: str | None) -> list[str]:
        """CreateCertificateFromCsr names its certificate only in its answer: a crash right after it leaves a
        certificate nothing records. Active certificates attached to the thing since `since` (its principals),
        and from ListCertificates, newest first back to `since`, those attached to nothing and carrying the
        device's key (a server-made key cannot be told apart; see
        docs/exactly-once.md)."""
        from chalicelib.domain.keypolicy import key_fingerprint
        client, found = self._client(region), list[str]()
        try:
            # Attached to the thing: its principals say so whatever order ListCertificates pages come in.
            for arn in self._principals(client, thing_name):
                cert = client.describe_certificate(certificateId=arn.rsplit("/", 1)[-1])["certificateDescription"]
                if cert["status"] == "ACTIVE" and cert["creationDate"] >= since - _CLOCK_SLACK:
                    found.append(cert["certificateId"])
            for page in client.get_paginator("list_certificates").paginate(ascendingOrder=False):
                for cert in page["certificates"]:
                    if cert["creationDate"] < since - _CLOCK_SLACK:
                        return found
                    if cert["status"] != "ACTIVE" or cert["certificateId"] in found:
                        continue
                    things = client.list_principal_things(principal=cert["certificateArn"])["things"]
                    if thing_name in things:
                        found.append(cert["certificateId"])
                    elif not things and fingerprint:
                        pem = client.describe_certificate(
                            certificateId=cert["certificateId"])["certificateDescription"]["certificatePem"]
                        if key_fingerprint(x509.load_pem_x509_certificate(pem.encode()).public_key()) == fingerprint:
                            found.append(cert["certificateId"])
        except _AWS_ERRORS as exc:
            raise _domain_error(exc, region) from exc
        return found

    @staticmethod
    def _principals(client: Any, thing_name: str) -> list[str]:
        try:
            principals: list[str] = client.list_thing_principals(thingName=thing_name)["principals"]
            return principals
        except ClientError as exc:
            if _is_not_found(exc):
                return []
            raise

    def adopt(self, thing_name: str, region: str, certificate_id: str, in_place: bool = False) -> IssuedCertificate:
        client = self._mutating_client(region)
        try:
            found = client.describe_certificate(certificateId=certificate_id)["certificateDescription"]
            if found["status"] != "ACTIVE":
                raise LookupError(f"certificate {certificate_id} in {region} is {found['status']}")
            arn = found["certificateArn"]
            # In place the thing is the device's and holds its current certificate: attach only.
            created = False if in_place else self._ensure_thing(client, region, thing_name, principal=arn)
            self._attach_policy(client, region, arn)  # both are no-ops when already done
            client.attach_thing_principal(thingName=thing_name, principal=arn)
        except _AWS_ERRORS as exc:
            raise _domain_error(exc, region) from exc
        return IssuedCertificate(region, certificate_id, found["certificatePem"], self.endpoint(region), None,
                                 thing_name, arn, created_thing=created)

    def revoke(self, certificate: IssuedCertificate | CertificateRef, *, delete_thing: bool) -> None:
        """Detach the certificate, mark it REVOKED, delete it; with `delete_thing`, its thing too. Parts already gone
        are fine. What issue() returned names the thing and the ARN; from less (an operator's reset, a settled
        record) the ARN and the things the certificate is attached to are looked up first."""
        region = certificate.region
        client = self._client(region)
        arn, things = certificate.certificate_arn, [certificate.thing_name]
        if arn is None or certificate.thing_name is None:
            try:
                arn = arn or client.describe_certificate(
                    certificateId=certificate.certificate_id)["certificateDescription"]["certificateArn"]
                things = client.list_principal_things(principal=arn)["things"] or things
            except ClientError as exc:
                if not _is_not_found(exc):
                    raise _domain_error(exc, region) from exc
                arn = None  # gone already: only its thing may be left to delete
        cert = {"certificateId": certificate.certificate_id, "certificateArn": arn} if arn else None
        undo = self._mutating_client(region, ())
        if any([self._undo(undo, region, thing, cert, delete_thing=delete_thing) for thing in things]):
            raise ServiceUnavailable(f"revoking certificate {certificate.certificate_id} in {region} is incomplete")

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
        client = self._mutating_client(region)
        try:
            principals = client.list_thing_principals(thingName=thing_name)["principals"]
            for principal in principals:
                client.detach_thing_principal(thingName=thing_name, principal=principal)
            self._after_detach("InvalidRequestException", client.delete_thing, thingName=thing_name)
        except ClientError as exc:
            if not _is_not_found(exc):
                raise _domain_error(exc, region) from exc

    def _undo(self, client: Any, region: str, thing_name: str | None, cert: dict[str, Any] | None,
              delete_thing: bool = True) -> bool:
        """Remove, in reverse order of creation, what issue made; logs failures and returns whether any. Two rounds
        of calls side by side: detach (thing and policy) and revoke, then delete (certificate, and thing).

        Runs in the request's rollback time (deadline reserve); each call is retried while the deadline allows,
        so a throttled rollback still finishes, or says what is left."""
        detach: list[tuple[str, Callable[[], Any]]] = []
        delete: list[tuple[str, Callable[[], Any]]] = []
        if cert:
            arn, cert_id = cert["certificateArn"], cert["certificateId"]
            if thing_name:
                detach.append(("detach thing", lambda: client.detach_thing_principal(
                    thingName=thing_name, principal=arn)))
            detach += [
                ("detach policy", lambda: client.detach_policy(policyName=self._policy_name, target=arn)),
                # REVOKED, not INACTIVE: either makes AWS IoT disconnect the certificate's devices "within a few
                # minutes" and refuse them after, but only REVOKED is final, so a certificate whose deletion fails
                # can never be switched back on. docs.aws.amazon.com/iot/latest/apireference/API_UpdateCertificate.html
                ("revoke certificate", lambda: client.update_certificate(
                    certificateId=cert_id, newStatus="REVOKED")),
            ]
            delete.append(("delete certificate", lambda: self._after_detach(
                "DeleteConflictException", client.delete_certificate, certificateId=cert_id)))
        if thing_name and delete_thing:
            # AWS answers InvalidRequestException while the thing still has a principal attached.
            delete.append(("delete thing", lambda: self._after_detach(
                "InvalidRequestException", client.delete_thing, thingName=thing_name)))
        failed = False
        with deadline.rollback():  # for the whole undo: the steps side by side share the request's deadline
            for steps in (detach, delete):
                for (step, _), exc in zip(steps, self._side_by_side([call for _, call in steps])):
                    if exc is None or _is_not_found(exc):
                        continue
                    failed = True
                    log.error("cleanup step %r failed for thing %s in %s (certificate %s): %s: %s", step,
                              thing_name, region, cert and cert["certificateId"], type(exc).__name__,
                              _code(exc) if isinstance(exc, ClientError) else exc)
        return failed

    def _side_by_side(self, calls: list[Callable[[], Any]]) -> list[Exception | None]:
        """Run `calls` at once on the executor (one alone on this thread), each retried while throttled; returns
        each one's failure, or None."""
        if len(calls) == 1:
            try:
                self._while_throttled(calls[0])
                return [None]
            except Exception as exc:
                return [exc]
        futures = [self._submit(self._while_throttled, call) for call in calls]
        cf.wait(futures)
        return [future.exception() for future in futures]  # type: ignore[misc]

    def _while_throttled(self, call: Callable[[], Any]) -> Any:
        """A rollback step is worth more than the device's time: retry throttling for as long as the deadline's
        reserve allows (outside a request, a few times); the caller records what is still left."""
        for wait in (*THROTTLED_WAITS, None):
            try:
                return call()
            except ClientError as exc:
                current = deadline.current()
                if (wait is None or _code(exc) not in _TRANSIENT
                        or (current is not None and current.for_work() < wait + ATTEMPT_SECONDS)):
                    raise
                self._sleep(wait)

    def _after_detach(self, conflict_code: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        """Retry a delete while a just-made detachment propagates."""
        for wait in (*self._detach_waits, None):
            try:
                return call(**kwargs)
            except ClientError as exc:
                if wait is None or _code(exc) != conflict_code:
                    raise
                self._sleep(wait)


def _done(value: Any) -> cf.Future[Any]:
    future: cf.Future[Any] = cf.Future()
    future.set_result(value)
    return future
class _Mutating:
    """A region's client as issue() and _undo() use it: the calls that change things go through the issuer's
    _mutate (a client without botocore's retries, throttles reported); reads (DescribeThing...) go through the
    region's ordinary client, with botocore's retries."""

    def __init__(self, issuer: AwsIotIssuer, region: str, waits: tuple[float, ...]) -> None:
        self._issuer, self._region, self._waits = issuer, region, waits

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if "".join(part.title() for part in method.split("_")) in MUTATING_OPERATIONS:
            return functools.partial(self._issuer._mutate, self._region, method, self._waits)
        return getattr(self._issuer._client(self._region), method)  # reads keep botocore's retries


def _create_certificate(client: Any, csr: x509.CertificateSigningRequest | None) -> dict[str, Any]:
    if csr is None:
        return client.create_keys_and_certificate(setAsActive=True)
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    return client.create_certificate_from_csr(certificateSigningRequest=pem, setAsActive=True)


