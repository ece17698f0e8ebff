"""The server's verifier against the shared test vectors (../shared/vectors/signatures.json)."""
import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.adapters.fleet_keys import load_public_key
from chalicelib.domain.errors import ConfigError, MalformedRequest
from chalicelib.domain.requests import ProvisioningRequest, RenewalRequest, decode_signature
from chalicelib.domain.signatures import FleetKeyVerifier, load_device_key, renew_v1_text, v1_text, v2_text, verifies
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


# --- renew-v1 (POST /device-renewal) ---------------------------------------------------------------------------

@pytest.mark.parametrize("case, key_name, csr", [("renew_v1_rsa_with_csr", "fleet_public_key_pem", True),
                                                 ("renew_v1_ec_without_csr", "device_ec_public_key_pem", False)])
def test_renew_v1_vectors_verify(vectors, case, key_name, csr):
    text = renew_v1_text(vectors["thing_name"], vectors["current_certificate_id"], vectors["timestamp"],
                         vectors["nonce"], vectors["csr_pem"] if csr else None)
    assert text.decode() == vectors[case]["signed_text"]
    assert verifies(public(vectors, key_name), text, decode_signature(vectors[case]["signature_b64"]))
    other = "fleet_public_key_pem" if key_name != "fleet_public_key_pem" else "device_ec_public_key_pem"
    assert not verifies(public(vectors, other), text, decode_signature(vectors[case]["signature_b64"]))


def test_renewal_request_of_the_vectors_rebuilds_the_signed_text(vectors):
    request = RenewalRequest.from_body(vectors["request_renewal_with_csr"])
    assert request.certificate_id == vectors["current_certificate_id"]
    assert request.signed_text().decode() == vectors["renew_v1_rsa_with_csr"]["signed_text"]
    assert verifies(public(vectors, "fleet_public_key_pem"), request.signed_text(), request.signature)


def test_a_v2_signature_is_no_renewal_signature(vectors):
    """The texts differ in their first line, so a captured provisioning request cannot be replayed as a renewal."""
    text = renew_v1_text(vectors["thing_name"], vectors["current_certificate_id"], vectors["timestamp"],
                         vectors["nonce"], vectors["csr_pem"])
    assert not verifies(public(vectors, "fleet_public_key_pem"), text,
                        decode_signature(vectors["v2_rsa_with_csr"]["signature_b64"]))


def test_the_device_client_signs_renew_v1_as_the_vectors(vectors):
    """The device's own signer (device/global_device.py ships alone) makes the vectors' text and signature."""
    from device import global_device
    key = serialization.load_pem_private_key(vectors["fleet_private_key_pem"].encode(), None)
    body = global_device.build_renewal_request(vectors["thing_name"], vectors["current_certificate_id"], key,
                                               vectors["csr_pem"], vectors["timestamp"], vectors["nonce"])
    assert body == vectors["request_renewal_with_csr"]  # RSA PKCS#1 v1.5 is deterministic
    ec_key = serialization.load_pem_private_key(vectors["device_ec_private_key_pem"].encode(), None)
    body = global_device.build_renewal_request(vectors["thing_name"], vectors["current_certificate_id"], ec_key,
                                               None, vectors["timestamp"], vectors["nonce"])
    text = vectors["renew_v1_ec_without_csr"]["signed_text"].encode()
    assert verifies(public(vectors, "device_ec_public_key_pem"), text, decode_signature(body["signature"]))
    assert "CSR" not in body


@pytest.mark.parametrize("present, missing", [("timestamp", "nonce"), ("nonce", "timestamp")])
def test_a_request_with_a_timestamp_or_a_nonce_is_v2_and_needs_both(vectors, present, missing):
    """Either field makes a request v2: one stripped of the other is malformed (400), never read as v1, whose
    signature covers only the thing name and can be replayed. (Kills: v2 detection's `or` changed to `and`.)"""
    v2 = vectors["request_v2_with_csr"]
    body = {**vectors["request_v1_without_csr"], present: v2[present]}
    with pytest.raises(MalformedRequest) as malformed:
        ProvisioningRequest.from_body(body)
    assert malformed.value.code == "missing-field" and missing in malformed.value.message
