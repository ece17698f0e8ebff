"""Day one, POST /device-provisioning: verify the signature, locate the caller, choose the region, then the one
issuance sequence (services/saga.py) with the provisioning plan. A provisioned device asking again gets its
earlier answer (the same key: the same certificate), or with a server-made key lost with its answer a re-key."""
import logging
from datetime import datetime
from typing import Callable

from chalicelib.domain import deadline as deadlines
from chalicelib.domain.answers import Answer
from chalicelib.domain.certificates import Certified, IssuedCertificate
from chalicelib.domain.clock import utcnow
from chalicelib.domain.deadline import DEFAULT_BUDGET_SECONDS, LEASE_MARGIN_SECONDS, Deadline
from chalicelib.domain.decoys import signed_by
from chalicelib.domain.errors import REFUSED, AlreadyProvisioned, ServiceUnavailable, SignatureInvalid
from chalicelib.domain.keypolicy import key_fingerprint
from chalicelib.domain.records import PROVISIONED, Claim, PendingIssue
from chalicelib.domain.regions import Location, RegionPolicy
from chalicelib.domain.requests import ProvisioningRequest, check_fresh, remembered
from chalicelib.domain.signatures import FleetKeyVerifier, load_device_key
from chalicelib.domain.steps import Steps
from chalicelib.ports.geo import GeoLocator
from chalicelib.ports.issuer import Issuer
from chalicelib.ports.registry import RenewalRegistry
from chalicelib.services.admission import Admission
from chalicelib.services.renewal import RenewalService
from chalicelib.services.saga import Checkpoint, Plan, Saga, again, no_checkpoint

log = logging.getLogger(__name__)


class NewDevice(Plan):
    """The provisioning plan: the claim of an unprovisioned device (with the v2 nonce); the commit finalizes it."""

    kind, commit_step = "provisioning", "finalize"

    def __init__(self, service: "ProvisioningService", request: ProvisioningRequest, fleet_key: bool,
                 location: Location | None) -> None:
        self.choice = choice = service.regions.choose(location)
        self.thing_name, self.region, self.csr = request.thing_name, choice.region, request.csr
        self.note: str | None = None
        self.refused: AlreadyProvisioned | None = None  # the claim's refusal: the device is provisioned already
        self._service, self._request, self._fleet_key, self._location = service, request, fleet_key, location

    def claim(self, now: datetime, lease_seconds: int, intent: PendingIssue) -> Claim:
        # The nonce is recorded only now, for a correctly signed request: nobody can use up a device's.
        nonce = remembered(self._request.nonce, now, self._service.skew) if self._request.nonce is not None else None
        try:
            return self._service.registry.claim(self.thing_name, now, lease_seconds, self._fleet_key, nonce, intent)
        except AlreadyProvisioned as refused:
            self.refused = refused
            raise

    def reused(self, issued: IssuedCertificate) -> None:
        self.choice = self._service.regions.place(self._location, issued.region, "previous")
        self.note = "an earlier attempt with this key was interrupted: its certificate, not a second one"

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
                 rekeyer: RenewalService | None = None, rekey_window_seconds: int = 0) -> None:
        self.registry, self.issuer, self._locator, self.regions = registry, issuer, locator, regions
        self._verifier, self._budget, self._clock = verifier, budget_seconds, clock
        self._allow_v1, self.skew = allow_v1, skew_seconds
        self._saga = Saga(registry, issuer, admission, lease_seconds, lease_margin_seconds, clock, checkpoint)
        self._rekeyer = rekeyer if rekey_window_seconds else None  # 0: no re-key, an operator resets
        self._rekey_window = rekey_window_seconds

    def provision(self, request: ProvisioningRequest, client_ip: str, steps: Steps | None = None,
                  deadline: Deadline | None = None) -> Answer:
        deadline, steps = deadline or Deadline(self._budget), steps or Steps()
        with deadlines.running(deadline):
            with steps.step("verify"):
                fleet_key = self._authenticate(request)
            with steps.step("geo"):  # the region is known before the claim: admission charges that region
                plan = NewDevice(self, request, fleet_key, self._locator.locate(client_ip))
            try:
                issued, _ = self._saga.run(plan, steps, deadline)
            except AlreadyProvisioned as refused:
                if refused is not plan.refused:  # a thing another certificate uses: a refusal of its own
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
        return Answer(request.thing_name, plan.choice, issued, note)

    def _authenticate(self, request: ProvisioningRequest) -> bool:
        """Check the signature before anything changes; returns whether the fleet key made it. A request the
        fleet key did not sign may be signed by the device's own key; an unknown device and a wrong signature get
        the same answer, so a caller cannot learn which devices exist."""
        if request.version == 1 and not self._allow_v1:
            raise SignatureInvalid("this service accepts only signed requests v2 (timestamp, nonce)", "v1-refused")
        if request.timestamp is not None:
            check_fresh(request.timestamp, self._clock(), self.skew)
        text = request.signed_text()
        if self._verifier.verifies(text, request.signature):
            return True
        record = self.registry.get(request.thing_name)
        try:  # the same work for a device that is unknown or has no key of its own (domain/decoys.py)
            own = signed_by(record.public_key if record else None, text, request.signature, load_device_key)
        except ValueError:  # registered with a key the CLI would have refused: say so, refuse the device
            log.error("the registered public key of %s cannot be used", request.thing_name)
            own = False
        if not own:
            raise SignatureInvalid(REFUSED)
        return False

    def _earlier_answer(self, request: ProvisioningRequest, refused: AlreadyProvisioned, client_ip: str,
                        fleet_key: bool, steps: Steps, deadline: Deadline) -> Answer:
        """A provisioned device asks again: its earlier answer was lost. With the same key (CSR) it gets the same
        certificate, and nothing is made. A server-made key was never kept: within the re-key window a request
        signed v2 gets a new certificate and key, the previous one revoked; after it, an operator resets."""
        record = refused.record
        if request.csr is None:
            if self._rekeyer is not None and record is not None and record.server_key:
                if request.version == 1:  # never changes: whoever saw it once would get the key (docs/security.md)
                    raise AlreadyProvisioned(f"{request.thing_name} is already provisioned; a request signed v1 can "
                                             "be replayed, so it is never re-keyed: ask again signed v2 within the "
                                             "re-key window, or an operator resets it (admin reset)")
                rekeyed = self._rekeyer.rekey(request.thing_name, client_ip, fleet_key, self._rekey_window, steps,
                                              deadline)
                return Answer(request.thing_name, rekeyed.choice, rekeyed.issued,
                              "the earlier answer's key was made here and is not kept: a new certificate and key, "
                              "the previous certificate revoked")
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned and its server-made key is not "
                                     "kept; an operator must reset it (admin reset) before it can provision again")
        if record is None or record.key_fingerprint != key_fingerprint(request.csr.public_key()):
            raise AlreadyProvisioned(f"{request.thing_name} is already provisioned with another key")
        region, certificate_id = record.region, record.certificate_id
        issued = again(self.issuer, request.thing_name, region, certificate_id) if region and certificate_id else None
        if region is None or issued is None:
            raise AlreadyProvisioned(f"{request.thing_name} is provisioned but its certificate is no longer active; "
                                     "an operator must reset it (admin reset)")
        return Answer(request.thing_name, self.regions.place(self._locator.locate(client_ip), region, "previous"),
                      issued, "already provisioned with this key: the same certificate again")
