"""Equal time for every 403 (domain/decoys.py): a signature check loads one key and verifies one signature of the
signature's kind, whether the device is unknown, has another kind of key, or has the key; a genuine signature of
every accepted kind still verifies. The time itself is bench/timing.py's to measure, not a test's."""
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from chalicelib.adapters.registry.items import STAND_IN_NAME
from chalicelib.domain.decoys import signed_by
from chalicelib.domain.requests import THING_NAME
from chalicelib.domain.signatures import load_device_key

TEXT = b"v2\nmydevice1\n2026-11-28T12:00:00Z\nnonce\n"


def pem(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign(key, text: bytes = TEXT) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(text, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(text, ec.ECDSA(hashes.SHA256()))


class Loads:
    """The caller's key loader, counting what it is given."""

    def __init__(self, load=lambda text: serialization.load_pem_public_key(text.encode())):
        self.pems: list[str] = []
        self._load = load

    def __call__(self, text: str):
        self.pems.append(text)
        return self._load(text)

    def kinds(self) -> list[str]:
        return [describe(serialization.load_pem_public_key(text.encode())) for text in self.pems]


def describe(public_key) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    return f"EC-{public_key.curve.key_size}"


@pytest.fixture(scope="module")
def keys() -> dict:
    return {"RSA-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "RSA-3072": rsa.generate_private_key(public_exponent=65537, key_size=3072),
            "EC-256": ec.generate_private_key(ec.SECP256R1()), "EC-384": ec.generate_private_key(ec.SECP384R1())}


def test_a_genuine_signature_of_every_accepted_kind_verifies_with_its_key_only(keys):
    for kind, key in keys.items():
        loads = Loads()
        assert signed_by(pem(key), TEXT, sign(key), loads), kind
        assert loads.kinds() == [kind]
        assert not signed_by(pem(key), TEXT + b"x", sign(key), Loads()), kind
        for other_kind, other in keys.items():
            if other_kind != kind:
                assert not signed_by(pem(other), TEXT, sign(key), Loads()), (kind, other_kind)


def test_an_unknown_device_costs_one_key_of_the_signatures_kind_as_a_registered_one_does(keys):
    for kind, key in keys.items():
        signature = sign(key)
        unknown, registered = Loads(), Loads()
        assert not signed_by(None, TEXT, signature, unknown)
        assert not signed_by(pem(key), TEXT + b"forged", signature, registered)
        assert unknown.kinds() == registered.kinds() == [kind]
        assert unknown.pems[0] != pem(key)  # a decoy, no device's key


def test_a_key_of_another_kind_than_the_signature_is_refused_after_a_decoy_of_the_signatures_kind(keys):
    forged = encode_dss_signature(12345, 67890)  # an ECDSA signature's shape, a P-256's size
    loads = Loads()
    assert not signed_by(pem(keys["RSA-2048"]), TEXT, forged, loads)
    assert loads.kinds() == ["RSA-2048"]  # the device's key, loaded as always; then the decoy's check
    garbage = os.urandom(300)  # the length of no accepted key: refused by its length whatever the key
    for key in (None, pem(keys["RSA-2048"]), pem(keys["EC-256"])):
        assert not signed_by(key, TEXT, garbage, Loads())


def test_a_registered_key_the_policy_refuses_raises_and_a_decoy_it_refuses_does_not(keys):
    weak = rsa.generate_private_key(public_exponent=3, key_size=2048)
    with pytest.raises(ValueError, match="65537"):
        signed_by(pem(weak), TEXT, sign(weak), load_device_key)
    # Signing keys are RSA or EC P-256: a P-384 signature's decoy is refused by that policy, quietly.
    loads = Loads(load_device_key)
    assert not signed_by(None, TEXT, sign(keys["EC-384"]), loads)
    assert loads.kinds() == ["EC-384"]


def test_the_registrys_stand_in_for_an_unknown_device_is_no_thing_name():
    assert not THING_NAME.fullmatch(STAND_IN_NAME)
