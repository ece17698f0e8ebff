"""boto3 clients for the prod stage: one per (service, region), made once per container, with timeouts and retries.

Imported only by the prod wiring, so the local stage never pays for importing boto3.
"""
import logging
import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import deadline

log = logging.getLogger(__name__)
# botocore logs whole responses at DEBUG, decrypted SecureString parameters included.
logging.getLogger("botocore").setLevel(logging.INFO)

# Throttling and 5xx are retried by botocore with backoff; past that the device gets 503 + Retry-After.
# One attempt waits at most connect + read timeout; an attempt (first or retry) is started only when that
# worst case fits in the request's time left, less the rollback reserve (chalicelib/deadline.py). So the
# number of attempts follows the time left, and no call can run a request past its deadline (with the old
# 2 s + 5 s and 3 attempts, one call could take about 21 s of a 25 s function).
CONNECT_TIMEOUT = 1
READ_TIMEOUT = 3
ATTEMPT_SECONDS = CONNECT_TIMEOUT + READ_TIMEOUT
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=CONNECT_TIMEOUT,
                       read_timeout=READ_TIMEOUT)


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
                client = self._clients.get(key)
                if client is None:
                    client = self._session.client(service, region_name=region, config=self._config)
                    within_deadline(client)
                self._clients[key] = client
        return client


def within_deadline(client: Any, attempt_seconds: float = ATTEMPT_SECONDS) -> Any:
    """Start no attempt (first or retry) of any call whose worst case does not fit in the request's time."""
    def gate(operation_name: str = "call", **_: Any) -> None:
        deadline.require(f"{client.meta.service_model.service_name} {operation_name}", attempt_seconds)
    # request-created fires once per attempt, before anything is sent (and before moto answers in tests).
    client.meta.events.register_first("request-created", gate)
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
