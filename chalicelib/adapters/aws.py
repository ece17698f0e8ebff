"""AWS clients for the prod stage: one per (service, region), made once per container, with timeouts and retries.

Imported only by the prod wiring, so the local stage never pays for it. botocore directly, not boto3: the
function uses no resource or transfer API, and boto3's import (s3transfer with it) is most of a cold start.
In the Lambda (lean=True) clients read the lean service models (chalicelib.adapters.aws_models).
"""
import logging
import os
import threading
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.adapters.geo import Backoff
from chalicelib.domain import deadline

log = logging.getLogger(__name__)
# botocore logs whole responses at DEBUG, decrypted SecureString parameters included.
logging.getLogger("botocore").setLevel(logging.INFO)

# Throttling and 5xx are retried by botocore with backoff; past that the device gets 503 + Retry-After. The IoT calls
# admission control pays for go through clients without retries (`client(..., retries=False)`): botocore's retries
# would spend quota nobody admitted and stack on the device's own; the issuer retries a throttled call itself,
# inside the budget, and reports it to admission.
# One attempt waits at most connect + read timeout; an attempt (first or retry) is started only when that
# worst case fits in the request's time left, less the rollback reserve (chalicelib/domain/deadline.py). So the
# number of attempts follows the time left, and no call can run a request past its deadline (with the old
# 2 s + 5 s and 3 attempts, one call could take about 21 s of a 25 s function).
CONNECT_TIMEOUT = 1
READ_TIMEOUT = 3
ATTEMPT_SECONDS = CONNECT_TIMEOUT + READ_TIMEOUT
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=CONNECT_TIMEOUT,
                       read_timeout=READ_TIMEOUT)
# One attempt per call, botocore's supported way: Config's retries "total_max_attempts ... includes the initial
# request, so a value of 1 indicates that no requests will be retried" (botocore.config.Config's documentation).
NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1})


def error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


class AwsClients:
    def __init__(self, config: Config = CLIENT_CONFIG, lean: bool | None = None,
                 session: botocore.session.Session | None = None) -> None:
        if session is not None:  # one made before (bench/storm.py's containers share one: it is only models)
            self._session = session
        else:
            self._session = botocore.session.get_session()
        if session is None and (lean if lean is not None else bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))):
            from chalicelib.adapters.aws_models import lean_loader
            self._session.register_component("data_loader", lean_loader())
        self._config = config
        self._clients: dict[tuple[str, str | None, bool], Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str, region: str | None = None, retries: bool = True) -> Any:
        """The container's client for `service` in `region`; `retries=False`: one attempt per call."""
        key = (service, region, retries)
        client = self._clients.get(key)
        if client is None:
            with self._lock:  # botocore sessions are not thread-safe to create clients from
                client = self._clients.get(key)
                if client is None:
                    config = self._config if retries else self._config.merge(NO_RETRIES)
                    client = self._session.create_client(service, region_name=region, config=config)
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
    """A SecureString parameter read once per container. When it cannot be read: None, a warning and a metric
    (geo.Backoff), and another try after the back-off, so a fixed parameter or key policy heals by itself."""

    def __init__(self, client: Any, name: str, backoff: Backoff | None = None) -> None:
        self._client = client
        self._name = name
        self._value: str | None = None
        self._lock = threading.Lock()
        self.backoff = backoff or Backoff(f"SSM parameter {name}")

    def __call__(self) -> str | None:
        if self._value is None and self.backoff.ready():
            with self._lock:
                if self._value is None and self.backoff.ready():
                    try:
                        self._value = self._client.get_parameter(
                            Name=self._name, WithDecryption=True)["Parameter"]["Value"]
                        self.backoff.succeeded()
                    except (ClientError, BotoCoreError) as exc:
                        self.backoff.failed(error_code(exc) if isinstance(exc, ClientError)
                                            else type(exc).__name__)
        return self._value
