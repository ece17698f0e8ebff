"""Each region's AWS IoT device endpoint, shared by every container through one item per region.

DescribeEndpoint has a small quota of its own (AWS IoT Core's "DescribeEndpoint API TPS", L-F30831DF); an
account's endpoint in a region never changes, so the first container to look it up keeps it here and the
others read it with one GetItem (DynamoDB's quotas are thousands per second). The items live in the nonces
table (`<table>-nonces`) like admission's schedules, under keys no nonce can have ('#' is not allowed in a
thing name); they carry no `expires`, so the table's TTL keeps them.
"""
from __future__ import annotations

from typing import Any

KEY_PREFIX = "#endpoint/"


class DynamoDbEndpoints:
    def __init__(self, client: Any, table: str, key_attribute: str = "nonce_key"):
        self._client = client
        self._table = table
        self._key_attribute = key_attribute

    def _key(self, region: str) -> dict:
        return {self._key_attribute: {"S": KEY_PREFIX + region}}

    def get(self, region: str) -> str | None:
        item = self._client.get_item(TableName=self._table, Key=self._key(region), ConsistentRead=False).get("Item")
        return item.get("address", {}).get("S") if item else None

    def put(self, region: str, address: str) -> None:
        self._client.put_item(TableName=self._table, Item={**self._key(region), "address": {"S": address}})
