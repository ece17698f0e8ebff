"""The key policy's RSA exponent rule (chalicelib/domain/keypolicy.py): device RSA keys must have the public exponent 65537,
for a CSR's key and a per-device signing key alike, and the enrolment CSV refuses any other with a clear line."""
import csv

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from admin import cli as admin
from chalicelib.adapters.registry.sqlite import SqliteRegistry
from chalicelib.domain.keypolicy import CERTIFICATE_KEYS, RSA_EXPONENT, SIGNING_KEYS
from chalicelib.domain.signatures import load_device_key

MODULUS = rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=2048).public_key().public_numbers().n


def public_key(exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, MODULUS).public_key()


@given(exponent=st.integers(min_value=1, max_value=2**64).map(lambda n: 2 * n + 1))
def test_an_rsa_key_with_any_exponent_but_65537_is_refused_naming_the_rule(exponent):
    for policy in (CERTIFICATE_KEYS, SIGNING_KEYS):
        problem = policy.problem(public_key(exponent))
        if exponent == RSA_EXPONENT:
            assert problem is None
        else:
            assert f"public exponent {RSA_EXPONENT}, not {exponent}" in problem


def test_a_device_key_with_exponent_65537_is_accepted():
    assert CERTIFICATE_KEYS.problem(public_key(RSA_EXPONENT)) is None
    assert SIGNING_KEYS.problem(public_key(RSA_EXPONENT)) is None


def test_the_enrolment_csv_refuses_a_key_with_exponent_3_and_writes_nothing(tmp_path, capsys):
    e3 = rsa.generate_private_key(public_exponent=3, key_size=2048).public_key()
    pem = e3.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    good = public_key(RSA_EXPONENT).public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    load_device_key(good)  # the other row's key is fine: the file is refused for the e=3 row alone
    path = tmp_path / "fleet.csv"
    with open(path, "w", newline="") as out:
        csv.writer(out).writerows([["thing_name", "public_key"], ["good-dev", good], ["e3-dev", pem]])
    state = tmp_path / "state"
    assert admin.main(["--state-dir", str(state), "register", "--csv", str(path)]) == 2
    err = capsys.readouterr().err
    assert "public_key of e3-dev is not usable: an RSA signing key must have the public exponent 65537, not 3" in err
    assert "good-dev" not in err
    registry = state / "registry.sqlite3"
    assert not registry.exists() or list(SqliteRegistry(registry).list()) == []
