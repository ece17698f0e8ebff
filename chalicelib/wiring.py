"""The one place where the stage's collaborators are built: lazily, once per process, reset for tests.

Backends are imported only when the stage uses them, so the local stage never imports boto3.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from chalicelib.admission import DEFAULT_BUDGET, Admission, AdmissionStore, budgets_from
from chalicelib.config import Settings
from chalicelib.errors import ConfigError
from chalicelib.geo import CachingLocator, FallbackLocator, GeoLocator, IpstackLocator, MaxMindLocator
from chalicelib.provisioning import ProvisioningService
from chalicelib.regions import RegionPolicy
from chalicelib.registry.base import Registry
from chalicelib.signatures import FleetKeyVerifier, load_public_key

if TYPE_CHECKING:
    from chalicelib.aws import AwsClients
    from chalicelib.issuers.aws_iot import AwsIotIssuer
    from chalicelib.issuers.local_ca import LocalIssuer

_lock = threading.Lock()
_settings: Settings | None = None
_service: ProvisioningService | None = None
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


def registry(config: Settings) -> Registry:
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
        clients = aws_clients()
        if gate is None or not config.admission:
            return AwsIotIssuer(lambda region: clients.client("iot", region), pool("aws-iot"))
        from chalicelib.aws import without_retries
        from chalicelib.issuers.aws_iot import MUTATING_OPERATIONS

        def mutating(region: str) -> Any:  # the calls admission pays for: the issuer retries them, not botocore
            client = clients.client("iot", region)
            without_retries(client, MUTATING_OPERATIONS)
            return client
        return AwsIotIssuer(lambda region: clients.client("iot", region), pool("aws-iot"),
                            mutating_client_for_region=mutating, on_throttle=gate.throttled)
    from chalicelib.issuers.local_ca import LocalIssuer, local_endpoints
    policy = policy or region_policy(config)
    return LocalIssuer(config.ca_dir, local_endpoints(policy.enabled, config.mqtt_host, config.mqtt_base_port))


def locator(config: Settings) -> GeoLocator:
    """ipstack (key in SSM) and/or a MaxMind City file when configured, then the bundled GeoLite2."""
    providers: list[GeoLocator] = []
    if config.ipstack_key_parameter:
        import requests

        from chalicelib.aws import SsmSecret
        key = SsmSecret(aws_clients().client("ssm"), config.ipstack_key_parameter)
        providers.append(IpstackLocator(requests.Session(), key))
    if config.maxmind_db:
        providers.append(MaxMindLocator.open(config.maxmind_db))
    providers.append(MaxMindLocator.bundled())
    return CachingLocator(providers[0] if len(providers) == 1 else FallbackLocator(providers))


def build_service(config: Settings) -> ProvisioningService:
    policy = region_policy(config)
    gate = admission(config) if config.admission else None  # off: no step, no store
    return ProvisioningService(
        registry=registry(config),
        issuer=issuer(config, policy, gate),
        admission=gate,
        locator=locator(config),
        regions=policy,
        verifier=FleetKeyVerifier(load_public_key(config.fleet_public_key),
                                  *([load_public_key(config.previous_fleet_public_key)]
                                    if config.previous_fleet_public_key else [])),
        lease_seconds=config.claim_lease_seconds,
        allow_v1=config.allow_v1,
        skew_seconds=config.timestamp_skew_seconds,
    )


def service() -> ProvisioningService:
    global _service
    if _service is None:
        with _lock:
            if _service is None:
                _service = build_service(settings())
    return _service


def configure(config: Settings) -> None:
    """Use these settings instead of the environment's (tests); the service is rebuilt on next use."""
    global _settings, _service
    with _lock:
        _settings = config
        _service = None


def reset() -> None:
    """Forget what was built, so the next call reads the environment again (tests)."""
    global _settings, _service, _aws
    with _lock:
        _settings = None
        _service = None
        _aws = None
