"""The one place where the stage's collaborators are built: lazily, once per process, reset for tests.

Backends are imported only when the stage uses them, so the local stage never imports boto3.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from chalicelib.admission import DEFAULT_BUDGET, Admission, AdmissionStore, budgets_from
from chalicelib.config import Settings
from chalicelib.errors import ConfigError
from chalicelib.geo import Backoff, CachingLocator, FallbackLocator, GeoLocator, IpstackLocator, MaxMindLocator
from chalicelib.provisioning import ProvisioningService, no_checkpoint
from chalicelib.regions import RegionPolicy
from chalicelib.registry.base import RenewalRegistry
from chalicelib.relocation import RelocationPolicy
from chalicelib.renewal import RenewalService
from chalicelib.signatures import FleetKeyVerifier, load_public_key

if TYPE_CHECKING:
    from chalicelib.aws import AwsClients
    from chalicelib.health import Health, Probe
    from chalicelib.issuers.aws_iot import AwsIotIssuer
    from chalicelib.issuers.local_ca import LocalIssuer

_lock = threading.Lock()
_settings: Settings | None = None
_service: ProvisioningService | None = None
_ipstack_key: Any = None  # the ipstack key's reader, when the stage uses ipstack (health tells whether it works)
_ipstack_backoff: Backoff | None = None  # one per process: every locator shares it, /health reports its outage
_renewal: RenewalService | None = None
_aws: AwsClients | None = None
_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()  # not _lock: service() holds that while it builds what needs a pool
# Worker threads per pool: the registry runs a v2 claim's two DynamoDB writes side by side; AWS IoT's issue()
# runs its four calls side by side.
_POOL_SIZES = {"registry": 4, "aws-iot": 8}


def pool(name: str) -> ThreadPoolExecutor:
    """One thread pool per use for the process's life, made on first use (never at import)."""
    with _pools_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(max_workers=_POOL_SIZES[name], thread_name_prefix=name)
        return _pools[name]


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def aws_clients() -> AwsClients:
    global _aws
    if _aws is None:
        from chalicelib.aws import AwsClients
        _aws = AwsClients()
    return _aws


def region_policy(config: Settings) -> RegionPolicy:
    try:
        return RegionPolicy.from_rules(config.enabled_regions, config.default_region, config.region_rules)
    except ConfigError as exc:
        raise ConfigError(f"region policy (GIP_ENABLED_REGIONS, GIP_DEFAULT_REGION, GIP_REGION_RULES): {exc}") from None


def validate() -> None:
    """Fail at startup, not on the first device, when the stage's settings are wrong (cheap: no I/O)."""
    region_policy(settings())
    RelocationPolicy.parse(settings().relocation)


def registry(config: Settings) -> RenewalRegistry:
    if config.registry == "dynamodb":
        from chalicelib.registry.dynamodb import DynamoDbRegistry
        return DynamoDbRegistry(aws_clients().client("dynamodb"), config.table_name, executor=pool("registry"))
    from chalicelib.registry.sqlite import SqliteRegistry
    return SqliteRegistry(config.registry_path)


def admission(config: Settings) -> Admission:
    """Admission control per region; the schedule lives where the registry does, so every container shares it."""
    store: AdmissionStore
    if config.registry == "dynamodb":
        from chalicelib.registry.admission_dynamodb import DynamoDbAdmissionStore
        store = DynamoDbAdmissionStore(aws_clients().client("dynamodb"), f"{config.table_name}-nonces")
    else:
        from chalicelib.registry.admission_sqlite import SqliteAdmissionStore
        store = SqliteAdmissionStore(config.registry_path)
    return Admission(store, budgets_from(config.admission_rates, DEFAULT_BUDGET if config.admission else None))


def issuer(config: Settings, policy: RegionPolicy | None = None,
           gate: Admission | None = None) -> LocalIssuer | AwsIotIssuer:
    """The stage's issuer: the hot path (`Issuer`) and the audit's inventory (`CertificateInventory`, and
    `ThingInventory` where the backend has things)."""
    if config.issuer == "aws-iot":
        from chalicelib.issuers.aws_iot import AwsIotIssuer
        from chalicelib.registry.endpoints_dynamodb import DynamoDbEndpoints
        clients = aws_clients()
        shared = (DynamoDbEndpoints(clients.client("dynamodb"), f"{config.table_name}-nonces")
                  if config.registry == "dynamodb" else None)
        if gate is None or not config.admission:
            return AwsIotIssuer(lambda region: clients.client("iot", region), pool("aws-iot"),
                                shared_endpoints=shared)
        from chalicelib.aws import without_retries
        from chalicelib.issuers.aws_iot import MUTATING_OPERATIONS

        def mutating(region: str) -> Any:  # the calls admission pays for: the issuer retries them, not botocore
            client = clients.client("iot", region)
            without_retries(client, MUTATING_OPERATIONS)
            return client
        return AwsIotIssuer(lambda region: clients.client("iot", region), pool("aws-iot"),
                            mutating_client_for_region=mutating, on_throttle=gate.throttled, shared_endpoints=shared)
    from chalicelib.issuers.local_ca import LocalIssuer, StackRevocations, local_endpoints
    policy = policy or region_policy(config)
    # A revocation returns once the running local stack's brokers refuse it (at once when no stack runs).
    return LocalIssuer(config.ca_dir, local_endpoints(policy.enabled, config.mqtt_host, config.mqtt_base_port),
                       validity_days=config.cert_validity_days, enforce=StackRevocations(config.state_dir))


def locator(config: Settings) -> GeoLocator:
    """ipstack (key in SSM) and/or a MaxMind City file when configured, then the bundled DB-IP City Lite file."""
    providers: list[GeoLocator] = []
    if config.ipstack_key_parameter:
        from chalicelib.aws import SsmSecret
        from chalicelib.geo import HttpGet
        global _ipstack_key
        key = _ipstack_key = SsmSecret(aws_clients().client("ssm"), config.ipstack_key_parameter)
        providers.append(IpstackLocator(HttpGet(), key, url=config.ipstack_url, backoff=ipstack_backoff()))
    if config.maxmind_db:
        providers.append(MaxMindLocator.open(config.maxmind_db))
    providers.append(MaxMindLocator.bundled())
    return CachingLocator(providers[0] if len(providers) == 1 else FallbackLocator(providers))


def ipstack_backoff() -> Backoff:
    global _ipstack_backoff
    if _ipstack_backoff is None:
        _ipstack_backoff = Backoff("ipstack")
    return _ipstack_backoff


def use_ipstack_backoff(backoff: Backoff) -> None:
    """Hold ipstack off with this back-off (tests: one with its own clock)."""
    global _ipstack_backoff
    _ipstack_backoff = backoff


def fleet_verifier(config: Settings) -> FleetKeyVerifier:
    if config.fleet_public_key_parameter:  # prod: in SSM, read on first use (chalicelib/fleet_keys.py)
        from chalicelib.fleet_keys import SsmFleetKeyVerifier
        return SsmFleetKeyVerifier(aws_clients().client("ssm"), config.fleet_public_key_parameter)
    return FleetKeyVerifier(load_public_key(config.fleet_public_key),
                            *([load_public_key(config.previous_fleet_public_key)]
                              if config.previous_fleet_public_key else []))


def build_service(config: Settings, checkpoint: Callable[[str, str], None] | None = None) -> ProvisioningService:
    """`checkpoint` (tests): called at each step boundary of a provisioning, see ProvisioningService."""
    policy = region_policy(config)
    gate = admission(config) if config.admission else None  # off: no step, no store
    return ProvisioningService(
        registry=registry(config),
        issuer=issuer(config, policy, gate),
        admission=gate,
        locator=locator(config),
        regions=policy,
        verifier=fleet_verifier(config),
        lease_seconds=config.claim_lease_seconds,
        allow_v1=config.allow_v1,
        skew_seconds=config.timestamp_skew_seconds,
        budget_seconds=config.request_budget_seconds,
        lease_margin_seconds=config.claim_lease_margin_seconds,
        checkpoint=checkpoint or no_checkpoint,
        # A re-key is a renewal in place: the same service, with the same checkpoint (crash tests).
        rekeyer=build_renewal_service(config, checkpoint) if config.rekey_window_seconds else None,
        rekey_window_seconds=config.rekey_window_seconds,
    )


_health = None


def health_probes(config: Settings) -> dict[str, Probe]:
    """What provisioning needs, each checked cheaply (see chalicelib/health.py)."""
    known_ip = "81.2.69.142"  # London in every GeoLite2 and DB-IP build
    database: list[GeoLocator] = []

    own: dict[str, Any] = {}

    def part(name: str) -> Any:  # the service's own once built, else our own (a missing fleet key is not theirs)
        if _service is not None:
            return getattr(_service, name)
        if name not in own:
            own[name] = registry(config) if name == "registry" else issuer(config)
        return own[name]

    def registry_probe() -> None:
        part("registry").check()

    def issuer_probe() -> None:
        part("issuer").check(config.enabled_regions)

    def geolocation_probe() -> str | dict[str, str] | None:
        if not database:
            database.append(MaxMindLocator.open(config.maxmind_db) if config.maxmind_db else MaxMindLocator.bundled())
        if database[0].locate(known_ip) is None:
            raise RuntimeError("the geolocation database gives no location")
        if not config.ipstack_key_parameter:
            return None
        from chalicelib.health import provider_outage
        fallback = "the MaxMind file" if config.maxmind_db else "the bundled database"
        outage = _ipstack_backoff.outage() if _ipstack_backoff is not None else None
        if outage is not None:
            return provider_outage(outage, fallback)
        if _ipstack_key is not None and _ipstack_key() is None:
            key = _ipstack_key.backoff.outage()
            if key is None:
                return f"ipstack is not usable (its key cannot be read); running on {fallback}"
            return provider_outage({**key, "provider": "ipstack", "reason": f"its key cannot be read: {key['reason']}"},
                                   fallback)
        return None

    verifier: list[FleetKeyVerifier] = []

    def fleet_key_probe() -> None:  # the file, or on prod the SSM parameter: a missing one raises
        if not verifier:
            verifier.append(fleet_verifier(config))
        if not verifier[0].keys:
            raise RuntimeError("no fleet public key")

    probes: dict[str, Probe] = {"registry": registry_probe, "issuer": issuer_probe,
                                "geolocation": geolocation_probe, "fleet_key": fleet_key_probe}
    if config.registry == "sqlite":  # the local stage: its state directory's room, and the stack serving it if any
        from chalicelib.health import free_space_probe, served_by_stack, stack_probes
        from chalicelib.issuers.local_ca import stack_status_path
        probes["free_space"] = free_space_probe(config.state_dir)
        if served_by_stack(stack_status_path(config.state_dir)):
            probes.update(stack_probes(stack_status_path(config.state_dir)))
    return probes


def health() -> Health:
    global _health
    if _health is None:
        from chalicelib.health import Health, log_and_count
        with _lock:
            if _health is None:
                _health = Health(health_probes(settings()), log_and_count)
    return _health


def service() -> ProvisioningService:
    global _service
    if _service is None:
        with _lock:
            if _service is None:
                _service = build_service(settings())
    return _service


def use_service(service: ProvisioningService) -> None:
    """Serve with this service (tests that build it with a step checkpoint)."""
    global _service, _health
    with _lock:
        _service = service
        _health = None


def build_renewal_service(config: Settings, checkpoint: Callable[[str, str], None] | None = None) -> RenewalService:
    """`checkpoint` (tests): called at each step boundary of a renewal, see RenewalService."""
    policy = region_policy(config)
    return RenewalService(registry=registry(config), issuer=issuer(config, policy), locator=locator(config),
                          regions=policy, relocation=RelocationPolicy.parse(config.relocation),
                          lease_seconds=config.claim_lease_seconds, skew_seconds=config.timestamp_skew_seconds,
                          admission=admission(config) if config.admission else None,
                          budget_seconds=config.request_budget_seconds,
                          lease_margin_seconds=config.claim_lease_margin_seconds,
                          checkpoint=checkpoint or no_checkpoint)


def renewal_service() -> RenewalService:
    global _renewal
    if _renewal is None:
        with _lock:
            if _renewal is None:
                _renewal = build_renewal_service(settings())
    return _renewal


def use_renewal_service(service: RenewalService) -> None:
    """Serve renewals with this service (tests that build it with a step checkpoint)."""
    global _renewal
    with _lock:
        _renewal = service


def configure(config: Settings) -> None:
    """Use these settings instead of the environment's (tests); the service is rebuilt on next use."""
    global _settings, _service, _health, _renewal
    with _lock:
        _settings = config
        _service = None
        _health = None
        _renewal = None


def reset() -> None:
    """Forget what was built, so the next call reads the environment again (tests)."""
    global _settings, _service, _aws, _health, _renewal, _ipstack_backoff
    with _lock:
        _ipstack_backoff = None
        _settings = None
        _service = None
        _renewal = None
        _aws = None
        _health = None
