"""The relay's DATA phase against a real SMTP server (aiosmtpd): optgate dot-stuffs each
copy itself, writing it in pieces (its DKIM-Signature fields and the message apart,
up to 64 KiB gathered per write, larger stretches written straight through). Lines
that start with a dot must arrive exactly as submitted wherever they fall, and the
copy must still verify. The edges the gateway never produces (a copy that starts
with a dot or does not end with CRLF) are covered by the unit tests in src/relay.rs."""

from helpers import PURPOSES, deliver, dkim_verify, generated_dkim_record, make_message, reply_counts, submit, unique

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


def test_a_large_message_to_many_recipients_gets_a_signed_copy_for_each_lawful_one(launch, upstream):
    """Above 8 recipients, consent is read on the blocking pool, and a copy of a message
    over 256 KiB is made there too (small ones are made in place): the same result
    must come out. 10 opted in, 2 never asked; each opted-in recipient gets a
    300 KB copy with its unsubscribe link that verifies with dkimpy."""
    gate = launch(upstream.port)
    token = unique("large-many")
    opted_in = [f"r{i}.{token}@example.net" for i in range(10)]
    never_asked = [f"n{i}.{token}@example.net" for i in range(2)]
    for rcpt in opted_in:
        gate.cli_ok("consent", "grant", rcpt, PURPOSES["consent"])
    body = "A long newsletter line, written many times over to pass 256 KiB.\r\n" * 4_600
    assert len(body) > 300_000

    reply = submit(gate.smtp_port, opted_in + never_asked, make_message(token, purpose=PURPOSES["consent"], body=body))

    assert reply.code == 250 and reply_counts(reply.text) == (10, 2), reply
    copies = upstream.wait_for(token=token, count=10)
    assert sorted(r for c in copies for r in c.rcpt_tos) == sorted(opted_in)
    name, text = generated_dkim_record(gate, "example.com")
    for copy in copies:
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in copy.data
        assert len(copy.data) > len(body)
        dkim_verify(copy.data, {name: text})
