"""The composition root: the one place that reads the stage's Settings, chooses the backends and builds each
collaborator, lazily and once per container. A process has one (app.py's); tests build their own.

Both services share what the container built: one registry, one issuer with its admission gate, one locator
(one geolocation cache), one admission, one SSM reader per parameter, one thread pool per use. Backends are
imported only when the stage uses them, so the local stage never imports botocore.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from chalicelib.adapters.geo import Backoff, CachingLocator, FallbackLocator, IpstackLocator, MaxMindLocator
from chalicelib.config import Settings
from chalicelib.domain.admission import DEFAULT_BUDGET, budgets_from
from chalicelib.domain.clock import utcnow
from chalicelib.domain.errors import ConfigError
from chalicelib.domain.regions import RegionPolicy
from chalicelib.domain.relocation import RelocationPolicy
from chalicelib.domain.signatures import FleetKeyVerifier
from chalicelib.ports.geo import GeoLocator
from chalicelib.ports.registry import RenewalRegistry
from chalicelib.services.admission import Admission
from chalicelib.services.provisioning import ProvisioningService
from chalicelib.services.renewal import RenewalService
from chalicelib.services.saga import Checkpoint, no_checkpoint

if TYPE_CHECKING:
    from chalicelib.adapters.aws import AwsClients, SsmSecret
    from chalicelib.adapters.issuers.aws_iot import AwsIotIssuer
    from chalicelib.adapters.issuers.local_ca import LocalIssuer
    from chalicelib.edge.health import Health, Probe

T = TypeVar("T")
# Worker threads per pool: admission decides beside the claim; the registry reads side by side while registering;
# AWS IoT's issue() runs its calls two by two, a revocation three then two.
POOL_SIZES = {"admission": 4, "registry": 4, "aws-iot": 8}
KNOWN_IP = "81.2.69.142"  # London in every GeoLite2 and DB-IP build: the geolocation probe's question


class Container:
    """`settings`: the stage's (default: read from the environment on first use, as Lambda and chalice local
    give it). `checkpoint` (crash tests): called at each stage of an issuance (services/saga.py). `clock`
    (tests): the services' time.
    `health_cache_seconds` (tests): /health's answer is cached that long (edge/health.py's default otherwise).
    `given`: parts made elsewhere, by name (`aws=` clients a benchmark's simulated containers share, a test's
    `registry=` or `ipstack_backoff=`); the container builds the others around them."""

    def __init__(self, settings: Settings | None = None, *, checkpoint: Checkpoint = no_checkpoint,
                 clock: Callable[[], datetime] = utcnow, health_cache_seconds: float | None = None,
                 **given: Any) -> None:
        self._settings = settings
        self._clock = clock
        self._health_cache = health_cache_seconds
        self._checkpoint = checkpoint
        unknown = set(given) - {name for name, value in vars(Container).items() if isinstance(value, property)}
        if unknown:
            raise TypeError(f"Container has no part {', '.join(sorted(unknown))}")
        self._parts: dict[str, Any] = {name: part for name, part in given.items() if part is not None}
        self._lock = threading.RLock()  # building one part builds the parts it needs

    def _once(self, name: str, make: Callable[[], T]) -> Any:
        try:
            return self._parts[name]
        except KeyError:
            pass
        with self._lock:
            if name not in self._parts:
                self._parts[name] = make()
            return self._parts[name]

    @property
    def settings(self) -> Settings:
        return self._once("settings", lambda: self._settings or Settings.from_env())

    def validate(self) -> None:
        """Fail at startup, not on the first device, when the stage's settings are wrong (cheap: no I/O)."""
        assert self.regions is not None and self.relocation is not None

    def pool(self, name: str) -> ThreadPoolExecutor:
        """One thread pool per use for the container's life, made on first use (never at import)."""
        return self._once(f"pool:{name}", lambda: ThreadPoolExecutor(max_workers=POOL_SIZES[name],
                                                                     thread_name_prefix=name))

    @property
    def aws(self) -> AwsClients:
        def make() -> AwsClients:
            from chalicelib.adapters.aws import AwsClients
            return AwsClients()
        return self._once("aws", make)

    @property
    def regions(self) -> RegionPolicy:
        def make() -> RegionPolicy:
            config = self.settings
            try:
                return RegionPolicy.from_rules(config.enabled_regions, config.default_region, config.region_rules)
            except ConfigError as exc:
                raise ConfigError(f"region policy (GIP_ENABLED_REGIONS, GIP_DEFAULT_REGION, GIP_REGION_RULES): "
                                  f"{exc}") from None
        return self._once("regions", make)

    @property
    def relocation(self) -> RelocationPolicy:
        return self._once("relocation", lambda: RelocationPolicy.parse(self.settings.relocation))

    @property
    def registry(self) -> RenewalRegistry:
        def make() -> RenewalRegistry:
            config = self.settings
            if config.registry == "dynamodb":
                from chalicelib.adapters.registry.dynamodb import DynamoDbRegistry
                return DynamoDbRegistry(self.aws.client("dynamodb"), config.table_name, executor=self.pool("registry"))
            from chalicelib.adapters.registry.sqlite import SqliteRegistry
            return SqliteRegistry(config.registry_path)
        return self._once("registry", make)

    @property
    def admission(self) -> Admission | None:
        """Admission control per region (None when off); the schedule lives where the registry does, so every
        container of the stage shares it."""
        def make() -> Admission | None:
            config = self.settings
            if not config.admission:
                return None
            if config.registry == "dynamodb":
                from chalicelib.adapters.admission.dynamodb import DynamoDbAdmissionStore
                store: Any = DynamoDbAdmissionStore(self.aws.client("dynamodb"), f"{config.table_name}-nonces")
            else:
                from chalicelib.adapters.admission.sqlite import SqliteAdmissionStore
                store = SqliteAdmissionStore(config.registry_path)
            return Admission(store, budgets_from(config.admission_rates, DEFAULT_BUDGET),
                             executor=self.pool("admission"))
        return self._once("admission", make)

    @property
    def issuer(self) -> LocalIssuer | AwsIotIssuer:
        """The stage's issuer: the hot path and the audit's inventory. On AWS, the calls admission pays for go
        through clients without botocore's retries and report their throttles to admission."""
        def make() -> LocalIssuer | AwsIotIssuer:
            config = self.settings
            if config.issuer == "aws-iot":
                from chalicelib.adapters.issuers.aws_iot import AwsIotIssuer
                from chalicelib.adapters.issuers.endpoints_dynamodb import DynamoDbEndpoints
                clients, gate = self.aws, self.admission
                shared = (DynamoDbEndpoints(clients.client("dynamodb"), f"{config.table_name}-nonces")
                          if config.registry == "dynamodb" else None)
                return AwsIotIssuer(lambda region: clients.client("iot", region), self.pool("aws-iot"),
                                    mutating_client_for_region=lambda region: clients.client("iot", region,
                                                                                             retries=False),
                                    on_throttle=gate.throttled if gate is not None else None,
                                    shared_endpoints=shared)
            from chalicelib.adapters.issuers.local_ca import LocalIssuer, StackRevocations, local_endpoints
            # A revocation returns once the running local stack's brokers refuse it (at once when no stack runs).
            return LocalIssuer(config.ca_dir, local_endpoints(self.regions.enabled, config.mqtt_host,
                                                              config.mqtt_base_port),
                               validity_days=config.cert_validity_days, enforce=StackRevocations(config.state_dir))
        return self._once("issuer", make)

    @property
    def ipstack_backoff(self) -> Backoff:
        """One per container: every ipstack call and the key's reader share it; /health reports its outage."""
        return self._once("ipstack_backoff", lambda: Backoff("ipstack"))

    @property
    def ipstack_key(self) -> SsmSecret | None:
        def make() -> SsmSecret | None:
            if not self.settings.ipstack_key_parameter:
                return None
            from chalicelib.adapters.aws import SsmSecret
            return SsmSecret(self.aws.client("ssm"), self.settings.ipstack_key_parameter)
        return self._once("ipstack_key", make)

    @property
    def locator(self) -> GeoLocator:
        """ipstack (key in SSM) and/or a MaxMind City file when configured, then the bundled DB-IP City Lite file;
        one cache in front of them all."""
        def make() -> GeoLocator:
            config = self.settings
            providers: list[GeoLocator] = []
            key = self.ipstack_key
            if key is not None:
                from chalicelib.adapters.geo import HttpGet
                providers.append(IpstackLocator(HttpGet(), key, url=config.ipstack_url, backoff=self.ipstack_backoff))
            if config.maxmind_db:
                providers.append(MaxMindLocator.open(config.maxmind_db))
            providers.append(MaxMindLocator.bundled())
            return CachingLocator(providers[0] if len(providers) == 1 else FallbackLocator(providers))
        return self._once("locator", make)

    @property
    def fleet_verifier(self) -> FleetKeyVerifier:
        def make() -> FleetKeyVerifier:
            config = self.settings
            if config.fleet_public_key_parameter:  # prod: in SSM, read on first use (adapters/fleet_keys.py)
                from chalicelib.adapters.fleet_keys import SsmFleetKeyVerifier
                return SsmFleetKeyVerifier(self.aws.client("ssm"), config.fleet_public_key_parameter)
            from chalicelib.adapters.fleet_keys import load_public_key
            return FleetKeyVerifier(load_public_key(config.fleet_public_key),
                                    *([load_public_key(config.previous_fleet_public_key)]
                                      if config.previous_fleet_public_key else []))
        return self._once("fleet_verifier", make)

    @property
    def renewal(self) -> RenewalService:
        def make() -> RenewalService:
            config = self.settings
            return RenewalService(registry=self.registry, issuer=self.issuer, locator=self.locator,
                                  regions=self.regions, relocation=self.relocation,
                                  lease_seconds=config.claim_lease_seconds, skew_seconds=config.timestamp_skew_seconds,
                                  admission=self.admission, budget_seconds=config.request_budget_seconds,
                                  lease_margin_seconds=config.claim_lease_margin_seconds, checkpoint=self._checkpoint,
                                  clock=self._clock)
        return self._once("renewal", make)

    @property
    def provisioning(self) -> ProvisioningService:
        def make() -> ProvisioningService:
            config = self.settings
            return ProvisioningService(
                registry=self.registry, issuer=self.issuer, admission=self.admission, locator=self.locator,
                regions=self.regions, verifier=self.fleet_verifier, lease_seconds=config.claim_lease_seconds,
                allow_v1=config.allow_v1, skew_seconds=config.timestamp_skew_seconds,
                budget_seconds=config.request_budget_seconds, lease_margin_seconds=config.claim_lease_margin_seconds,
                checkpoint=self._checkpoint, clock=self._clock,
                # A re-key is a renewal in place: the renewal service, with the same parts.
                rekeyer=self.renewal if config.rekey_window_seconds else None,
                rekey_window_seconds=config.rekey_window_seconds)
        return self._once("provisioning", make)

    @property
    def health(self) -> Health:
        def make() -> Health:
            from chalicelib.edge.health import CACHE_SECONDS, Health, log_and_count
            ttl = CACHE_SECONDS if self._health_cache is None else self._health_cache
            return Health(self.health_probes(), log_and_count, ttl=ttl)
        return self._once("health", make)

    def health_probes(self) -> dict[str, Probe]:
        """What provisioning needs, each checked cheaply (edge/health.py), on the parts the services use."""
        config = self.settings

        def registry_probe() -> None:
            self.registry.check()

        def issuer_probe() -> None:
            self.issuer.check(config.enabled_regions)

        def geolocation_probe() -> str | dict[str, str] | None:
            database = self._once("geo_probe_db", lambda: MaxMindLocator.open(config.maxmind_db)
                                  if config.maxmind_db else MaxMindLocator.bundled())
            if database.locate(KNOWN_IP) is None:
                raise RuntimeError("the geolocation database gives no location")
            key = self.ipstack_key
            if key is None:
                return None
            from chalicelib.edge.health import provider_outage
            fallback = "the MaxMind file" if config.maxmind_db else "the bundled database"
            outage = self.ipstack_backoff.outage()
            if outage is not None:
                return provider_outage(outage, fallback)
            if key() is None:
                reading = key.backoff.outage()
                if reading is None:
                    return f"ipstack is not usable (its key cannot be read); running on {fallback}"
                return provider_outage({**reading, "provider": "ipstack",
                                        "reason": f"its key cannot be read: {reading['reason']}"}, fallback)
            return None

        def fleet_key_probe() -> None:  # the file, or on prod the SSM parameter: a missing one raises
            if not self.fleet_verifier.keys:
                raise RuntimeError("no fleet public key")

        probes: dict[str, Probe] = {"registry": registry_probe, "issuer": issuer_probe,
                                    "geolocation": geolocation_probe, "fleet_key": fleet_key_probe}
        if config.registry == "sqlite":  # the local stage: its state directory's room, and the stack serving it
            from chalicelib.adapters.issuers.local_ca import stack_status_path
            from chalicelib.edge.health import free_space_probe, served_by_stack, stack_probes
            probes["free_space"] = free_space_probe(config.state_dir)
            if served_by_stack(stack_status_path(config.state_dir)):
                probes.update(stack_probes(stack_status_path(config.state_dir)))
        return probes
