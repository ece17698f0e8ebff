"""Day one: POST /device-provisioning. Verify the signature, locate the caller, choose the region, then the one
issuance sequence (services/saga.py) with the provisioning plan; a provisioned device asking again gets its earlier
answer (same key: the same certificate) or, with a server-made key lost with its answer, a re-key."""
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Protocol

from chalicelib.domain import deadline as deadlines
from chalicelib.domain.certificates import Certified, IssuedCertificate
from chalicelib.domain.clock import utcnow
from chalicelib.domain.deadline import DEFAULT_BUDGET_SECONDS, LEASE_MARGIN_SECONDS, Deadline
from chalicelib.domain.errors import REFUSED, AlreadyProvisioned, ServiceUnavailable, SignatureInvalid
from chalicelib.domain.keypolicy import key_fingerprint
from chalicelib.domain.records import PROVISIONED, Claim, Nonce
from chalicelib.domain.regions import RegionChoice, RegionPolicy
from chalicelib.domain.requests import ProvisioningRequest
from chalicelib.domain.signatures import FleetKeyVerifier, load_device_key, verifies
from chalicelib.domain.steps import Steps
from chalicelib.ports.geo import GeoLocator
from chalicelib.ports.issuer import Issuer
from chalicelib.ports.registry import RenewalRegistry
from chalicelib.services.admission import Admission
from chalicelib.services.saga import Checkpoint, Plan, Saga, no_checkpoint

log = logging.getLogger(__name__)
REUSED = "an earlier attempt with this key was interrupted: its certificate, not a second one"


@dataclass(frozen=True)
class ProvisioningResult:
    """What a provisioning produced; `edge.wire.response_body` says it to the device."""

    thing_name: str
    choice: RegionChoice
    issued: IssuedCertificate
    note: str | None = None


class Reissued(Protocol):
    @property
    def choice(self) -> RegionChoice: ...

    @property
    def issued(self) -> IssuedCertificate: ...


class Rekeyer(Protocol):
    """Gives a device provisioned with a server-made key a new certificate and key (services.renewal)."""

    def rekey(self, thing_name: str, client_ip: str, fleet_key: bool, window_seconds: int,
              steps: Steps | None = None, deadline: Deadline | None = None) -> Reissued: ...


class NewDevice(Plan):
    """Provisioning's plan: the claim (with the nonce) of an unprovisioned device; the commit makes it provisioned."""

    kind = "provisioning"
    commit_step = "finalize"

    def __init__(self, service: "ProvisioningService", request: ProvisioningRequest, fleet_key: bool,
                 choice: RegionChoice, distance_km: Callable[[str], float | None]) -> None:
        self.thing_name, self.region, self.csr = request.thing_name, choice.region, request.csr
        self.choice = choice
        self.note: str | None = None
        self.refused: AlreadyProvisioned | None = None
        self._service, self._request, self._fleet_key, self._distance = service, request, fleet_key, distance_km

    def claim(self, now: datetime, lease_seconds: int) -> Claim:
        # The nonce is recorded only now, for a correctly signed request: nobody can use up a device's.
        nonce = (Nonce(self._request.nonce, now + timedelta(seconds=2 * self._service.skew))
                 if self._request.nonce is not None else None)
        try:
            return self._service.registry.claim(self.thing_name, now, lease_seconds, self._fleet_key, nonce)
        except AlreadyProvisioned as refused:  # the device asks again: its earlier answer (or a re-key)
            self.refused = refused
            raise

    def reused(self, issued: IssuedCertificate) -> None:
        self.choice = RegionChoice(issued.region, self._distance(issued.region), "previous", self.choice.country)
        self.note = REUSED

    def commit(self, claim: Claim, certified: Certified, now: datetime) -> None:
        issued = certified.issued
        self._service.registry.finalize(claim, issued.region, issued.certificate_id, now, certified.fingerprint,
                                        self.choice.country, self.choice.reason, certified.public_key,
                                        certified.expires, server_key=certified.server_key)


class ProvisioningService:
    def __init__(self, registry: RenewalRegistry, issuer: Issuer, locator: GeoLocator, regions: RegionPolicy,
                 verifier: FleetKeyVerifier, lease_seconds: int | None = None,
                 clock: Callable[[], datetime] = utcnow, allow_v1: bool = True, skew_seconds: int = 300,
                 budget_seconds: float = DEFAULT_BUDGET_SECONDS, lease_margin_seconds: int = LEASE_MARGIN_SECONDS,
                 checkpoint: Checkpoint = no_checkpoint, admission: Admission | None = None,
                 rekeyer: Rekeyer | None = None, rekey_window_seconds: int = 0) -> None:
        self.registry = registry
        self.issuer = issuer
        self._locator = locator
        self._regions = regions
        self._verifier = verifier
        self._budget = budget_seconds
        self._clock = clock
        self._allow_v1 = allow_v1
        self.skew = skew_seconds
        self._saga = Saga(registry, issuer, admission, lease_seconds, lease_margin_seconds, clock, checkpoint)
        self._rekeyer = rekeyer if rekey_window_seconds else None  # 0: no re-key, an operator resets
        self._rekey_window = rekey_window_seconds

    def provision(self, request: ProvisioningRequest, client_ip: str, steps: Steps | None = None,
                  deadline: Deadline | None = None) -> ProvisioningResult:
        deadline = deadline or Deadline(self._budget)
        steps = steps or Steps()
        with deadlines.running(deadline):
            with steps.step("verify"):
                fleet_key = self._authenticate(request)
            # The region is known before the claim, so the request is admitted against that region's budget.
            with steps.step("geo"):
                location = self._locator.locate(client_ip)
                choice = self._regions.choose(location)
            plan = NewDevice(self, request, fleet_key, choice, lambda region: self._regions.distance_km(location,
                                                                                                        region))
            try:
                issued, _ = self._saga.run(plan, steps, deadline)
            except AlreadyProvisioned as refused:
                if refused is not plan.refused:  # a thing another certificate uses (issuer): a refusal of its own
                    raise
                return self._earlier_answer(request, refused, client_ip, fleet_key, steps, deadline)
            except ServiceUnavailable as busy:
                # An answer that issues nothing (a lost answer asked for again with its key) is not kept waiting.
                record = self.registry.get(request.thing_name) if busy.code == "admission-control" else None
                if record is None or record.status is not PROVISIONED or request.csr is None:
                    raise
                return self._earlier_answer(request, AlreadyProvisioned("", record=record), client_ip, fleet_key,
                                            steps, deadline)
        note = plan.note or (None if plan.choice.reason != "default" else
                             f"location of {client_ip} is unknown; using the default region {plan.choice.region}")
        return ProvisioningResult(request.thing_name, plan.choice, issued, note)

    def _authenticate(self, request: ProvisioningRequest) -> bool:
        """Check the signature before anything changes; returns whether the fleet key made it.

        A request the fleet key did not sign may be signed by the device's own key; an unknown device and a
        wrong signature get the same answer, so a caller cannot learn which devices exist.
        """
        now = self._clock()
        if request.version == 1 and not self._allow_v1:
            raise SignatureInvalid("this service accepts only signed requests v2 (timestamp, nonce)", "v1-refused")
        if request.timestamp is not None:
            skew = abs((now - request.timestamp).total_seconds())
            if skew > self.skew:
                raise SignatureInvalid(f"the timestamp is {skew:.0f} s away from the server's clock "
                                       f"(at most {self.skew} s allowed)", "stale-timestamp")
        text = request.signed_text()
        fleet_key = self._verifier.verifies(text, request.signature)
        if not fleet_key:
            record = self.registry.get(request.thing_name)
            pem = record.public_key if record else None
            try:
                device_key = load_device_key(pem) if pem else None
            except ValueError:  # registered with a key the CLI would have refused: say so, refuse the device
                log.error("the registered public key of %s cannot be used", request.thing_name)
                device_key = None
            if device_key is None or not verifies(device_key, text, request.signature):
                raise SignatureInvalid(REFUSED)
        return fleet_key

    def _earlier_answer(self, request: ProvisioningRequest, refused: AlreadyProvisioned, client_ip: str,
                        fleet_key: bool, steps: Steps, deadline: Deadline) -> ProvisioningResult:
        """A provisioned device asks again: its earlier answer was lost. With the same key (CSR) it gets the
        same certificate, and nothing is created. A server-made key was never kept: within the re-key window the
        device gets a new certificate and key and the previous certificate is revoked (services.renewal);
        after it, an operator resets the device."""
        record = refused.record
        if request.csr is None:
            if self._rekeyer is not None and record is not None and record.server_key:
                if request.version == 1:  # never changes: whoever saw it once would get the key (docs, security)
                    raise AlreadyProvisioned(f"{request.thing_name} is already provisioned; a request signed v1 can "
                                             "be replayed, so it is never re-keyed: ask again signed v2 within the "
                                             "re-key window, or an operator resets it (admin reset)")
                rekeyed = self._rekeyer.rekey(request.thing_name, client_ip, fleet_key, self._rekey_window, steps,
                                              deadline)
                return ProvisioningResult(request.thing_name, rekeyed.choice, rekeyed.issued,
                                          "the earlier answer's key was made here and is not kept: a new certificate "
                                          "and key, the previous certificate revoked")
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned and its server-made key is not "
                                     "kept; an operator must reset it (admin reset) before it can provision again")
        if record is None or record.key_fingerprint != key_fingerprint(request.csr.public_key()):
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned with another key")
        region, certificate_id = record.region, record.certificate_id
        cert = self.issuer.certificate(certificate_id, region) if region and certificate_id else None
        if region is None or cert is None or not cert.active or cert.certificate_pem is None:
            raise AlreadyProvisioned(f"{request.thing_name} is provisioned but its certificate is no longer active; "
                                     "an operator must reset it (admin reset)")
        location = self._locator.locate(client_ip)
        choice = RegionChoice(region, self._regions.distance_km(location, region), "previous",
                              location.country if location else None)
        issued = IssuedCertificate(region, cert.certificate_id, cert.certificate_pem, self.issuer.endpoint(region),
                                   thing_name=request.thing_name)
        return ProvisioningResult(request.thing_name, choice, issued,
                                  "already provisioned with this key: the same certificate again")
