"""The orchestrator: verify, claim, locate, choose a region, issue, record. Collaborators are passed in."""
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from chalicelib.admission import Admission
from chalicelib.clock import utcnow
from chalicelib.errors import (REFUSED, AlreadyProvisioned, MalformedRequest, ProvisioningError, ServiceUnavailable,
                               SignatureInvalid)
from chalicelib.geo import GeoLocator
from chalicelib.issuers.base import IssuedCertificate, Issuer
from chalicelib.observability import Steps
from chalicelib.regions import RegionChoice, RegionPolicy
from chalicelib.registry.base import PROVISIONED, Registry
from chalicelib.signatures import (FleetKeyVerifier, decode_signature, load_device_key, parse_timestamp, v1_text,
                                   v2_text, verifies)

log = logging.getLogger(__name__)


# AWS IoT's rule for thing names; it also keeps MQTT wildcards and '/' out of topics and ACLs.
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")


@dataclass(frozen=True)
class ProvisioningRequest:
    thing_name: str
    signature: bytes
    csr: x509.CertificateSigningRequest | None
    csr_pem: str | None = None
    timestamp: str | None = None  # with nonce: a signed request v2
    nonce: str | None = None

    @property
    def version(self) -> int:
        return 2 if self.timestamp is not None else 1

    def signed_text(self) -> bytes:
        if self.version == 1:
            return v1_text(self.thing_name)
        return v2_text(self.thing_name, self.timestamp, self.nonce, self.csr_pem)

    @classmethod
    def from_body(cls, body: Any) -> "ProvisioningRequest":
        """Check the wire format (design.md); anything wrong is a MalformedRequest naming the field and rule."""
        if not isinstance(body, Mapping):
            raise MalformedRequest("the body must be a JSON object")
        thing_name = _required_text(body, "thing-name")
        if not THING_NAME.fullmatch(thing_name):
            raise MalformedRequest("thing-name must be 1-128 letters, digits, ':', '_' or '-'", "invalid-thing-name")
        signature = decode_signature(_required_text(body, "thing-name-sig"))
        timestamp, nonce = body.get("timestamp"), body.get("nonce")
        if timestamp is not None or nonce is not None:
            timestamp, nonce = _required_text(body, "timestamp"), _required_text(body, "nonce")
            parse_timestamp(timestamp)
            if len(nonce) > 128:
                raise MalformedRequest("nonce must be at most 128 characters", "malformed-nonce")
        csr_pem = body.get("CSR")
        if csr_pem is None or csr_pem == "":
            return cls(thing_name, signature, None, None, timestamp, nonce)
        if not isinstance(csr_pem, str):
            raise MalformedRequest("CSR must be a PEM string", "malformed-csr")
        return cls(thing_name, signature, parse_csr(csr_pem, thing_name), csr_pem, timestamp, nonce)


def _required_text(body: Mapping, field: str) -> str:
    value = body.get(field)
    if value is None or value == "":
        raise MalformedRequest(f"{field} is missing", "missing-field")
    if not isinstance(value, str):
        raise MalformedRequest(f"{field} must be a string", "malformed-request")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates, which no signed text can hold
        raise MalformedRequest(f"{field} is not valid Unicode text", "malformed-request") from None
    return value


def parse_csr(csr_pem: str, thing_name: str) -> x509.CertificateSigningRequest:
    """A CSR the service will sign: each rule that fails is named in the 400 answer."""
    def refuse(rule: str):
        return MalformedRequest(f"CSR refused: {rule}", "malformed-csr")

    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):  # UnicodeEncodeError is a ValueError
        raise refuse("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise refuse("its self-signature is not valid")
    try:  # cryptography parses the subject and extensions only when first read
        names = [n.value for n in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise refuse("its subject or extensions cannot be parsed") from None
    if names != [thing_name]:
        raise refuse(f"the subject CN must be the thing name {thing_name!r}")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise refuse(f"an RSA key must have at least 2048 bits, not {key.key_size}")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise refuse(f"an EC key must be on P-256 or P-384, not {key.curve.name}")
    else:
        raise refuse("the key must be RSA (2048 bits or more) or EC P-256/P-384")
    if constraints is not None and constraints.ca:
        raise refuse("it asks for a CA certificate")
    return csr


@dataclass(frozen=True)
class ProvisioningResult:
    thing_name: str
    choice: RegionChoice
    issued: IssuedCertificate
    note: str | None = None

    def response_body(self) -> dict:
        body = {
            "status": "success",
            "thingName": self.thing_name,
            "region": self.choice.region,
            "distance": self.choice.distance_km,
            "reason": self.choice.reason,
            **({"country": self.choice.country} if self.choice.country else {}),
            "endpointAddress": self.issued.endpoint.address,
            "endpointPort": self.issued.endpoint.port,
            "certificateId": self.issued.certificate_id,
            "certificatePem": self.issued.certificate_pem,
        }
        if self.issued.private_key_pem is not None:
            body["PrivateKey"] = self.issued.private_key_pem
        if self.note:
            body["message"] = self.note
        return body


def key_fingerprint(public_key) -> str:
    """SHA-256 of the SubjectPublicKeyInfo DER, hex: what the registry remembers of a device's key."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return digest.finalize().hex()


class ProvisioningService:
    def __init__(self, registry: Registry, issuer: Issuer, locator: GeoLocator, regions: RegionPolicy,
                 verifier: FleetKeyVerifier, lease_seconds: int = 300,
                 clock: Callable[[], datetime] = utcnow, allow_v1: bool = True, skew_seconds: int = 300,
                 admission: Admission | None = None):
        self._registry = registry
        self._issuer = issuer
        self._locator = locator
        self._regions = regions
        self._verifier = verifier
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._allow_v1 = allow_v1
        self._skew = skew_seconds
        self._admission = admission

    def provision(self, request: ProvisioningRequest, client_ip: str,
                  steps: Steps | None = None) -> ProvisioningResult:
        steps = steps or Steps()
        with steps.step("verify"):
            fleet_key = self._authenticate(request)
        # The region is known before the claim, so the request is admitted against that region's budget
        # (admission control) before it holds a claim or spends any IoT call.
        with steps.step("geo"):
            location = self._locator.locate(client_ip)
            choice = self._regions.choose(location)
        if self._admission is not None:
            with steps.step("admit"):
                try:
                    self._admission.admit(choice.region, server_key=request.csr is None)
                except ServiceUnavailable:
                    # An answer that issues nothing (a lost answer asked for again) is not kept waiting.
                    item = self._registry.get(request.thing_name)
                    if item is None or item.get("prov_status") != PROVISIONED:
                        raise
                    return self._earlier_answer(request, AlreadyProvisioned("", item=item), client_ip)
        with steps.step("claim"):
            now = self._clock()
            # The nonce is recorded only now, for a correctly signed request: nobody can use up a device's.
            nonce = (request.nonce, now.timestamp() + 2 * self._skew) if request.version == 2 else None
            try:
                claim = self._registry.claim(request.thing_name, now, self._lease_seconds, fleet_key, nonce)
            except AlreadyProvisioned as refused:
                return self._earlier_answer(request, refused, client_ip)
        issued, issuing = None, False
        try:
            with steps.step("issue"):
                issuing = True
                issued = self._issuer.issue(request.thing_name, choice.region, request.csr)
            with steps.step("finalize"):
                public_key = (request.csr.public_key() if request.csr is not None
                              else x509.load_pem_x509_certificate(issued.certificate_pem.encode()).public_key())
                self._registry.finalize(claim, choice.region, issued.certificate_id, self._clock(),
                                        key_fingerprint(public_key), choice.country, choice.reason)
        except Exception as exc:
            with steps.step("rollback"):
                self._undo(claim, issued, exc)
                if issuing and self._admission is not None:  # the undo's IoT calls are paid from the budget
                    self._admission.rollback(choice.region)
            if isinstance(exc, ProvisioningError):
                raise
            raise ServiceUnavailable("provisioning failed on the server side; try again later") from exc
        note = None if choice.reason != "default" else (
            f"location of {client_ip} is unknown; using the default region {choice.region}")
        return ProvisioningResult(request.thing_name, choice, issued, note)

    def _authenticate(self, request: ProvisioningRequest) -> bool:
        """Check the signature before anything changes; returns whether the fleet key made it.

        A request the fleet key did not sign may be signed by the device's own key; an unknown device and a
        wrong signature get the same answer, so a caller cannot learn which devices exist.
        """
        now = self._clock()
        if request.version == 1 and not self._allow_v1:
            raise SignatureInvalid("this service accepts only signed requests v2 (timestamp, nonce)", "v1-refused")
        if request.version == 2:
            skew = abs((now - parse_timestamp(request.timestamp)).total_seconds())
            if skew > self._skew:
                raise SignatureInvalid(f"the timestamp is {skew:.0f} s away from the server's clock "
                                       f"(at most {self._skew} s allowed)", "stale-timestamp")
        text = request.signed_text()
        fleet_key = self._verifier.verifies(text, request.signature)
        if not fleet_key:
            item = self._registry.get(request.thing_name)
            pem = (item or {}).get("public_key")
            try:
                device_key = load_device_key(pem) if pem else None
            except ValueError:  # registered with a key the CLI would have refused: say so, refuse the device
                log.error("the registered public key of %s cannot be used", request.thing_name)
                device_key = None
            if device_key is None or not verifies(device_key, text, request.signature):
                raise SignatureInvalid(REFUSED)
        return fleet_key

    def _earlier_answer(self, request: ProvisioningRequest, refused: AlreadyProvisioned,
                        client_ip: str) -> ProvisioningResult:
        """A provisioned device asks again: its earlier answer was lost. With the same key (CSR) it gets the
        same certificate, and nothing is created; a server-made key was never kept, so that needs a reset."""
        item = refused.item
        if request.csr is None:
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned and its server-made key is not "
                                     "kept; an operator must reset it (admin reset) before it can provision again")
        if item.get("public_key_fingerprint") != key_fingerprint(request.csr.public_key()):
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned with another key")
        region, certificate_id = item["aws_region"], item["certificate_id"]
        cert = self._issuer.certificate(certificate_id, region)
        if cert is None or cert["status"] != "ACTIVE":
            raise AlreadyProvisioned(f"{request.thing_name} is provisioned but its certificate is no longer active; "
                                     "an operator must reset it (admin reset)")
        location = self._locator.locate(client_ip)
        choice = RegionChoice(region, self._regions.distance_km(location, region), "previous",
                              location.country if location else None)
        issued = IssuedCertificate(region, certificate_id, cert["certificate_pem"], self._issuer.endpoint(region),
                                   thing_name=request.thing_name)
        return ProvisioningResult(request.thing_name, choice, issued,
                                  "already provisioned with this key: the same certificate again")

    def _undo(self, claim, issued: IssuedCertificate | None, cause: Exception) -> None:
        """Compensate in reverse order. A failure here is logged and never hides the original error; the claim
        is released anyway (no stuck device) with last_error naming what is left for the audit."""
        log.error("provisioning %s failed, rolling back: %s: %s", claim.thing_name, type(cause).__name__, cause)
        error = f"{type(cause).__name__}: {cause}"
        if getattr(cause, "leftover", None):  # the issuer could not undo all of its own steps
            error = f"rollback incomplete, {cause.leftover}; {error}"
        if issued is not None:
            try:
                self._issuer.revoke(issued)
            except Exception:
                log.exception("rollback of %s incomplete: certificate %s in %s may still be active",
                              claim.thing_name, issued.certificate_id, issued.region)
                error = f"rollback incomplete, certificate {issued.certificate_id} in {issued.region}; {error}"
        try:
            self._registry.release(claim, error[:500])
        except Exception:
            log.exception("could not release the claim on %s; it frees itself when the lease ends",
                          claim.thing_name)
