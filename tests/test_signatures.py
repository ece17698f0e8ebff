"""The server's verifier against the shared test vectors (../shared/vectors/signatures.json)."""
import base64

import pytest
from cryptography.hazmat.primitives import serialization

from chalicelib.errors import ConfigError, MalformedRequest, SignatureInvalid
from chalicelib.signatures import FleetKeyVerifier, decode_signature, load_public_key


@pytest.fixture
def verifier(vectors):
    return FleetKeyVerifier(serialization.load_pem_public_key(vectors["fleet_public_key_pem"].encode()))


def test_v1_vector_verifies(verifier, vectors):
    v1 = vectors["v1"]
    verifier.verify(v1["signed_text"], decode_signature(v1["signature_b64"]))


def test_v1_vector_request_body_verifies(verifier, vectors):
    body = vectors["request_v1_without_csr"]
    verifier.verify(body["thing-name"], decode_signature(body["thing-name-sig"]))


def test_v1_signature_of_one_name_does_not_verify_another(verifier, vectors):
    with pytest.raises(SignatureInvalid):
        verifier.verify("mydevice4", decode_signature(vectors["v1"]["signature_b64"]))


def test_flipped_bit_does_not_verify(verifier, vectors):
    signature = bytearray(base64.b64decode(vectors["v1"]["signature_b64"]))
    signature[10] ^= 1
    with pytest.raises(SignatureInvalid):
        verifier.verify(vectors["thing_name"], bytes(signature))


@pytest.mark.parametrize("text", ["not base64!", "QUJD=X", "\u00e9"])
def test_non_base64_is_malformed(text):
    with pytest.raises(MalformedRequest):
        decode_signature(text)


def test_key_file_problems_are_config_errors(tmp_path, vectors):
    with pytest.raises(ConfigError, match="keygen"):
        load_public_key(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match="not a PEM"):
        load_public_key(tmp_path / "junk.pem")
    (tmp_path / "ec.pem").write_text(vectors["device_ec_public_key_pem"])
    with pytest.raises(ConfigError, match="RSA"):
        load_public_key(tmp_path / "ec.pem")
