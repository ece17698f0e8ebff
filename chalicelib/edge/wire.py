"""The HTTP bodies: the JSON parse under the size limit, the success and error bodies (docs/protocol.md)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from chalicelib.domain.errors import BodyTooLarge, MalformedRequest

if TYPE_CHECKING:
    from chalicelib.domain.answers import Answer


MAX_BODY_BYTES = 16 * 1024


def parse_json(raw: bytes | str) -> Any:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"the body must be at most {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise MalformedRequest("the body is not valid JSON") from None


def response_body(result: Answer) -> dict[str, Any]:
    """HTTP 200's body; `PrivateKey` only when the service made the key pair; a renewal's `previousCertificateId`."""
    body: dict[str, Any] = {
        "status": "success",
        "thingName": result.thing_name,
        "region": result.choice.region,
        "distance": result.choice.distance_km,
        "reason": result.choice.reason,
        **({"country": result.choice.country} if result.choice.country else {}),
        "endpointAddress": result.issued.endpoint.address,
        "endpointPort": result.issued.endpoint.port,
        "certificateId": result.issued.certificate_id,
        "certificatePem": result.issued.certificate_pem,
    }
    if result.issued.private_key_pem is not None:
        body["PrivateKey"] = result.issued.private_key_pem
    if result.note:
        body["message"] = result.note
    if result.previous_certificate_id is not None:
        body["previousCertificateId"] = result.previous_certificate_id
    return body


def error_body(code: str, message: str) -> dict[str, str]:
    """Every refusal's body: the original sample's shape with a stable code."""
    return {"status": "error", "code": code, "message": message}
