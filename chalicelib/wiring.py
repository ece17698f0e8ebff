"""The one place where the stage's collaborators are built: lazily, once per process, reset for tests."""
import threading

from chalicelib.config import Settings
from chalicelib.geo import MaxMindLocator
from chalicelib.issuers.local_ca import LocalIssuer, local_endpoints
from chalicelib.provisioning import ProvisioningService
from chalicelib.regions import RegionPolicy
from chalicelib.registry.sqlite import SqliteRegistry
from chalicelib.signatures import FleetKeyVerifier, load_public_key

_lock = threading.Lock()
_settings: Settings | None = None
_service: ProvisioningService | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def region_policy(config: Settings) -> RegionPolicy:
    return RegionPolicy(config.enabled_regions, config.default_region)


def registry(config: Settings) -> SqliteRegistry:
    return SqliteRegistry(config.registry_path)


def issuer(config: Settings) -> LocalIssuer:
    policy = region_policy(config)
    return LocalIssuer(config.ca_dir, local_endpoints(policy.enabled, config.mqtt_host, config.mqtt_base_port))


def build_service(config: Settings) -> ProvisioningService:
    return ProvisioningService(
        registry=registry(config),
        issuer=issuer(config),
        locator=MaxMindLocator.bundled(),
        regions=region_policy(config),
        verifier=FleetKeyVerifier(load_public_key(config.fleet_public_key)),
        lease_seconds=config.claim_lease_seconds,
    )


def service() -> ProvisioningService:
    global _service
    if _service is None:
        with _lock:
            if _service is None:
                _service = build_service(settings())
    return _service


def reset() -> None:
    """Forget what was built, so the next call reads the environment again (tests)."""
    global _settings, _service
    with _lock:
        _settings = None
        _service = None
