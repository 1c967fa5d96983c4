"""The relay's DATA phase against a real SMTP server (aiosmtpd): optgate dot-stuffs each
copy itself, writing it in pieces (its DKIM-Signature fields and the message apart,
up to 64 KiB gathered per write, larger stretches written straight through). Lines
that start with a dot must arrive exactly as submitted wherever they fall, and the
copy must still verify. The edges the gateway never produces (a copy that starts
with a dot or does not end with CRLF) are covered by the unit tests in src/relay.rs."""

from helpers import PURPOSES, deliver, dkim_verify, generated_dkim_record, make_message, unique

WRITE_BUFFER = 64 * 1024


def dotted_body() -> bytes:
    """Dot lines of every kind, densely (so that write seams fall right before some of
    them), then more than a write buffer without any dot line (written straight
    through), then dot lines again, ending with a line that is only a dot."""
    kinds = [b".", b"..", b".x", b". leading dot and space", b"x.", b"", b"...", b"plain text"]
    dense = b"".join(kinds[i % len(kinds)] + b"\r\n" for i in range(3 * WRITE_BUFFER // 10))
    plain = b"a line with. dots. inside, none at its start\r\n" * (WRITE_BUFFER // 40)
    return b".first body line\r\n" + dense + plain + dense + b".\r\n"


def test_lines_starting_with_a_dot_arrive_intact_and_the_copy_verifies(launch, upstream):
    """A transactional copy (body untouched) of a 200+ KB message full of dot lines
    arrives byte for byte, and its generated key's signature verifies with dkimpy."""
    gate = launch(upstream.port)
    body = dotted_body()
    assert len(body) > 3 * WRITE_BUFFER
    rcpt = f"{unique('dots')}@example.net"

    copy = deliver(gate, upstream, rcpt, make_message(unique("dots"), purpose=PURPOSES["transactional"], body=body.decode()))

    assert copy.data.split(b"\r\n\r\n", 1)[1] == body
    name, text = generated_dkim_record(gate, "example.com")
    dkim_verify(copy.data, {name: text})
