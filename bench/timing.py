"""Equal time for every 403: how well an attacker without a device's key tells a registered thing name from an
unknown one by how long the refusal takes (the bodies are byte-identical, so time is all there is to go on).

Through devstack's `chalice local` on loopback (what `make local` serves), one kept-alive connection, the
requests of the two names interleaved so the machine's drifts weigh on both alike. The attacker's test: the
median of 101 refusals for a registered name against the median of 101 for an unknown name; the bench draws
such pairs of 101 from its pools many times and counts how often the slower median is the registered name's
(or the faster, whichever way the pools lean: an attacker would learn the direction). 0.5 is a coin toss.

Three comparisons, each against an unknown name:
- provisioning, a device with its own signing key (EC P-256), signed with a garbage ECDSA signature;
- renewal, a provisioned device, a made-up certificate id (an attacker does not know the real one);
- renewal, the device's real certificate id (seen in a TLS 1.2 handshake, say) and a garbage signature;
and a control, two unknown names: what the method reads when there is nothing to tell (the pools are finite, so
it sits a little above 0.5).

`python -m bench.timing [--size quick]` runs it alone; `make bench` writes it into bench/results.json.
"""
import base64
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import run_alone

SIZES = {"full": dict(requests=3030, trials=4000), "quick": dict(requests=1212, trials=4000),
         "tiny": dict(requests=24, trials=200)}
PER_MEDIAN = 101  # requests per name behind each median the attacker compares
LONDON_IP = "81.2.69.142"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def fraction_right(registered: list[float], unknown: list[float], trials: int, per_median: int = PER_MEDIAN,
                   seed: int = 26) -> float:
    """How often the attacker classifies right: medians of `per_median` draws from each pool compared, `trials`
    times; the larger of the two directions (ties count half)."""
    rng = random.Random(seed)
    n = min(per_median, len(registered) // 4, len(unknown) // 4) or 1  # pools several times a median's draw
    slower = 0.0
    for _ in range(trials):
        a, b = statistics.median(rng.sample(registered, n)), statistics.median(rng.sample(unknown, n))
        slower += 1.0 if a > b else 0.5 if a == b else 0.0
    share = slower / trials
    return round(max(share, 1 - share), 3)


def garbage_ecdsa_signature() -> str:
    """Base64 of a DER ECDSA signature of P-256's shape that verifies for no key: what a forger sends."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    r, s = (secrets.randbelow(_P256_ORDER - 1) + 1 for _ in range(2))
    return base64.b64encode(encode_dss_signature(r, s)).decode()


def _now() -> str:
    from chalicelib.domain.clock import timestamp, utcnow
    return timestamp(utcnow())


def provisioning_body(name: str) -> dict:
    return {"thing-name": name, "thing-name-sig": garbage_ecdsa_signature(), "timestamp": _now(),
            "nonce": secrets.token_hex(12)}


def renewal_body(name: str, certificate_id: str) -> dict:
    return {"thing-name": name, "certificateId": certificate_id, "timestamp": _now(), "nonce": secrets.token_hex(12),
            "signature": garbage_ecdsa_signature()}


def compare(post: Callable[[dict], tuple[int, bytes]], bodies: Callable[[str], dict], registered: str,
            unknown: str, count: int, trials: int) -> dict[str, Any]:
    """`count` refusals for each name, interleaved (which goes first alternates); each body made before its clock
    starts. Every answer must be the same 403 body, else the comparison says so."""
    times: dict[str, list[float]] = {registered: [], unknown: []}
    answers: set[tuple[int, bytes]] = set()
    for i in range(count):
        for name in (registered, unknown) if i % 2 == 0 else (unknown, registered):
            body = bodies(name)
            began = time.perf_counter()
            answer = post(body)
            times[name].append(time.perf_counter() - began)
            answers.add(answer)
    reg, unk = times[registered], times[unknown]
    return {"requests_per_name": count, "per_median": min(PER_MEDIAN, count // 4) or 1,
            "registered_median_us": round(statistics.median(reg) * 1e6, 1),
            "unknown_median_us": round(statistics.median(unk) * 1e6, 1),
            "fraction_right": fraction_right(reg, unk, trials),
            "one_answer": len(answers) == 1 and next(iter(answers))[0] == 403}


def bench(size: str = "full") -> dict:
    import requests
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    from admin import cli as admin
    from bench import local_http
    from bench.devices import make_csr
    from devstack.stack import LocalStack, free_port

    n = SIZES[size]
    results: dict[str, Any] = {}
    with local_http.registered_stage("timing-", 1) as (settings, fleet), tempfile.TemporaryDirectory() as tmp:
        # A device with its own signing key: the fleet key's signature is not accepted for it.
        own = ec.generate_private_key(ec.SECP256R1())
        public = Path(tmp) / "own.pub.pem"
        public.write_bytes(own.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                admin.main(["--state-dir", str(settings.state_dir), "register", "timing-own", "--public-key",
                            str(public)])
            finally:
                sys.stdout = stdout
        with LocalStack(settings, free_port(), quiet=True) as stack, requests.Session() as session:
            headers = {"Content-Type": "application/json", "X-Forwarded-For": LONDON_IP}

            def poster(route: str) -> Callable[[dict], tuple[int, bytes]]:
                url = f"{stack.api_url}/{route}"

                def post(body: dict) -> tuple[int, bytes]:
                    response = session.post(url, data=json.dumps(body), headers=headers, timeout=30)
                    return response.status_code, response.content
                return post

            # A provisioned device (EC P-256 key from its CSR) to renew; the fleet key signs its provisioning (v1).
            signature = fleet.sign(b"timing-1", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
            answer = session.post(f"{stack.api_url}/device-provisioning", headers=headers, timeout=60, json={
                "thing-name": "timing-1", "thing-name-sig": base64.b64encode(signature).decode(),
                "CSR": make_csr("timing-1", ec.generate_private_key(ec.SECP256R1()))}).json()
            certificate_id = answer["certificateId"]
            made_up = secrets.token_hex(32)
            unknown = f"timing-unknown-{secrets.token_hex(4)}"
            provision, renew = poster("device-provisioning"), poster("device-renewal")
            for _ in range(20):  # the first requests build the service and fill caches (not timed)
                provision(provisioning_body(unknown))
                renew(renewal_body(unknown, made_up))
            results["provisioning_own_key"] = compare(provision, provisioning_body, "timing-own", unknown,
                                                      n["requests"], n["trials"])
            results["renewal_wrong_certificate_id"] = compare(
                renew, lambda name: renewal_body(name, made_up), "timing-1", unknown, n["requests"], n["trials"])
            results["renewal_right_certificate_id"] = compare(
                renew, lambda name: renewal_body(name, certificate_id if name == "timing-1" else made_up),
                "timing-1", unknown, n["requests"], n["trials"])
            # The control: two unknown names, which nothing can tell apart; what this reads is the method's floor.
            results["control_two_unknown_names"] = compare(provision, provisioning_body, unknown, f"{unknown}-b",
                                                           n["requests"], n["trials"])
    return results


LABELS = {"provisioning_own_key": "provisioning, device with its own key",
          "renewal_wrong_certificate_id": "renewal, made-up certificate id",
          "renewal_right_certificate_id": "renewal, real certificate id, forged signature",
          "control_two_unknown_names": "control, provisioning"}


def rows(result: dict) -> list[tuple[str, str, str]]:
    """Table rows for bench/run.py: one per comparison."""
    out = []
    for key, label in LABELS.items():
        r = result[key]
        names = "two unknown names" if key.startswith("control") else "registered vs unknown name"
        out.append((f"403 timing, {label}: {names}, medians of {r['per_median']}",
                    f"{100 * r['fraction_right']:.1f}% right",
                    f"50% is a coin toss; medians {r['registered_median_us']} / {r['unknown_median_us']} us, "
                    f"{r['requests_per_name']} requests per name"
                    + ("" if r["one_answer"] else "; **the answers differ**")))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_alone("python -m bench.timing", __doc__, SIZES, bench, rows, argv)


if __name__ == "__main__":
    sys.exit(main())
