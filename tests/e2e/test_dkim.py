"""DKIM as a receiver checks it: keys made with `optgate dkim keygen`, published (to a
stub DNS) as the record it prints, and every copy verified by an independent verifier
(dkimpy): RSA and Ed25519 side by side, both List-* fields signed, and a key generated
by `serve` for a From domain that has none."""

import base64
import re
import stat

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from helpers import (
    PURPOSES,
    deliver,
    dkim_tags,
    dkim_verify,
    dns_record,
    generated_dkim_record,
    make_message,
    run_optgate,
    subscriber,
    unique,
)

# What h= must cover (RFC 8058 §4 asks for both List-* fields).
MUST_SIGN = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
}
SELECTORS = {"s1": "rsa", "e1": "ed25519"}
ED25519_OID = bytes.fromhex("06032b6570")  # 1.3.101.112


def keygen(domain: str, selector: str, algorithm: str, out):
    return run_optgate("dkim", "keygen", "--domain", domain, "--selector", selector, "--algorithm", algorithm, "--out", str(out))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """Per selector: the key file and the DNS record `optgate dkim keygen` printed."""
    folder = tmp_path_factory.mktemp("dkim-keys")
    made = {}
    for selector, algorithm in SELECTORS.items():
        path = folder / f"{selector}.pem"
        result = keygen("example.com", selector, algorithm, path)
        assert result.code == 0, result
        made[selector] = {"path": path, "line": result.out.strip(), "record": dns_record(result.out)}
    return made


@pytest.fixture(scope="module")
def gate(launch_shared, upstream, keys):
    """A gateway with an RSA and an Ed25519 key for example.com."""
    configured = [
        {"domain": "example.com", "selector": s, "algorithm": f"{a}-sha256", "private_key": str(keys[s]["path"])}
        for s, a in SELECTORS.items()
    ]
    return launch_shared(upstream.port, dkim={"key": configured})


def records(keys) -> dict:
    return dict(k["record"] for k in keys.values())


def verdicts(data: bytes, published: dict) -> list[bool]:
    """Whether each DKIM-Signature of `data` verifies (dkimpy), in order."""

    def verifies(index: int) -> bool:
        try:
            return dkim.DKIM(data).verify(idx=index, dnsfunc=lambda name, timeout=5: published.get(name.decode().rstrip(".").lower()))
        except dkim.DKIMException:
            return False

    return [verifies(i) for i in range(len(dkim_tags(data)))]


def public_key_of(pem: bytes) -> str:
    """The p= of a private key's DNS record, derived independently (cryptography):
    SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519 (RFC 8463)."""
    der = base64.b64decode("".join(line for line in pem.decode().splitlines() if not line.startswith("-----")))
    if ED25519_OID in der:
        # RFC 8410: the 32-byte seed is an OCTET STRING inside the privateKey OCTET
        # STRING (04 22 04 20 …). Read by hand: cryptography refuses the v2 PKCS#8
        # (with the public key appended) that optgate writes.
        at = der.index(b"\x04\x22\x04\x20") + 4
        public = ed25519.Ed25519PrivateKey.from_private_bytes(der[at : at + 32]).public_key()
        return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    public = serialization.load_pem_private_key(pem, password=None).public_key()
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(spki).decode()


def test_keygen_writes_a_private_key_and_prints_its_dns_record(keys, tmp_path):
    """`optgate dkim keygen` writes a PEM only its owner can read, prints `SEL._domainkey.DOMAIN. IN TXT "v=DKIM1; k=…; p=…"` whose key matches the file, and will not overwrite a key."""
    for selector, algorithm in SELECTORS.items():
        made = keys[selector]
        assert re.fullmatch(
            rf'{selector}\._domainkey\.example\.com\. IN TXT "v=DKIM1; k={algorithm}; p=[A-Za-z0-9+/=]+"', made["line"]
        ), made["line"]
        name, text = made["record"]
        assert name == f"{selector}._domainkey.example.com"
        assert stat.S_IMODE(made["path"].stat().st_mode) == 0o600
        pem = made["path"].read_bytes()
        assert pem.startswith(b"-----BEGIN ") and b"PRIVATE KEY-----" in pem
        assert text.endswith(f"p={public_key_of(pem)}"), f"{selector}: the record does not publish the key written"

    before = keys["s1"]["path"].read_bytes()
    again = keygen("example.com", "s1", "rsa", keys["s1"]["path"])
    assert again.code != 0 and str(keys["s1"]["path"]) in again.err, again
    assert keys["s1"]["path"].read_bytes() == before
    bad = keygen("not a domain", "s1", "rsa", tmp_path / "bad.pem")
    assert bad.code != 0 and "not a domain" in bad.err, bad


def test_rsa_and_ed25519_signatures_both_verify(gate, upstream, keys):
    """A newsletter copy carries an rsa-sha256 and an ed25519-sha256 signature (d=example.com, relaxed/relaxed), both verify, and h= covers both List-* fields and the usual ones."""
    rcpt = subscriber(gate)
    copy = deliver(gate, upstream, rcpt, make_message(unique("both"), purpose=PURPOSES["consent"]))

    tags = dkim_verify(copy.data, records(keys))

    assert sorted((t["a"], t["s"]) for t in tags) == [("ed25519-sha256", "e1"), ("rsa-sha256", "s1")]
    for t in tags:
        assert t["d"] == "example.com" and t["c"] == "relaxed/relaxed", t
        signed = {h.lower() for h in t["h"].split(":")}
        assert MUST_SIGN <= signed, f"h= lacks {MUST_SIGN - signed}"
    assert not (gate.config_path.parent / "data" / "dkim" / "example.com.pem").exists(), "a key was generated for a configured domain"


def test_changing_a_signed_field_or_the_body_breaks_both_signatures(gate, upstream, keys):
    """A copy whose List-Unsubscribe link, List-Unsubscribe-Post field or footer is altered in transit fails DKIM."""
    rcpt = subscriber(gate)
    copy = deliver(gate, upstream, rcpt, make_message(unique("tamper"), purpose=PURPOSES["consent"]))
    assert verdicts(copy.data, records(keys)) == [True, True]
    link = re.search(rb"List-Unsubscribe: <([^>]+)>", copy.data)[1]

    swapped = link[:-1] + (b"A" if link[-1:] != b"A" else b"B")
    tampered = {
        "List-Unsubscribe": copy.data.replace(b"List-Unsubscribe: <" + link, b"List-Unsubscribe: <" + swapped, 1),
        "List-Unsubscribe-Post": copy.data.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"", 1),
        "body": copy.data.replace(b"in one click: " + link, b"in one click: " + swapped, 1),
    }
    for what, data in tampered.items():
        assert data != copy.data, what
        assert verdicts(data, records(keys)) == [False, False], f"still verifies with {what} changed"


def test_transactional_copies_are_signed_too(gate, upstream, keys):
    """An order confirmation (no List-* fields) is signed with both keys, and both verify."""
    rcpt = f"{unique('buyer')}@example.net"
    copy = deliver(gate, upstream, rcpt, make_message(unique("order"), purpose=PURPOSES["transactional"]))

    tags = dkim_verify(copy.data, records(keys))

    assert sorted(t["s"] for t in tags) == ["e1", "s1"]


def from_domain(message: bytes, domain: str) -> bytes:
    return message.replace(b"From: Shop <shop@example.com>", f"From: Shop <shop@{domain}>".encode(), 1)


def test_a_domain_without_a_key_gets_one_generated_and_kept(launch, upstream):
    """With no key configured, `serve` makes one for the From domain on first use (data_dir/dkim/DOMAIN.pem, selector optgate), logs its DNS record, signs with it, and uses the same key after a restart."""
    gate = launch(upstream.port)
    domain = "shop.example.org"
    rcpt = subscriber(gate)

    copy = deliver(gate, upstream, rcpt, from_domain(make_message(unique("gen"), purpose="news"), domain))

    name, text = generated_dkim_record(gate, domain)
    assert name == f"optgate._domainkey.{domain}"
    pem_path = gate.config_path.parent / "data" / "dkim" / f"{domain}.pem"
    pem = pem_path.read_bytes()
    assert stat.S_IMODE(pem_path.stat().st_mode) == 0o600
    assert text == f"v=DKIM1; k=rsa; p={public_key_of(pem)}", "the logged record is not the key on disk"
    [tags] = dkim_verify(copy.data, {name: text})
    assert (tags["d"], tags["s"], tags["a"]) == (domain, "optgate", "rsa-sha256")

    gate.stop()
    gate.start()
    again = deliver(gate, upstream, rcpt, from_domain(make_message(unique("gen2"), purpose="news"), domain))
    dkim_verify(again.data, {name: text})
    assert pem_path.read_bytes() == pem
    generated_dkim_record(gate, domain)  # still exactly one key generated for it


def test_no_generation_means_unsigned(launch, upstream):
    """With dkim.generate_missing = false and no key, copies go out unsigned and no key is made."""
    gate = launch(upstream.port, dkim={"generate_missing": False})
    rcpt = subscriber(gate)

    copy = deliver(gate, upstream, rcpt, make_message(unique("unsigned"), purpose="news"))

    assert dkim_tags(copy.data) == []
    assert not (gate.config_path.parent / "data" / "dkim").exists()
