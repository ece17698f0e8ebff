"""Settings of a stage, read from its environment (set by .chalice/config.json or the caller).

Read once when first needed and validated, so a bad setting fails at startup with a message that
names it, not on the first device.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chalicelib.domain.errors import ConfigError
from chalicelib.domain.regions import DEFAULT_REGION, SAMPLE_REGIONS

PROJECT_DIR = Path(__file__).resolve().parent.parent
STATE_DIR_NAME = "iot-global-provisioning"
FLEET_PRIVATE_KEY_NAME = "global-provisioning.priv.key.pem"
FLEET_PUBLIC_KEY_NAME = "global-provisioning.pub.key.pem"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    stage: str
    state_dir: Path
    fleet_public_key: Path
    enabled_regions: tuple[str, ...]
    default_region: str
    trust_forwarded_for: bool
    mqtt_host: str
    mqtt_base_port: int
    claim_lease_seconds: int | None  # None: the request's time left plus the margin (chalicelib/domain/deadline.py)
    registry: str = "sqlite"
    issuer: str = "local-ca"
    table_name: str = "iot-global-provisioning"
    ipstack_key_parameter: str | None = None
    maxmind_db: Path | None = None
    allow_v1: bool = True
    previous_fleet_public_key: Path | None = None  # still accepted while devices move to a rotated key
    # SSM String parameter with the fleet public key(s), current then previous (prod); a key file set
    # explicitly with GIP_FLEET_PUBLIC_KEY takes precedence.
    fleet_public_key_parameter: str | None = None
    # {"countries": {...}, "continents": {...}, "blocked": [...]}
    region_rules: Mapping[str, Any] = field(default_factory=dict)
    timestamp_skew_seconds: int = 300
    ipstack_url: str = "https://api.ipstack.com/{ip}"  # another endpoint only for tests and benches
    kms_key_arn: str | None = None  # customer-managed key of the ipstack SecureString: adds kms:Decrypt (IAM)
    # Locally the only deadline; on Lambda the function's own is used when sooner. Below the device's HTTP read
    # timeout (35 s) and API Gateway's 29 s, so a device always gets our answer rather than a gateway's.
    request_budget_seconds: int = 20
    claim_lease_margin_seconds: int = 30
    cert_validity_days: int = 365  # the local CA's device certificates; AWS IoT sets its own
    relocation: str = "distance:1000"  # GIP_RELOCATION, checked by relocation.RelocationPolicy.parse
    # A device provisioned with a server-made key that lost the answer (and the key) may ask again for a new one this
    # long after its provisioning (docs/exactly-once.md); 0: never, an operator resets it.
    rekey_window_seconds: int = 900
    admission: bool = False  # admission control per region (on by default where the issuer is AWS IoT)
    admission_rates: Mapping[str, float] = field(default_factory=dict)  # region or "*" -> devices/s (CSR)

    def lease_for_audit(self) -> int:
        """The lease the audit takes a device over with: as long as a request's."""
        return self.claim_lease_seconds or self.request_budget_seconds + self.claim_lease_margin_seconds

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @classmethod
    def for_stage(cls, stage: str, state_dir: str | Path | None = None, environ: Mapping[str, str] | None = None,
                  config_file: Path | None = None) -> "Settings":
        """A stage's settings outside Lambda (CLI, devstack, bench): `.chalice/config.json`'s top-level
        `environment_variables` overridden by the stage's, as Chalice merges them, then by GIP_* variables of
        the process environment; `state_dir` overrides the stage's state directory."""
        env: dict[str, str] = {}
        config_file = config_file or PROJECT_DIR / ".chalice" / "config.json"
        stage_env: dict[str, str] = {}
        if config_file.exists():
            chalice_config = json.loads(config_file.read_text())
            stages = chalice_config.get("stages", {})
            if stage not in stages:
                raise ConfigError(f"stage {stage!r} is not in {config_file} (stages: {', '.join(stages)})")
            stage_env = stages[stage].get("environment_variables", {})
            env.update(chalice_config.get("environment_variables", {}))
            env.update(stage_env)
        environ = os.environ if environ is None else environ
        env.update({k: v for k, v in environ.items() if k.startswith("GIP_") or k == "XDG_STATE_HOME"})
        env["GIP_STAGE"] = stage_env.get("GIP_STAGE") or stage  # Chalice's default stage dev runs the local stage
        if state_dir:
            env["GIP_STATE_DIR"] = str(Path(state_dir).resolve())
        return cls.from_env(env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        stage = env.get("GIP_STAGE", "local")
        state_dir = _path(env["GIP_STATE_DIR"]) if env.get("GIP_STATE_DIR") else default_state_dir(stage, env)
        return cls(
            stage=stage,
            state_dir=state_dir,
            fleet_public_key=_path(env["GIP_FLEET_PUBLIC_KEY"]) if env.get("GIP_FLEET_PUBLIC_KEY")
            else state_dir / "keys" / FLEET_PUBLIC_KEY_NAME,
            enabled_regions=_list(env.get("GIP_ENABLED_REGIONS")) or SAMPLE_REGIONS,
            default_region=env.get("GIP_DEFAULT_REGION") or DEFAULT_REGION,
            trust_forwarded_for=_bool(env, "GIP_TRUST_FORWARDED_FOR", False),
            mqtt_host=env.get("GIP_MQTT_HOST") or "localhost",
            mqtt_base_port=_int(env, "GIP_MQTT_BASE_PORT", 18883),
            claim_lease_seconds=_int(env, "GIP_CLAIM_LEASE_SECONDS", 0) or None,
            registry=_choice(env, "GIP_REGISTRY", ("sqlite", "dynamodb")),
            issuer=_choice(env, "GIP_ISSUER", ("local-ca", "aws-iot")),
            table_name=env.get("GIP_TABLE_NAME") or "iot-global-provisioning",
            ipstack_key_parameter=env.get("GIP_IPSTACK_KEY_PARAMETER") or None,
            maxmind_db=_path(env["GIP_MAXMIND_DB"]) if env.get("GIP_MAXMIND_DB") else None,
            # v1 signatures are replayable: prod takes them only when told to (old firmware), elsewhere by default
            allow_v1=_bool(env, "GIP_ALLOW_V1", stage != "prod"),
            region_rules=_json(env, "GIP_REGION_RULES"),
            previous_fleet_public_key=_path(env["GIP_FLEET_PUBLIC_KEY_PREVIOUS"])
            if env.get("GIP_FLEET_PUBLIC_KEY_PREVIOUS") else None,
            timestamp_skew_seconds=_int(env, "GIP_TIMESTAMP_SKEW_SECONDS", 300),
            fleet_public_key_parameter=None if env.get("GIP_FLEET_PUBLIC_KEY")
            else env.get("GIP_FLEET_PUBLIC_KEY_PARAMETER") or None,
            ipstack_url=env.get("GIP_IPSTACK_URL") or "https://api.ipstack.com/{ip}",
            kms_key_arn=env.get("GIP_KMS_KEY_ARN") or None,
            request_budget_seconds=_int(env, "GIP_REQUEST_BUDGET_SECONDS", 20),
            claim_lease_margin_seconds=_int(env, "GIP_CLAIM_LEASE_MARGIN_SECONDS", 30),
            cert_validity_days=_int(env, "GIP_CERT_VALIDITY_DAYS", 365),
            relocation=env.get("GIP_RELOCATION") or "distance:1000",
            rekey_window_seconds=_int(env, "GIP_REKEY_WINDOW_SECONDS", 900, minimum=0),
            **_admission(env),
        )


def default_state_dir(stage: str, env: Mapping[str, str] | None = None) -> Path:
    """$XDG_STATE_HOME/iot-global-provisioning/<stage>, else ~/.local/state/...: outside the project, because
    `chalice local`'s reloader watches the whole project tree and restarts on every change to the registry."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or os.environ.get("XDG_STATE_HOME")
    if not base or not Path(base).is_absolute():  # the XDG spec: a relative value is ignored
        home = Path(os.path.expanduser("~"))
        if not home.is_absolute():  # no HOME and no passwd entry (some containers)
            return PROJECT_DIR / ".state" / stage
        base = str(home / ".local" / "state")
    return Path(base) / STATE_DIR_NAME / stage


def _admission(env: Mapping[str, str]) -> dict:
    """GIP_ADMISSION (default: on with AWS IoT or when rates are given) and GIP_ADMISSION_RATES, a JSON
    object of region (or "*") to the devices per second admitted there, for accounts with other quotas."""
    rates = _json(env, "GIP_ADMISSION_RATES")
    for region, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
            raise ConfigError(f"GIP_ADMISSION_RATES: {region!r} must map to a positive number of devices per second")
    default = env.get("GIP_ISSUER") == "aws-iot" or bool(rates)
    return {"admission": _bool(env, "GIP_ADMISSION", default),
            "admission_rates": {region: float(rate) for region, rate in rates.items()}}


def _path(value: str) -> Path:
    # Relative paths are relative to the project, whatever directory a command runs from.
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_DIR / path


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or choices[0]
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _json(env: Mapping[str, str], name: str) -> dict[str, Any]:
    raw = env.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a JSON object")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: " + ("must be positive" if minimum == 1 else f"at least {minimum}"))
    return value
