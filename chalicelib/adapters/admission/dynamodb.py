"""The prod stage's admission schedule: one item per region, changed by one conditional UpdateItem.

DynamoDB's update expressions have no max(), so each case of the schedule (region idle, admit, promise a
slot) is its own expression guarded by the condition that makes it right. The container guesses the case
from what it saw last; a wrong guess fails its condition, and the refusal carries the item as it is
(ALL_OLD), from which the right case is certain. Uncontended, the guess "idle" is right: one round trip.

The items live in the nonces table (`<table>-nonces`) under keys no nonce can have ('#' is not allowed in
a thing name), so the stage needs no further table; they carry no `expires`, so the table's TTL keeps them.
"""
from __future__ import annotations

import threading
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.adapters.aws import error_code
from chalicelib.domain.admission import Ticket
from chalicelib.domain.errors import ServiceUnavailable

KEY_PREFIX = "#admission/"
_ATTEMPTS = 4
_NAMES = {"#tat": "tat", "#horizon": "horizon", "#slow": "slow_until"}
_CASES: dict[str, tuple[str, str]] = {  # case: (update, condition)
    "idle": ("SET #tat = :start", "attribute_not_exists(#tat) OR #tat < :now"),
    "admit": ("SET #tat = #tat + :interval", "#tat BETWEEN :now AND :limit"),
    "promise": ("SET #horizon = #horizon + :interval", "#tat > :limit AND #horizon >= #tat"),
    "promise-first": ("SET #horizon = #tat + :interval",
                      "#tat > :limit AND (attribute_not_exists(#horizon) OR #horizon < #tat)"),
}


def _number(item: dict, name: str) -> float | None:
    value = item.get(name, {}).get("N")
    return float(value) if value is not None else None


def _case(item: dict | None, now: float, limit: float, guess: bool = False) -> str:
    tat = _number(item or {}, "tat")
    # A guess from this container's last view: while slots are promised (a storm), the schedule has moved on
    # since, and the refused coming back at their slots find it about at `now`.
    storm = guess and (_number(item or {}, "horizon") or 0.0) > now
    if tat is None or (tat < now and not storm):
        return "idle"
    if tat <= limit:
        return "admit"
    horizon = _number(item or {}, "horizon")
    return "promise" if horizon is not None and horizon >= tat else "promise-first"


class DynamoDbAdmissionStore:
    def __init__(self, client: Any, table: str, key_attribute: str = "nonce_key"):
        self._client = client
        self._table = table
        self._key_attribute = key_attribute
        self._seen: dict[str, dict] = {}  # region -> the item as this container last saw it
        self._lock = threading.Lock()

    def _key(self, region: str) -> dict:
        return {self._key_attribute: {"S": KEY_PREFIX + region}}

    def _update(self, region: str, update: str, condition: str | None, values: dict) -> dict:
        kwargs: dict = {"TableName": self._table, "Key": self._key(region), "UpdateExpression": update,
                        "ExpressionAttributeNames": {k: v for k, v in _NAMES.items() if k in update
                                                     or (condition and k in condition)},
                        "ExpressionAttributeValues": {k: {"N": repr(v)} for k, v in values.items()
                                                      if k in update or (condition and k in condition)},
                        "ReturnValues": "ALL_NEW"}
        if condition:
            kwargs.update(ConditionExpression=condition, ReturnValuesOnConditionCheckFailure="ALL_OLD")
        try:
            item = self._client.update_item(**kwargs)["Attributes"]
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise
            raise ServiceUnavailable(f"admission control unavailable: DynamoDB UpdateItem failed with "
                                     f"{error_code(exc)}", retry_after=2) from exc
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"admission control unavailable: {type(exc).__name__}", retry_after=2) from exc
        with self._lock:
            self._seen[region] = item
        return item

    def schedule(self, region: str, now: float, interval: float, tolerance: float) -> Ticket:
        limit = now + tolerance
        values = {":now": now, ":limit": limit, ":interval": interval, ":start": now + interval}
        case = _case(self._seen.get(region), now, limit, guess=True)
        for _ in range(_ATTEMPTS):
            update, condition = _CASES[case]
            try:
                item = self._update(region, update, condition, values)
            except ClientError as exc:  # the guess was wrong: the item as it is says which case is right
                case = _case(exc.response.get("Item"), now, limit)
                continue
            slow_until = _number(item, "slow_until") or 0.0
            if case in ("idle", "admit"):
                return Ticket(True, 0.0, slow_until)
            return Ticket(False, max(0.0, (_number(item, "horizon") or now) - now), slow_until)
        # Contention so heavy that the item changed under every attempt: the region is busy anyway.
        return Ticket(False, 1.0, 0.0)

    def charge(self, region: str, now: float, seconds: float, slow_until: float | None = None) -> None:
        values = {":now": now, ":seconds": seconds, ":start": now + seconds, ":slow": slow_until or 0.0}
        slow = ", #slow = :slow" if slow_until else ""
        busy = (f"SET #tat = #tat + :seconds{slow}", "#tat >= :now")
        idle = (f"SET #tat = :start{slow}", "attribute_not_exists(#tat) OR #tat < :now")
        tat = _number(self._seen.get(region) or {}, "tat")
        cases = [busy, idle] if tat is not None and tat >= now else [idle, busy]
        for update, condition in cases * 2:
            try:
                self._update(region, update, condition, values)
                return
            except ClientError:
                continue
