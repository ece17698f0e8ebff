"""The prod stage's registry: one DynamoDB table keyed by thing_name, the original sample's attribute names."""
from __future__ import annotations

import builtins
import logging
import re
import secrets
import time
from concurrent.futures import Executor
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.adapters.aws import error_code as _code
from chalicelib.adapters.registry.items import (
    ITEM_ATTRIBUTES,
    STAND_IN_ITEM,
    attributes_json,
    record_from_item,
    revocations_json,
)
from chalicelib.domain.clock import timestamp as _timestamp
from chalicelib.domain.errors import (
    RENEWAL_REFUSED,
    ProvisioningError,
    ProvisioningInProgress,
    RenewalInProgress,
    RenewalRefused,
    ServiceUnavailable,
    replayed_request,
)
from chalicelib.domain.records import (
    PROVISIONED,
    PROVISIONING,
    UNPROVISIONED,
    Claim,
    ClaimState,
    DeviceRecord,
    DeviceStatus,
    Nonce,
    PendingIssue,
    RenewalState,
    RenewedCertificate,
    Revocation,
)
from chalicelib.domain.refusals import claim_refusal, rekey_refusal

log = logging.getLogger(__name__)
DEFAULT_TABLE_NAME = "iot-global-provisioning"
# Errors that mean "DynamoDB is busy or down", not "the request was wrong": the device may retry later.
_UNAVAILABLE_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException",
                                "RequestLimitExceeded", "InternalServerError", "ServiceUnavailable"})
# Refusals the callers turn into answers; every other error means the registry cannot be used right now.
_ANSWERS = frozenset({"ConditionalCheckFailedException", "ResourceInUseException", "TransactionCanceledException"})
_BATCH_GET_LIMIT = 100
_BATCH_WRITE_LIMIT = 25
_BATCH_ATTEMPTS = 8
# Every attribute goes through a placeholder: "status", "name" and friends are reserved words.
_NAMES = {"#name": "thing_name", "#status": "prov_status", "#datetime": "prov_datetime", "#region": "aws_region",
          "#cert": "certificate_id", "#token": "claim_token", "#lease": "lease_expires", "#error": "last_error",
          "#fingerprint": "public_key_fingerprint", "#key": "public_key", "#country": "country",
          "#reason": "region_reason", "#attempts": "attempts", "#since": "prov_datetime", "#claimed": "claimed_at",
          "#pregion": "pending_region", "#psince": "pending_since", "#pfingerprint": "pending_fingerprint",
          "#pcert": "pending_certificate_id", "#pcreated": "pending_created_thing", "#pmove": "pending_move",
          # renewal
          "#certkey": "certificate_public_key", "#prevcert": "previous_certificate_id",
          "#prevkey": "previous_public_key", "#prevregion": "previous_region", "#retire": "retire_pending",
          "#renewals": "renewal_count", "#renewed": "last_renewal", "#rtoken": "renewal_token",
          "#rlease": "renewal_lease", "#expires": "certificate_expires", "#serverkey": "server_key",
          "#reset": "reset_pending"}
# The write-ahead record of an issuance (registry/base.py PendingIssue), as attribute placeholders.
_PENDING_NAMES = ("#pregion", "#psince", "#pfingerprint", "#pcert", "#pcreated", "#pmove")


# The stand-in an unknown device's read is converted from (items.STAND_IN_ITEM); botocore's parse of the larger
# answer a registered device gets is not mirrored: it is small beside DynamoDB's own round trip.
_STAND_IN = {name: {"S": value} if isinstance(value, str) else {"N": repr(value)}
             for name, value in STAND_IN_ITEM.items()}


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _moment(raw: Mapping[str, Any] | None) -> datetime | None:
    return None if not raw or "N" not in raw else datetime.fromtimestamp(float(raw["N"]), timezone.utc)


def _pending(raw: Mapping[str, Any]) -> PendingIssue | None:
    if "pending_region" not in raw:
        return None
    return PendingIssue(raw["pending_region"]["S"],
                        datetime.fromtimestamp(float(raw["pending_since"]["N"]), timezone.utc),
                        raw.get("pending_fingerprint", {}).get("S"), raw.get("pending_certificate_id", {}).get("S"),
                        raw["pending_created_thing"]["BOOL"] if "pending_created_thing" in raw else None,
                        raw.get("pending_move", {}).get("BOOL", False))


def _record(raw: Mapping[str, Any]) -> DeviceRecord:
    """DynamoDB's typed attributes ({"S": ...}, {"N": ...}) to a record."""
    item: dict[str, Any] = {key: raw[key]["S"] for key in ITEM_ATTRIBUTES if key in raw and "S" in raw[key]}
    for number in ("attempts", "lease_expires", "renewal_count", "renewal_lease", "retire_pending", "server_key"):
        if "N" in raw.get(number, {}):
            item[number] = float(raw[number]["N"])
    return record_from_item(item)


class DynamoDbRegistry:
    """`executor` (the composition root's pool) runs a v2 claim's two writes side by side; `sleep` waits
    between retries of unprocessed batch items."""

    def __init__(self, client: Any, table_name: str = DEFAULT_TABLE_NAME, page_size: int | None = None, *,
                 executor: Executor, sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._table = table_name
        self._nonces = f"{table_name}-nonces"  # v2 request nonces, kept apart so scans of devices stay lean
        self._page_size = page_size  # Scan's Limit; None lets DynamoDB fill 1 MB pages
        self._executor = executor
        self._sleep = sleep

    def _backoff(self, attempt: int) -> None:
        self._sleep(min(0.05 * 2 ** attempt, 1.0))

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response: dict[str, Any] = getattr(self._client, operation)(**kwargs)
            return response
        except ClientError as e:
            if _code(e) in _ANSWERS:
                raise
            if _code(e) not in _UNAVAILABLE_CODES:  # access denied, missing table...: an operator must look
                log.error("DynamoDB %s failed: %s", operation, _code(e))
            raise ServiceUnavailable(f"registry unavailable: DynamoDB {operation} failed with {_code(e)}") from e
        except BotoCoreError as e:  # no connection, no credentials, timeouts
            raise ServiceUnavailable(f"registry unavailable: DynamoDB {operation}: {type(e).__name__}") from e

    def _key(self, thing_name: str) -> dict[str, Any]:
        return {"thing_name": {"S": thing_name}}

    def create(self) -> None:
        for table, key in ((self._table, "thing_name"), (self._nonces, "nonce_key")):
            try:
                self._call("create_table", TableName=table,
                           KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
                           AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
                           BillingMode="PAY_PER_REQUEST")
            except ClientError as e:
                if _code(e) != "ResourceInUseException":  # already there (or being made): wait for it below
                    raise
            self._client.get_waiter("table_exists").wait(TableName=table)
        # DynamoDB deletes expired nonces by itself (within days; _remember_nonce ignores expired ones meanwhile).
        ttl = self._call("describe_time_to_live", TableName=self._nonces)["TimeToLiveDescription"]
        if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            self._call("update_time_to_live", TableName=self._nonces,
                       TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires"})

    def register(self, thing_names: Iterable[str], public_keys: Mapping[str, str] | None = None,
                 attributes: Mapping[str, Mapping[str, str]] | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
        keys, attrs = public_keys or {}, attributes or {}
        names = list(dict.fromkeys(thing_names))
        added = 0
        # One BatchGetItem's worth of names at a time, so progress moves and memory stays flat on large fleets.
        for done, names_chunk in enumerate(_chunks(names, _BATCH_GET_LIMIT)):
            existing = self._existing(names_chunk)
            new = [name for name in names_chunk if name not in existing]
            # BatchWriteItem cannot be conditional, so existing names were filtered out above. Only a concurrent
            # register of the same new name can race this, and it writes the same fresh item.
            for chunk in _chunks(new, _BATCH_WRITE_LIMIT):
                self._write_batch([{"PutRequest": {"Item": self._new_item(name, keys.get(name), attrs.get(name))}}
                                   for name in chunk])
            added += len(new)
            if progress:
                progress(min((done + 1) * _BATCH_GET_LIMIT, len(names)))
        return added

    def _new_item(self, name: str, public_key: str | None, attributes: Mapping[str, str] | None) -> dict[str, Any]:
        item = {**self._key(name), "prov_status": {"S": UNPROVISIONED.value}}
        if public_key:
            item["public_key"] = {"S": public_key}
        if attributes:
            item["attributes"] = {"S": attributes_json(attributes)}
        return item

    def _write_batch(self, requests: builtins.list[dict[str, Any]]) -> None:
        request: dict[str, Any] | None = {self._table: requests}
        for attempt in range(_BATCH_ATTEMPTS):
            request = self._call("batch_write_item", RequestItems=request).get("UnprocessedItems")
            if not request:
                return
            self._backoff(attempt)
        raise ServiceUnavailable("registry unavailable: DynamoDB batch_write_item kept items unprocessed")

    def _existing(self, names: builtins.list[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(names, _BATCH_GET_LIMIT):
            request: dict[str, Any] | None = {self._table: {
                "Keys": [self._key(name) for name in chunk], "ConsistentRead": True,
                "ProjectionExpression": "#name", "ExpressionAttributeNames": {"#name": "thing_name"}}}
            for attempt in range(_BATCH_ATTEMPTS):
                response = self._call("batch_get_item", RequestItems=request)
                found.update(raw["thing_name"]["S"] for raw in response["Responses"].get(self._table, []))
                request = response.get("UnprocessedKeys")
                if not request:
                    break
                self._backoff(attempt)
            else:
                raise ServiceUnavailable("registry unavailable: DynamoDB batch_get_item kept keys unprocessed")
        return found

    def get(self, thing_name: str) -> DeviceRecord | None:
        raw = self._call("get_item", TableName=self._table, Key=self._key(thing_name), ConsistentRead=True).get("Item")
        record = _record(raw or _STAND_IN)  # the same work for an unknown device (items.STAND_IN_ITEM)
        return record if raw else None

    def list(self, status: DeviceStatus | None = None, region: str | None = None,
             since: datetime | None = None) -> Iterator[DeviceRecord]:
        kwargs: dict[str, Any] = {"TableName": self._table}
        filters = [(condition, name, value) for condition, name, value in (
            ("#status = :status", "#status", status and DeviceStatus(status).value),
            ("#region = :region", "#region", region),
            ("#since >= :since", "#since", since and _timestamp(since))) if value]
        if filters:
            kwargs.update(FilterExpression=" AND ".join(condition for condition, _, _ in filters),
                          ExpressionAttributeNames={name: _NAMES[name] for _, name, _ in filters},
                          ExpressionAttributeValues={f":{name[1:]}": {"S": value} for _, name, value in filters})
        if self._page_size:
            kwargs["Limit"] = self._page_size
        records: builtins.list[DeviceRecord] = []
        while True:
            page = self._call("scan", **kwargs)
            records.extend(_record(raw) for raw in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        # A scan comes back in hash order; sort like the SQLite backend does.
        yield from sorted(records, key=lambda record: record.thing_name)

    def claim(self, thing_name: str, now: datetime, lease_seconds: int, fleet_key: bool = False,
              nonce: Nonce | None = None) -> Claim:
        if nonce is None:
            return self._claim(thing_name, now, lease_seconds, fleet_key)
        # Two tables, two round trips: run them side by side rather than one after the other.
        fresh = self._executor.submit(self._remember_nonce, thing_name, nonce, now)
        try:
            claim = self._claim(thing_name, now, lease_seconds, fleet_key)
        except ProvisioningError:
            if not fresh.result():
                raise replayed_request() from None
            raise
        if not fresh.result():
            self.release(claim, "replayed request refused")
            raise replayed_request()
        return claim

    def _claim(self, thing_name: str, now: datetime, lease_seconds: int, fleet_key: bool) -> Claim:
        token = secrets.token_hex(16)
        at = now.timestamp()
        condition = ("attribute_exists(#name) AND (#status = :unprovisioned "
                     "OR (#status = :provisioning AND #lease < :now))")
        names: tuple[str, ...] = ("#name", "#status", "#token", "#lease", "#attempts", "#claimed")
        if fleet_key:  # a device with a key of its own may not be claimed with the fleet key's signature
            condition += " AND attribute_not_exists(#key)"
            names += ("#key",)
        try:
            # ALL_OLD: the write-ahead record a dead attempt left comes back with the won claim, no second read.
            won = self._call(
                "update_item", TableName=self._table, Key=self._key(thing_name),
                UpdateExpression="SET #status = :provisioning, #token = :token, #lease = :lease, #claimed = :now "
                                 "ADD #attempts :one",
                ConditionExpression=condition,
                ExpressionAttributeNames={k: _NAMES[k] for k in names},
                ExpressionAttributeValues={":provisioning": {"S": PROVISIONING.value},
                                           ":unprovisioned": {"S": UNPROVISIONED.value},
                                           ":token": {"S": token}, ":lease": {"N": repr(at + lease_seconds)},
                                           ":now": {"N": repr(at)}, ":one": {"N": "1"}},
                ReturnValues="ALL_OLD", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            # The refusal carries the item as it was, so telling why costs no second read.
            old = e.response.get("Item")
            raise claim_refusal(thing_name, _record(old) if old else None, fleet_key, now) from None
        return Claim(thing_name, token, _pending(won.get("Attributes", {})))

    def finalize(self, claim: Claim, region: str, certificate_id: str, now: datetime,
                 fingerprint: str | None = None, country: str | None = None, reason: str | None = None,
                 public_key: str | None = None, expires: str | None = None, server_key: bool = False) -> None:
        values = {":provisioned": {"S": PROVISIONED.value}, ":provisioning": {"S": PROVISIONING.value},
                  ":datetime": {"S": _timestamp(now)}, ":region": {"S": region},
                  ":cert": {"S": certificate_id}, ":token": {"S": claim.token}}
        sets = ["#status = :provisioned", "#datetime = :datetime", "#region = :region", "#cert = :cert"]
        removes = ["#token", "#lease", "#error", *_PENDING_NAMES]
        for name, value in (("#fingerprint", fingerprint), ("#country", country), ("#reason", reason),
                            ("#certkey", public_key), ("#expires", expires)):
            if value:
                values[":" + name[1:]] = {"S": value}
                sets.append(f"{name} = :{name[1:]}")
            else:
                removes.append(name)
        if server_key:
            values[":serverkey"] = {"N": "1"}
            sets.append("#serverkey = :serverkey")
        else:
            removes.append("#serverkey")
        update = f"SET {', '.join(sets)} REMOVE {', '.join(removes)}"
        try:
            self._call(
                "update_item", TableName=self._table, Key=self._key(claim.thing_name), UpdateExpression=update,
                ConditionExpression="#status = :provisioning AND #token = :token",
                ExpressionAttributeNames={k: _NAMES[k] for k in ("#status", "#datetime", "#region", "#cert", "#token",
                                                                 "#lease", "#error", "#fingerprint", "#country",
                                                                 "#reason", "#certkey", "#expires", "#serverkey",
                                                                 *_PENDING_NAMES)},
                ExpressionAttributeValues=values)
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            raise ProvisioningInProgress(
                f"{claim.thing_name}: the claim's lease ran out before provisioning ended") from None

    def release(self, claim: Claim, error: str, keep_pending: bool = False) -> None:
        if claim.renewal:  # the renewal lease: the device stays provisioned with its current certificate
            return self._abandon_renewal(claim, error, keep_pending)
        removes = ("#token", "#lease") + (() if keep_pending else _PENDING_NAMES)
        try:
            self._call(
                "update_item", TableName=self._table, Key=self._key(claim.thing_name),
                UpdateExpression=f"SET #status = :unprovisioned, #error = :error REMOVE {', '.join(removes)}",
                ConditionExpression="#status = :provisioning AND #token = :token",
                ExpressionAttributeNames={k: _NAMES[k] for k in ("#status", "#error", *removes)},
                ExpressionAttributeValues={":unprovisioned": {"S": UNPROVISIONED.value},
                                           ":provisioning": {"S": PROVISIONING.value},
                                           ":error": {"S": error}, ":token": {"S": claim.token}})
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":  # the claim is gone already: nothing to undo
                raise

    def record_intent(self, claim: Claim, pending: PendingIssue) -> None:
        values = {":pregion": {"S": pending.region}, ":psince": {"N": repr(pending.since.timestamp())},
                  ":pmove": {"BOOL": pending.move}}
        sets = ["#pregion = :pregion", "#psince = :psince", "#pmove = :pmove"]
        if pending.fingerprint:
            values[":pfingerprint"] = {"S": pending.fingerprint}
            sets.append("#pfingerprint = :pfingerprint")
        removes = [name for name in ("#pfingerprint", "#pcert", "#pcreated")
                   if name != "#pfingerprint" or not pending.fingerprint]
        self._holding(claim, f"SET {', '.join(sets)} REMOVE {', '.join(removes)}", values)

    def record_certificate(self, claim: Claim, certificate_id: str, created_thing: bool) -> None:
        self._holding(claim, "SET #pcert = :pcert, #pcreated = :pcreated",
                      {":pcert": {"S": certificate_id}, ":pcreated": {"BOOL": created_thing}})

    def _holding(self, claim: Claim, update: str, values: dict[str, Any]) -> None:
        """A write on the device that only the holder of `claim` (a provisioning claim or a renewal lease) may make."""
        token, status = ("#rtoken", PROVISIONED) if claim.renewal else ("#token", PROVISIONING)
        names = set(re.findall(r"#\w+", update)) | {"#status", token}
        try:
            self._call("update_item", TableName=self._table, Key=self._key(claim.thing_name), UpdateExpression=update,
                       ConditionExpression=f"#status = :status AND {token} = :token",
                       ExpressionAttributeNames={name: _NAMES[name] for name in names},
                       ExpressionAttributeValues={**values, ":status": {"S": status.value},
                                                  ":token": {"S": claim.token}})
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            if claim.renewal:
                raise RenewalInProgress(
                    f"{claim.thing_name}: the renewal's lease ran out before it was recorded") from None
            raise ProvisioningInProgress(
                f"{claim.thing_name}: the claim's lease ran out before provisioning ended") from None

    def claims(self, now: datetime) -> builtins.list[ClaimState]:
        kwargs: dict[str, Any] = {"TableName": self._table,
                                  "FilterExpression": "#status = :provisioning OR attribute_exists(#pregion) "
                                                      "OR attribute_exists(#rlease)",
                                  "ExpressionAttributeNames": {k: _NAMES[k]
                                                               for k in ("#status", "#pregion", "#rlease")},
                                  "ExpressionAttributeValues": {":provisioning": {"S": PROVISIONING.value}}}
        found = []
        while True:
            page = self._call("scan", **kwargs)
            # A provisioned device's claim is its renewal lease.
            found += [ClaimState(raw["thing_name"]["S"], DeviceStatus(raw["prov_status"]["S"]),
                                 _moment(raw.get("claimed_at")),
                                 _moment(raw.get("renewal_lease" if raw["prov_status"]["S"] == PROVISIONED.value
                                                 else "lease_expires")), _pending(raw))
                      for raw in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return sorted(found, key=lambda state: state.thing_name)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def check(self) -> None:
        """Raise ServiceUnavailable unless both tables are there and ACTIVE (reads and writes are then served)."""
        for table in (self._table, self._nonces):
            status = self._call("describe_table", TableName=table)["Table"]["TableStatus"]
            if status != "ACTIVE":
                raise ServiceUnavailable(f"registry unavailable: DynamoDB table {table} is {status}")

    def _remember_nonce(self, thing_name: str, nonce: Nonce, now: datetime) -> bool:
        try:
            self._call("put_item", TableName=self._nonces,
                       Item={"nonce_key": {"S": f"{thing_name}\n{nonce.value}"},
                             "expires": {"N": repr(nonce.expires.timestamp())}},
                       ConditionExpression="attribute_not_exists(nonce_key) OR expires < :now",
                       ExpressionAttributeValues={":now": {"N": repr(now.timestamp())}})
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def stuck(self, now: datetime) -> builtins.list[DeviceRecord]:
        kwargs: dict[str, Any] = {
            "TableName": self._table, "FilterExpression": "#status = :provisioning AND #lease < :now",
            "ExpressionAttributeNames": {k: _NAMES[k] for k in ("#status", "#lease")},
            "ExpressionAttributeValues": {":provisioning": {"S": PROVISIONING.value},
                                          ":now": {"N": repr(now.timestamp())}}}
        found: builtins.list[DeviceRecord] = []
        while True:
            page = self._call("scan", **kwargs)
            found += [_record(raw) for raw in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return sorted(found, key=lambda record: record.thing_name)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def release_stuck(self, thing_name: str, now: datetime) -> bool:
        try:
            self._call(
                "update_item", TableName=self._table, Key=self._key(thing_name),
                UpdateExpression="SET #status = :unprovisioned, #error = :error REMOVE #token, #lease",
                ConditionExpression="#status = :provisioning AND #lease < :now",
                ExpressionAttributeNames={k: _NAMES[k] for k in ("#status", "#error", "#token", "#lease")},
                ExpressionAttributeValues={":unprovisioned": {"S": UNPROVISIONED.value},
                                           ":provisioning": {"S": PROVISIONING.value},
                                           ":error": {"S": "claim expired; released by audit"},
                                           ":now": {"N": repr(now.timestamp())}})
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def begin_reset(self, thing_name: str, revocations: Sequence[Revocation]) -> bool:
        try:
            self._call("update_item", TableName=self._table, Key=self._key(thing_name),
                       UpdateExpression="SET #reset = :reset", ConditionExpression="attribute_exists(#name)",
                       ExpressionAttributeNames={k: _NAMES[k] for k in ("#reset", "#name")},
                       ExpressionAttributeValues={":reset": {"S": revocations_json(revocations)}})
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def reset(self, thing_name: str, revoked: Collection[str] | None = None) -> DeviceRecord | None:
        update = ("SET #status = :unprovisioned REMOVE #datetime, #region, #cert, #fingerprint, #country, #reason, "
                  "#token, #lease, #error, #certkey, #prevcert, #prevkey, #prevregion, #retire, #rtoken, #rlease, "
                  "#expires, #serverkey, #reset")
        condition = "attribute_exists(#name)"
        values = {":unprovisioned": {"S": UNPROVISIONED.value}}
        if revoked is not None:  # nothing the device may still use is left out
            ids = {f":revoked{i}": {"S": certificate_id} for i, certificate_id in enumerate(sorted(set(revoked)))}
            among = ", ".join(ids)
            current = "attribute_not_exists(#cert)" + (f" OR #cert IN ({among})" if ids else "")
            previous = "attribute_not_exists(#retire)" + (f" OR #prevcert IN ({among})" if ids else "")
            condition += f" AND ({current}) AND ({previous})"
            values.update(ids)
        try:
            old = self._call(
                "update_item", TableName=self._table, Key=self._key(thing_name), UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={k: _NAMES[k] for k in set(re.findall(r"#\w+", f"{update} {condition}"))},
                ExpressionAttributeValues=values, ReturnValues="ALL_OLD")
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            return None
        return _record(old["Attributes"])

    # --- renewal -------------------------------------------------------------------------------------------

    def renewal_state(self, thing_name: str) -> RenewalState | None:
        raw = self._call("get_item", TableName=self._table, Key=self._key(thing_name), ConsistentRead=True).get("Item")
        state = _renewal_state(raw or _STAND_IN)  # the same work for an unknown device (items.STAND_IN_ITEM)
        return state if raw else None

    def begin_renewal(self, thing_name: str, certificate_id: str, now: datetime, lease_seconds: int,
                      nonce: Nonce | None = None) -> Claim:
        token, at = secrets.token_hex(16), now.timestamp()
        try:
            # ALL_OLD: the write-ahead record a dead renewal left comes back with the lease, no second read.
            won = self._call(
                "update_item", TableName=self._table, Key=self._key(thing_name),
                UpdateExpression="SET #rtoken = :token, #rlease = :lease, #claimed = :now",
                ConditionExpression="#status = :provisioned AND #cert = :cert "
                                    "AND (attribute_not_exists(#rlease) OR #rlease < :now) "
                                    "AND attribute_not_exists(#retire)",
                ExpressionAttributeNames={k: _NAMES[k] for k in ("#rtoken", "#rlease", "#claimed", "#status", "#cert",
                                                                 "#retire")},
                ExpressionAttributeValues={":token": {"S": token}, ":lease": {"N": repr(at + lease_seconds)},
                                           ":provisioned": {"S": PROVISIONED.value}, ":cert": {"S": certificate_id},
                                           ":now": {"N": repr(at)}},
                ReturnValues="ALL_OLD", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            old = e.response.get("Item")
            state = _renewal_state(old) if old else None
            if state is not None and state.certificate_id == certificate_id and state.renewing_until:
                raise RenewalInProgress(f"{thing_name} is being renewed by another request",
                                        retry_after=max(1, min(30, int(state.renewing_until - at) + 1))) from None
            raise RenewalRefused(RENEWAL_REFUSED) from None
        claim = Claim(thing_name, token, _pending(won.get("Attributes", {})), renewal=True)
        # The nonce after the lease (DynamoDB has no cheap two-table commit here): a replay gives the lease back,
        # and leaves a dead renewal's record for the next one to settle.
        if nonce is not None and not self._remember_nonce(thing_name, nonce, now):
            self.release(claim, "replayed request refused", keep_pending=True)
            raise replayed_request()
        return claim

    def begin_rekey(self, thing_name: str, now: datetime, lease_seconds: int, window_seconds: int,
                    fleet_key: bool = False, quiet_seconds: int = 0) -> Claim:
        token, at = secrets.token_hex(16), now.timestamp()
        # prov_datetime and last_renewal are clock.timestamp text: they sort as time does.
        condition = ("#status = :provisioned AND #serverkey = :one AND #datetime >= :since AND #datetime <= :quiet "
                     "AND (attribute_not_exists(#renewed) OR #renewed <= :quiet) "
                     "AND (attribute_not_exists(#rlease) OR #rlease < :now) AND attribute_not_exists(#retire)")
        if fleet_key:  # as in claim: a device with a key of its own does not take the fleet key's signature
            condition += " AND attribute_not_exists(#key)"
        update = "SET #rtoken = :token, #rlease = :lease, #claimed = :now"
        try:
            won = self._call(
                "update_item", TableName=self._table, Key=self._key(thing_name), UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={k: _NAMES[k] for k in set(re.findall(r"#\w+", f"{update} {condition}"))},
                ExpressionAttributeValues={":token": {"S": token}, ":lease": {"N": repr(at + lease_seconds)},
                                           ":provisioned": {"S": PROVISIONED.value}, ":one": {"N": "1"},
                                           ":since": {"S": _timestamp(now - timedelta(seconds=window_seconds))},
                                           ":quiet": {"S": _timestamp(now - timedelta(seconds=quiet_seconds))},
                                           ":now": {"N": repr(at)}},
                ReturnValues="ALL_OLD", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            old = e.response.get("Item")
            raise rekey_refusal(thing_name, _record(old) if old else None, fleet_key, now, quiet_seconds) from None
        return Claim(thing_name, token, _pending(won.get("Attributes", {})), renewal=True)

    def complete_renewal(self, claim: Claim, renewed: RenewedCertificate, now: datetime) -> None:
        old = self._call("get_item", TableName=self._table, Key=self._key(claim.thing_name),
                         ConsistentRead=True).get("Item") or {}
        values = {":region": {"S": renewed.region}, ":cert": {"S": renewed.certificate_id},
                  ":certkey": {"S": renewed.public_key}, ":fingerprint": {"S": renewed.fingerprint},
                  ":one": {"N": "1"}, ":renewed": {"S": _timestamp(now)}, ":token": {"S": claim.token},
                  ":provisioned": {"S": PROVISIONED.value}}
        sets = ["#region = :region", "#cert = :cert", "#certkey = :certkey", "#fingerprint = :fingerprint",
                "#renewed = :renewed", "#retire = :one"]
        removes = ["#rtoken", "#rlease", "#error", *_PENDING_NAMES]
        # The current certificate becomes the previous one; the condition below proves `old` is still current.
        for name, attribute in (("#prevcert", "certificate_id"), ("#prevkey", "certificate_public_key"),
                                ("#prevregion", "aws_region")):
            if "S" in old.get(attribute, {}):
                values[":" + name[1:]] = old[attribute]
                sets.append(f"{name} = :{name[1:]}")
            else:
                removes.append(name)
        for name, value in (("#country", renewed.country), ("#reason", renewed.reason)):
            if value:
                values[":" + name[1:]] = {"S": value}
                sets.append(f"{name} = :{name[1:]}")
        if renewed.expires:
            values[":expires"] = {"S": renewed.expires}
            sets.append("#expires = :expires")
        else:
            removes.append("#expires")
        if renewed.server_key:
            values[":serverkey"] = {"N": "1"}
            sets.append("#serverkey = :serverkey")
        else:
            removes.append("#serverkey")
        condition = "#rtoken = :token AND #status = :provisioned"
        if "S" in old.get("certificate_id", {}):
            condition += " AND #cert = :oldcert"
            values[":oldcert"] = old["certificate_id"]
        update = f"SET {', '.join(sets)} ADD #renewals :one REMOVE {', '.join(removes)}"
        try:
            self._call(
                "update_item", TableName=self._table, Key=self._key(claim.thing_name), UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={k: _NAMES[k] for k in set(re.findall(r"#\w+", f"{update} {condition}"))},
                ExpressionAttributeValues=values)
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            raise RenewalInProgress(f"{claim.thing_name}: the renewal's lease ran out before it was recorded") from None

    def _abandon_renewal(self, claim: Claim, error: str, keep_pending: bool) -> None:
        removes = ("#rtoken", "#rlease") + (() if keep_pending else _PENDING_NAMES)
        try:
            self._call(
                "update_item", TableName=self._table, Key=self._key(claim.thing_name),
                UpdateExpression=f"SET #error = :error REMOVE {', '.join(removes)}",
                ConditionExpression="#rtoken = :token",
                ExpressionAttributeNames={k: _NAMES[k] for k in ("#error", *removes)},
                ExpressionAttributeValues={":error": {"S": error}, ":token": {"S": claim.token}})
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":  # the lease is gone already: nothing to give back
                raise

    def reopen_renewal(self, thing_name: str, certificate_id: str, previous_fingerprint: str, now: datetime) -> bool:
        old = self._call("get_item", TableName=self._table, Key=self._key(thing_name),
                         ConsistentRead=True).get("Item") or {}
        if not all("S" in old.get(name, {}) for name in ("aws_region", "previous_certificate_id", "previous_region")):
            return False
        moved = old["aws_region"] != old["previous_region"]
        values: dict[str, Any] = {
            ":pregion": old["aws_region"], ":psince": {"N": repr(now.timestamp())}, ":pcert": {"S": certificate_id},
            ":pcreated": {"BOOL": moved}, ":pmove": {"BOOL": moved}, ":region": old["previous_region"],
            ":prevcert": old["previous_certificate_id"], ":fingerprint": {"S": previous_fingerprint},
            ":minus": {"N": "-1"}, ":error": {"S": f"renewal to {certificate_id} never answered; reopened"},
            ":provisioned": {"S": PROVISIONED.value}, ":now": {"N": repr(now.timestamp())}}
        sets = ["#pregion = :pregion", "#psince = :psince", "#pcert = :pcert", "#pcreated = :pcreated",
                "#pmove = :pmove", "#region = :region", "#cert = :prevcert", "#fingerprint = :fingerprint",
                "#error = :error"]
        removes = ["#prevcert", "#prevkey", "#prevregion", "#retire", "#expires"]
        for name, source in (("#pfingerprint", "public_key_fingerprint"), ("#certkey", "previous_public_key")):
            if "S" in old.get(source, {}):
                values[":" + name[1:]] = old[source]
                sets.append(f"{name} = :{name[1:]}")
            else:
                removes.append(name)
        update = f"SET {', '.join(sets)} ADD #renewals :minus REMOVE {', '.join(removes)}"
        # The item read above is the one changed: the same certificates, still waiting, no live lease.
        condition = ("#status = :provisioned AND #cert = :cert AND #prevcert = :prevcert AND attribute_exists(#retire) "
                     "AND (attribute_not_exists(#rlease) OR #rlease < :now)")
        values[":cert"] = {"S": certificate_id}
        names = {k: _NAMES[k] for k in set(re.findall(r"#\w+", f"{update} {condition}"))}
        try:
            self._call("update_item", TableName=self._table, Key=self._key(thing_name), UpdateExpression=update,
                       ConditionExpression=condition, ExpressionAttributeNames=names, ExpressionAttributeValues=values)
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def previous_retired(self, thing_name: str, certificate_id: str) -> None:
        self._conditional_update(thing_name, "REMOVE #retire", "#prevcert = :cert",
                                 ("#retire", "#prevcert"), {":cert": {"S": certificate_id}})

    def set_public_key(self, thing_name: str, certificate_id: str, public_key: str) -> None:
        self._conditional_update(thing_name, "SET #certkey = :key", "#cert = :cert", ("#certkey", "#cert"),
                                 {":cert": {"S": certificate_id}, ":key": {"S": public_key}})

    def _conditional_update(self, thing_name: str, update: str, condition: str, names: tuple[str, ...],
                            values: dict) -> None:
        try:
            self._call("update_item", TableName=self._table, Key=self._key(thing_name), UpdateExpression=update,
                       ConditionExpression=condition, ExpressionAttributeNames={k: _NAMES[k] for k in names},
                       ExpressionAttributeValues=values)
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise


def _renewal_state(raw: dict) -> RenewalState:
    def text(name: str) -> str | None:
        return raw.get(name, {}).get("S")

    lease = raw.get("renewal_lease", {}).get("N")
    return RenewalState(
        raw["thing_name"]["S"], text("prov_status") == PROVISIONED.value, text("aws_region"), text("certificate_id"),
        text("certificate_public_key"), text("public_key_fingerprint"), text("previous_certificate_id"),
        text("previous_public_key"), text("previous_region"), "retire_pending" in raw,
        float(lease) if lease else None, int(raw.get("renewal_count", {}).get("N", "0")), text("last_renewal"))
