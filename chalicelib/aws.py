"""boto3 clients for the prod stage: one per (service, region), made once per container, with timeouts and retries.

Imported only by the prod wiring, so the local stage never pays for importing boto3.
"""
import logging
import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)
# botocore logs whole responses at DEBUG, decrypted SecureString parameters included.
logging.getLogger("botocore").setLevel(logging.INFO)

# Throttling and 5xx are retried by botocore with backoff; past that the device gets 503 + Retry-After.
# Short timeouts and few attempts keep a request within the Lambda timeout (25 s, under API Gateway's 29 s).
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=2, read_timeout=5)
_MAX_ATTEMPTS = 3


def without_retries(client: Any, operations: frozenset[str]) -> None:
    """botocore no longer retries `operations` on `client`; its other operations keep their retries.

    For the IoT calls admission control pays for: botocore's retries would spend quota nobody admitted and
    stack on the device's own; the issuer retries a throttled call itself, inside the budget. One client
    serves both kinds, so botocore's standard retry handler (registered under a known unique id) is wrapped.
    """
    from botocore.retries import standard
    service = client.meta.service_model.service_id.hyphenize()
    event, unique_id = f"needs-retry.{service}", f"retry-config-{service}"
    if getattr(client, "_gip_without_retries", None) is not None:
        client._gip_without_retries.update(operations)
        return
    client.meta.events.unregister(event, unique_id=unique_id)
    handler = standard.register_retry_handler(client, max_attempts=_MAX_ATTEMPTS)
    client.meta.events.unregister(event, unique_id=unique_id)
    skipped = set(operations)

    def needs_retry(operation: Any = None, **kwargs: Any) -> float | None:
        if operation is not None and operation.name in skipped:
            return None
        return handler.needs_retry(operation=operation, **kwargs)
    client.meta.events.register(event, needs_retry, unique_id=unique_id)
    client._gip_without_retries = skipped


def error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


class AwsClients:
    def __init__(self, config: Config = CLIENT_CONFIG) -> None:
        self._session = boto3.session.Session()
        self._config = config
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str, region: str | None = None) -> Any:
        key = (service, region)
        client = self._clients.get(key)
        if client is None:
            with self._lock:  # boto3 sessions are not thread-safe to create clients from
                client = self._clients.get(key) or self._session.client(service, region_name=region,
                                                                         config=self._config)
                self._clients[key] = client
        return client


class SsmSecret:
    """A SecureString parameter read once per container; None (and a warning) when it cannot be read."""

    _UNSET = object()

    def __init__(self, client: Any, name: str) -> None:
        self._client = client
        self._name = name
        self._value: object = self._UNSET
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        if self._value is self._UNSET:
            with self._lock:
                if self._value is self._UNSET:
                    try:
                        self._value = self._client.get_parameter(
                            Name=self._name, WithDecryption=True)["Parameter"]["Value"]
                    except (ClientError, BotoCoreError) as exc:
                        log.warning("cannot read SSM parameter %s (%s); that provider is off for this container",
                                    self._name, type(exc).__name__)
                        self._value = None
        return self._value if isinstance(self._value, str) else None
