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
# A v2 nonce lives on its device's own item, as the attribute "nonce:<value>" holding the epoch second until which it
# is remembered: the claim's one conditional write checks and records it. Expired ones are removed by the device's
# next writes that know them (the commit, or the nonce's own write after a refused claim).
NONCE_PREFIX = "nonce:"
# A nonce of a request for a name not registered (yet): kept in the nonces table under this key plus the name (no
# nonce or thing name has '#'), with a TTL, and carried onto the item when the name is registered.
UNREGISTERED_PREFIX = "#unregistered/"
_NONCE_UNSEEN = "(attribute_not_exists(#nonce) OR #nonce < :at)"  # its last instant still counts as seen
_PRUNE_LIMIT = 64  # stale nonces removed by one write at most (the expression stays far below its 4 KB)
# What a claim changes, by kind, put back as it was by `withdraw`.
_TAKEN = {False: (("#status", "prov_status"), ("#token", "claim_token"), ("#lease", "lease_expires"),
                  ("#claimed", "claimed_at"), ("#attempts", "attempts")),
          True: (("#rtoken", "renewal_token"), ("#rlease", "renewal_lease"), ("#claimed", "claimed_at"))}


# The stand-in an unknown device's read is converted from (items.STAND_IN_ITEM); botocore's parse of the larger
# answer a registered device gets is not mirrored: it is small beside DynamoDB's own round trip.
_STAND_IN = {name: {"S": value} if isinstance(value, str) else {"N": repr(value)}
             for name, value in STAND_IN_ITEM.items()}


class _Refused(Exception):
    """A conditional write was refused; `item` is the item as the condition saw it (None: there is none)."""

    def __init__(self, item: dict[str, Any] | None) -> None:
        super().__init__("conditional write refused")
        self.item = item


def _nonce_name(nonce: Nonce) -> str:
    return NONCE_PREFIX + nonce.value


def _nonce_live(raw: Mapping[str, Any], nonce: Nonce, at: float) -> bool:
    seen = raw.get(_nonce_name(nonce), {}).get("N")
    return seen is not None and float(seen) >= at


def _stale_nonces(raw: Mapping[str, Any], at: float) -> builtins.list[str]:
    return [name for name, value in raw.items()
            if name.startswith(NONCE_PREFIX) and float(value.get("N", "0")) < at][:_PRUNE_LIMIT]


def _intent_update(intent: PendingIssue) -> tuple[builtins.list[str], dict[str, Any]]:
    """The SET clauses and values that write `intent` as the write-ahead record over none."""
    values = {":pregion": {"S": intent.region}, ":psince": {"N": repr(intent.since.timestamp())},
              ":pmove": {"BOOL": intent.move}}
    sets = ["#pregion = :pregion", "#psince = :psince", "#pmove = :pmove"]
    if intent.fingerprint:
        values[":pfingerprint"] = {"S": intent.fingerprint}
        sets.append("#pfingerprint = :pfingerprint")
    return sets, values


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _stale_names(claim: Claim) -> dict[str, str]:
    """Placeholders of the expired nonces the claim's write saw, for the commit to remove."""
    stale = claim.restore.get("stale")
    return {f"#stale{i}": name for i, name in enumerate(stale)} if isinstance(stale, list) else {}


def _claimable(record: DeviceRecord, at: float) -> bool:
    """The claim's condition on the device's state, read from the item a refused claim saw."""
    return record.status is UNPROVISIONED or (record.status is PROVISIONING and record.lease_expires is not None
                                               and record.lease_expires.timestamp() < at)


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
    """`executor` (the composition root's pool) runs registration's reads side by side; `sleep` waits between
    retries of unprocessed batch items."""

    def __init__(self, client: Any, table_name: str = DEFAULT_TABLE_NAME, page_size: int | None = None, *,
                 executor: Executor, sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._table = table_name
        self._nonces = f"{table_name}-nonces"  # nonces of names not registered; admission's and endpoints' items
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
        # DynamoDB deletes the nonces of names not registered by itself once they expire (within days; the conditions
        # treat an expired nonce as unseen meanwhile).
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
            refused = self._executor.submit(self._unregistered_nonces, names_chunk)  # beside the next read
            existing = self._existing(names_chunk)
            new = [name for name in names_chunk if name not in existing]
            carried = refused.result()
            # BatchWriteItem cannot be conditional, so existing names were filtered out above. Only a concurrent
            # register of the same new name can race this, and it writes the same fresh item.
            for chunk in _chunks(new, _BATCH_WRITE_LIMIT):
                self._write_batch([{"PutRequest": {"Item": {
                    **self._new_item(name, keys.get(name), attrs.get(name)), **carried.get(name, {})}}}
                    for name in chunk])
            # A nonce refused while this ran was written after the read above: look once more, now that the items
            # exist (a request refused later finds the item and writes its nonce there itself).
            for name, nonces in (self._unregistered_nonces(new) if new else {}).items():
                late = {attribute: expires for attribute, expires in nonces.items()
                        if attribute not in carried.get(name, {})}
                if late:
                    self._carry_nonces(name, late)
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
        return {raw["thing_name"]["S"] for raw in self._batch_get(
            self._table, [self._key(name) for name in names], "#name", {"#name": "thing_name"})}

    def _batch_get(self, table: str, keys: builtins.list[dict[str, Any]], projection: str | None = None,
                   names: dict[str, str] | None = None) -> builtins.list[dict[str, Any]]:
        """Strongly consistent BatchGetItem of `keys`, 100 at a time, retrying unprocessed keys."""
        found: builtins.list[dict[str, Any]] = []
        for chunk in _chunks(keys, _BATCH_GET_LIMIT):
            wanted: dict[str, Any] = {"Keys": chunk, "ConsistentRead": True}
            if projection:
                wanted.update(ProjectionExpression=projection, ExpressionAttributeNames=names)
            request: dict[str, Any] | None = {table: wanted}
            for attempt in range(_BATCH_ATTEMPTS):
                response = self._call("batch_get_item", RequestItems=request)
                found.extend(response["Responses"].get(table, []))
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

    def _update(self, thing_name: str, update: str, condition: str, values: dict[str, Any],
                names: Mapping[str, str] | None = None, table: str | None = None,
                key: dict[str, Any] | None = None, old: bool = False) -> dict[str, Any]:
        """One conditional UpdateItem; raises _Refused with the item the refused condition saw, so that telling why
        costs no second read. With `old`, returns the item as it was (ALL_OLD). `names`: placeholders beyond
        _NAMES."""
        all_names = {k: _NAMES[k] for k in set(re.findall(r"#\w+", f"{update} {condition}")) if k in _NAMES}
        all_names.update(names or {})
        try:
            response = self._call(
                "update_item", TableName=table or self._table, Key=key or self._key(thing_name),
                UpdateExpression=update, ConditionExpression=condition, ExpressionAttributeNames=all_names,
                ExpressionAttributeValues=values, ReturnValues="ALL_OLD" if old else "NONE",
                ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":
                raise
            raise _Refused(e.response.get("Item")) from None
        return response.get("Attributes", {})

    def _take(self, thing_name: str, sets: builtins.list[str], condition: str, values: dict[str, Any], at: float,
              nonce: Nonce | None, intent: PendingIssue | None, renewal: bool, adds: str = "") -> Claim:
        """The one write of a claim or a renewal lease: with the nonce (unseen, or expired) and the write-ahead
        intent (over none) when given. Raises _Refused."""
        names: dict[str, str] = {}
        values = dict(values)
        if intent is not None:  # a dead attempt's record is never written over: its holder settles it first
            intent_sets, intent_values = _intent_update(intent)
            sets, condition = [*sets, *intent_sets], f"{condition} AND attribute_not_exists(#pregion)"
            values.update(intent_values)
        if nonce is not None:
            names["#nonce"] = _nonce_name(nonce)
            sets, condition = [*sets, "#nonce = :nonce"], f"{condition} AND {_NONCE_UNSEEN}"
            values.update({":nonce": {"N": repr(nonce.expires.timestamp())}, ":at": {"N": repr(at)}})
        token = values[":token"]["S"]
        old = self._update(thing_name, f"SET {', '.join(sets)}{adds}", condition, values, names, old=True)
        return Claim(thing_name, token, None if intent is not None else _pending(old), renewal=renewal, intent=intent,
                     restore={"item": old, "stale": _stale_nonces(old, at)})

    def claim(self, thing_name: str, now: datetime, lease_seconds: int, fleet_key: bool = False,
              nonce: Nonce | None = None, intent: PendingIssue | None = None) -> Claim:
        at = now.timestamp()
        condition = ("attribute_exists(#name) AND (#status = :unprovisioned "
                     "OR (#status = :provisioning AND #lease < :now))")
        if fleet_key:  # a device with a key of its own may not be claimed with the fleet key's signature
            condition += " AND attribute_not_exists(#key)"
        sets = ["#status = :provisioning", "#token = :token", "#lease = :lease", "#claimed = :now"]
        while True:
            values = {":provisioning": {"S": PROVISIONING.value}, ":unprovisioned": {"S": UNPROVISIONED.value},
                      ":token": {"S": secrets.token_hex(16)}, ":lease": {"N": repr(at + lease_seconds)},
                      ":now": {"N": repr(at)}, ":one": {"N": "1"}}
            try:
                # ALL_OLD: the write-ahead record a dead attempt left comes back with the won claim, no second read.
                return self._take(thing_name, sets, condition, values, at, nonce, intent, False, " ADD #attempts :one")
            except _Refused as refused:
                old = refused.item
            if old is None:  # not registered: the nonce is kept apart until the name is
                if nonce is not None:
                    self._remember_unregistered(thing_name, nonce, at)
                raise claim_refusal(thing_name, None, fleet_key, now)
            record = _record(old)
            if fleet_key and record.public_key:  # not the device's signature: nothing is used up
                raise claim_refusal(thing_name, record, fleet_key, now)
            if nonce is not None and _nonce_live(old, nonce, at):
                raise replayed_request()
            if intent is not None and "pending_region" in old and _claimable(record, at):
                intent = None  # a dead attempt's record: the claim alone takes it over, the holder settles it
                continue
            if nonce is not None:  # a refused claim still uses up its nonce
                self._remember_nonce(thing_name, nonce, at, _stale_nonces(old, at))
            raise claim_refusal(thing_name, record, fleet_key, now)

    def withdraw(self, claim: Claim) -> None:
        old = claim.restore.get("item")
        if not isinstance(old, dict):  # not a claim of this registry's making: its lease frees it
            return
        values: dict[str, Any] = {":token": {"S": claim.token}}
        sets, removes = [], [*(_PENDING_NAMES if claim.intent is not None else ())]
        for name, attribute in _TAKEN[claim.renewal]:
            if attribute in old:
                values[f":old{name[1:]}"] = old[attribute]
                sets.append(f"{name} = :old{name[1:]}")
            else:
                removes.append(name)
        if claim.renewal:
            condition = "#rtoken = :token"
        else:
            condition = "#token = :token AND #status = :provisioning"
            values[":provisioning"] = {"S": PROVISIONING.value}
        update = " ".join(part for part in (sets and f"SET {', '.join(sets)}",
                                            removes and f"REMOVE {', '.join(removes)}") if part)
        try:
            self._update(claim.thing_name, update, condition, values)
        except _Refused:  # the lease is gone already: nothing to give back
            pass

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
        stale = _stale_names(claim)
        update = f"SET {', '.join(sets)} REMOVE {', '.join([*removes, *stale])}"
        try:
            self._update(claim.thing_name, update, "#status = :provisioning AND #token = :token", values, stale)
        except _Refused:
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
        sets, values = _intent_update(pending)
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

    def _remember_nonce(self, thing_name: str, nonce: Nonce, at: float, stale: builtins.list[str]) -> None:
        """Record a refused request's nonce on the device's item (removing the `stale` ones it knows of); raises
        replayed-request when the nonce was recorded meanwhile."""
        stale = [name for name in stale if name != _nonce_name(nonce)]
        names = {"#nonce": _nonce_name(nonce), **{f"#stale{i}": name for i, name in enumerate(stale)}}
        update = "SET #nonce = :nonce" + (f" REMOVE {', '.join(f'#stale{i}' for i in range(len(stale)))}"
                                          if stale else "")
        try:
            self._update(thing_name, update, f"attribute_exists(#name) AND {_NONCE_UNSEEN}",
                         {":nonce": {"N": repr(nonce.expires.timestamp())}, ":at": {"N": repr(at)}}, names)
        except _Refused:
            raise replayed_request() from None

    def _carry_nonces(self, thing_name: str, nonces: Mapping[str, Any]) -> None:
        """Nonces refused while the name was not registered, onto its item (one recorded since stays as it is)."""
        names = {f"#carried{i}": attribute for i, attribute in enumerate(nonces)}
        update = "SET " + ", ".join(f"{name} = if_not_exists({name}, :{name[1:]})" for name in names)
        try:
            self._update(thing_name, update, "attribute_exists(#name)",
                         {f":{name[1:]}": nonces[attribute] for name, attribute in names.items()}, names)
        except _Refused:  # not registered after all
            pass

    def _remember_unregistered(self, thing_name: str, nonce: Nonce, at: float) -> None:
        """A nonce of a request for a name not registered: kept in the nonces table (with a TTL) until the name is
        registered, which carries it onto the new item; raises replayed-request when it was seen before."""
        expires = {"N": repr(nonce.expires.timestamp())}
        try:
            self._update(thing_name, "SET #nonce = :nonce, #ttl = :nonce", _NONCE_UNSEEN,
                         {":nonce": expires, ":at": {"N": repr(at)}}, {"#nonce": _nonce_name(nonce), "#ttl": "expires"},
                         table=self._nonces, key={"nonce_key": {"S": UNREGISTERED_PREFIX + thing_name}})
        except _Refused:
            raise replayed_request() from None
        # Registered meanwhile: register carries what it finds, but may have looked just before this write.
        if self.get(thing_name) is not None:
            self._carry_nonces(thing_name, {_nonce_name(nonce): expires})

    def _unregistered_nonces(self, names: builtins.list[str]) -> dict[str, dict[str, Any]]:
        """Nonces of requests refused before each name was registered, by name (expired ones too: the item's next
        commit removes those)."""
        found = {}
        for raw in self._batch_get(self._nonces, [{"nonce_key": {"S": UNREGISTERED_PREFIX + name}} for name in names]):
            nonces = {k: v for k, v in raw.items() if k.startswith(NONCE_PREFIX)}
            if nonces:
                found[raw["nonce_key"]["S"][len(UNREGISTERED_PREFIX):]] = nonces
        return found

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
                      nonce: Nonce | None = None, intent: PendingIssue | None = None) -> Claim:
        at = now.timestamp()
        condition = ("#status = :provisioned AND #cert = :cert AND (attribute_not_exists(#rlease) OR #rlease < :now) "
                     "AND attribute_not_exists(#retire)")
        while True:
            values = {":token": {"S": secrets.token_hex(16)}, ":lease": {"N": repr(at + lease_seconds)},
                      ":provisioned": {"S": PROVISIONED.value}, ":cert": {"S": certificate_id}, ":now": {"N": repr(at)}}
            try:
                # ALL_OLD: the write-ahead record a dead renewal left comes back with the lease, no second read.
                return self._take(thing_name, ["#rtoken = :token", "#rlease = :lease", "#claimed = :now"], condition,
                                  values, at, nonce, intent, True)
            except _Refused as refused:
                old = refused.item
            state = _renewal_state(old) if old else None
            # The lease's own condition first, as the item showed it; then the nonce; then a dead renewal's record.
            if state is None or not state.provisioned or state.certificate_id != certificate_id or state.retire_pending:
                raise RenewalRefused()
            if state.renewing_until is not None and state.renewing_until >= at:
                raise RenewalInProgress(f"{thing_name} is being renewed by another request",
                                        retry_after=max(1, min(30, int(state.renewing_until - at) + 1)))
            if nonce is not None and old is not None and _nonce_live(old, nonce, at):
                raise replayed_request()
            if intent is None:
                raise RenewalRefused()
            intent = None  # a dead renewal's record: the lease alone takes it over, the holder settles it

    def begin_rekey(self, thing_name: str, now: datetime, lease_seconds: int, window_seconds: int,
                    fleet_key: bool = False, quiet_seconds: int = 0, intent: PendingIssue | None = None) -> Claim:
        at = now.timestamp()
        # prov_datetime and last_renewal are clock.timestamp text: they sort as time does.
        condition = ("#status = :provisioned AND #serverkey = :one AND #datetime >= :since AND #datetime <= :quiet "
                     "AND (attribute_not_exists(#renewed) OR #renewed <= :quiet) "
                     "AND (attribute_not_exists(#rlease) OR #rlease < :now) AND attribute_not_exists(#retire)")
        if fleet_key:  # as in claim: a device with a key of its own does not take the fleet key's signature
            condition += " AND attribute_not_exists(#key)"
        while True:
            values = {":token": {"S": secrets.token_hex(16)}, ":lease": {"N": repr(at + lease_seconds)},
                      ":provisioned": {"S": PROVISIONED.value}, ":one": {"N": "1"},
                      ":since": {"S": _timestamp(now - timedelta(seconds=window_seconds))},
                      ":quiet": {"S": _timestamp(now - timedelta(seconds=quiet_seconds))}, ":now": {"N": repr(at)}}
            try:
                return self._take(thing_name, ["#rtoken = :token", "#rlease = :lease", "#claimed = :now"], condition,
                                  values, at, None, intent, True)
            except _Refused as refused:
                old = refused.item
            if intent is None or old is None or "pending_region" not in old:
                raise rekey_refusal(thing_name, _record(old) if old else None, fleet_key, now, quiet_seconds)
            intent = None  # perhaps only a dead re-key's record stood in the way: the lease alone takes it over

    def complete_renewal(self, claim: Claim, renewed: RenewedCertificate, now: datetime) -> None:
        # The item as the lease found it (the condition below proves its certificate is still current).
        old = claim.restore.get("item")
        if not isinstance(old, dict):
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
        stale = _stale_names(claim)
        update = f"SET {', '.join(sets)} ADD #renewals :one REMOVE {', '.join([*removes, *stale])}"
        try:
            self._update(claim.thing_name, update, condition, values, stale)
        except _Refused:
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
