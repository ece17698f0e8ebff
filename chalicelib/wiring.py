"""The one place where the stage's collaborators are built: lazily, once per process, reset for tests.

Backends are imported only when the stage uses them, so the local stage never imports boto3.
"""
import threading

from chalicelib.config import Settings
from chalicelib.errors import ConfigError
from chalicelib.geo import CachingLocator, FallbackLocator, GeoLocator, IpstackLocator, MaxMindLocator
from chalicelib.provisioning import ProvisioningService
from chalicelib.relocation import RelocationPolicy
from chalicelib.renewal import RenewalService
from chalicelib.regions import RegionPolicy
from chalicelib.signatures import FleetKeyVerifier, load_public_key

_lock = threading.Lock()
_settings: Settings | None = None
_service: ProvisioningService | None = None
_renewal: RenewalService | None = None
_aws = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def aws_clients():
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


def registry(config: Settings):
    if config.registry == "dynamodb":
        from chalicelib.registry.dynamodb import DynamoDbRegistry
        return DynamoDbRegistry(aws_clients().client("dynamodb"), config.table_name)
    from chalicelib.registry.sqlite import SqliteRegistry
    return SqliteRegistry(config.registry_path)


def issuer(config: Settings, policy: RegionPolicy | None = None):
    if config.issuer == "aws-iot":
        from chalicelib.issuers.aws_iot import AwsIotIssuer
        clients = aws_clients()
        return AwsIotIssuer(lambda region: clients.client("iot", region))
    from chalicelib.issuers.local_ca import LocalIssuer, local_endpoints
    policy = policy or region_policy(config)
    return LocalIssuer(config.ca_dir, local_endpoints(policy.enabled, config.mqtt_host, config.mqtt_base_port),
                       validity_days=config.cert_validity_days)


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
    return ProvisioningService(
        registry=registry(config),
        issuer=issuer(config, policy),
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


def build_renewal_service(config: Settings) -> RenewalService:
    policy = region_policy(config)
    return RenewalService(registry=registry(config), issuer=issuer(config, policy), locator=locator(config),
                          regions=policy, relocation=RelocationPolicy.parse(config.relocation),
                          lease_seconds=config.claim_lease_seconds, skew_seconds=config.timestamp_skew_seconds)


def renewal_service() -> RenewalService:
    global _renewal
    if _renewal is None:
        with _lock:
            if _renewal is None:
                _renewal = build_renewal_service(settings())
    return _renewal


def configure(config: Settings) -> None:
    """Use these settings instead of the environment's (tests); the service is rebuilt on next use."""
    global _settings, _service, _renewal
    with _lock:
        _settings = config
        _service = None
        _renewal = None


def reset() -> None:
    """Forget what was built, so the next call reads the environment again (tests)."""
    global _settings, _service, _aws, _renewal
    with _lock:
        _settings = None
        _service = None
        _renewal = None
        _aws = None
