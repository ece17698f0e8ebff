"""The server's verifier against the shared test vectors (../shared/vectors/signatures.json)."""
import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.errors import ConfigError, MalformedRequest
from chalicelib.signatures import FleetKeyVerifier, load_device_key, load_public_key, v1_text, v2_text, verifies
from chalicelib.wire import ProvisioningRequest, decode_signature
from tests.conftest import SHARED_VECTORS_PATH, VECTORS_COPY_PATH


@pytest.mark.skipif(not SHARED_VECTORS_PATH.is_file(), reason="no ../shared beside this clone to compare with")
def test_the_vectors_copy_equals_the_shared_original():
    assert json.loads(VECTORS_COPY_PATH.read_text()) == json.loads(SHARED_VECTORS_PATH.read_text())


def public(vectors, name):
    return serialization.load_pem_public_key(vectors[name].encode())


def test_v1_vector_verifies(vectors):
    v1 = vectors["v1"]
    assert v1_text(vectors["thing_name"]).decode() == v1["signed_text"]
    assert verifies(public(vectors, "fleet_public_key_pem"), v1_text(vectors["thing_name"]),
                    decode_signature(v1["signature_b64"]))


@pytest.mark.parametrize("case, csr", [("v2_rsa_with_csr", True), ("v2_rsa_without_csr", False)])
def test_v2_rsa_vectors_verify(vectors, case, csr):
    text = v2_text(vectors["thing_name"], vectors["timestamp"], vectors["nonce"], vectors["csr_pem"] if csr else None)
    assert text.decode() == vectors[case]["signed_text"]
    assert verifies(public(vectors, "fleet_public_key_pem"), text, decode_signature(vectors[case]["signature_b64"]))


def test_v2_ec_vector_verifies_with_the_device_key(vectors):
    text = v2_text(vectors["thing_name"], vectors["timestamp"], vectors["nonce"], vectors["csr_pem"])
    assert text.decode() == vectors["v2_ec_with_csr"]["signed_text"]
    key = load_device_key(vectors["device_ec_public_key_pem"])
    assert verifies(key, text, decode_signature(vectors["v2_ec_with_csr"]["signature_b64"]))
    assert not verifies(public(vectors, "fleet_public_key_pem"), text,
                        decode_signature(vectors["v2_ec_with_csr"]["signature_b64"]))


def test_request_bodies_of_the_vectors_rebuild_the_signed_text(vectors):
    v2 = ProvisioningRequest.from_body(vectors["request_v2_with_csr"])
    assert v2.version == 2 and v2.signed_text().decode() == vectors["v2_rsa_with_csr"]["signed_text"]
    v1 = ProvisioningRequest.from_body(vectors["request_v1_without_csr"])
    assert v1.version == 1 and v1.signed_text().decode() == vectors["v1"]["signed_text"]


def test_a_swapped_csr_breaks_the_v2_signature(vectors):
    text = v2_text(vectors["thing_name"], vectors["timestamp"], vectors["nonce"], vectors["csr_pem"] + "\n")
    assert not verifies(public(vectors, "fleet_public_key_pem"), text,
                        decode_signature(vectors["v2_rsa_with_csr"]["signature_b64"]))


def test_signature_of_one_name_does_not_verify_another(vectors):
    assert not verifies(public(vectors, "fleet_public_key_pem"), v1_text("mydevice4"),
                        decode_signature(vectors["v1"]["signature_b64"]))


def test_flipped_bit_does_not_verify(vectors):
    signature = bytearray(base64.b64decode(vectors["v1"]["signature_b64"]))
    signature[10] ^= 1
    assert not verifies(public(vectors, "fleet_public_key_pem"), v1_text(vectors["thing_name"]), bytes(signature))


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


def test_during_a_rotation_both_fleet_keys_verify(vectors):
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    old = public(vectors, "fleet_public_key_pem")
    signature = decode_signature(vectors["v1"]["signature_b64"])
    text = v1_text(vectors["thing_name"])
    assert FleetKeyVerifier(new.public_key(), old).verifies(text, signature)
    assert not FleetKeyVerifier(new.public_key()).verifies(text, signature)
