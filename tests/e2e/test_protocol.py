"""The SMTP conversation itself, from a trusted client: pipelining, limits, STARTTLS
buffering, and messages that try to smuggle a second one past the end of DATA."""

import pytest

from helpers import PURPOSES, SENDER, RawSmtp, assert_crlf_only, connect, make_message, reply_counts, unique, wait_until

MAX_SIZE = 20_000
MAX_RECIPIENTS = 3
ORDERS = PURPOSES["transactional"]  # every recipient may get it: what arrives is up to the protocol


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port, smtp={"max_message_size": MAX_SIZE, "max_recipients": MAX_RECIPIENTS})


def test_pipelined_commands_are_answered_in_order(gate, upstream):
    """EHLO, MAIL, RCPT, RCPT, DATA in one write get 250 ×4 and 354 in order; the message, then QUIT, in one write get 250 and 221."""
    token = unique("pipe")
    rcpts = [f"a.{token}@example.com", f"b.{token}@example.com"]
    commands = ["EHLO client.test", f"MAIL FROM:<{SENDER}>"] + [f"RCPT TO:<{r}>" for r in rcpts] + ["DATA"]
    with RawSmtp(gate.smtp_port) as smtp:
        smtp.send("".join(c + "\r\n" for c in commands).encode())
        ehlo = smtp.reply()
        assert ehlo.code == 250 and "PIPELINING" in ehlo.text.upper().split("\n"), ehlo
        assert [smtp.reply().code for _ in commands[1:]] == [250, 250, 250, 354]
        smtp.send(make_message(token, purpose=ORDERS) + b".\r\nQUIT\r\n")
        assert smtp.reply().code == 250
        assert smtp.reply().code == 221
    received = upstream.wait_for(token=token, count=2)
    assert sorted(r for m in received for r in m.rcpt_tos) == rcpts


def test_size_exceeded_gets_552_and_the_connection_still_sends(gate, upstream):
    """A message over max_message_size gets 552 5.3.4; the same connection then sends a normal message with 250."""
    token = unique("size")
    rcpt = f"{token}@example.com"
    with connect(gate.smtp_port) as client:
        assert int(client.esmtp_features["size"]) == MAX_SIZE
        big = make_message(f"{token}-big", purpose=ORDERS, body=("x" * 76 + "\r\n") * (MAX_SIZE // 78 + 1))
        too_big = client.transaction(SENDER, [rcpt], big)
        assert too_big.code == 552 and "5.3.4" in too_big.text, too_big
        fine = client.transaction(SENDER, [rcpt], make_message(f"{token}-small", purpose=ORDERS))
        assert fine.code == 250, fine
    [received] = upstream.wait_for(token=token)
    assert received.parsed()["Subject"] == f"{token}-small"


def test_declared_size_over_the_limit_is_refused_at_mail_from(gate):
    """MAIL FROM with SIZE= above the limit gets 552 at once."""
    with connect(gate.smtp_port) as client:
        code, text = client.mail(SENDER, [f"SIZE={MAX_SIZE + 1}"])
        assert code == 552, (code, text)


def test_too_many_recipients_gets_452_and_the_others_are_sent(gate, upstream):
    """The RCPT past max_recipients gets 452 4.5.3; the message still goes to the ones accepted."""
    token = unique("rcpts")
    rcpts = [f"{n}.{token}@example.com" for n in range(MAX_RECIPIENTS + 1)]
    with connect(gate.smtp_port) as client:
        assert client.mail(SENDER)[0] == 250
        codes = [client.rcpt(r) for r in rcpts]
        assert [c for c, _ in codes] == [250] * MAX_RECIPIENTS + [452], codes
        assert b"4.5.3" in codes[-1][1]
        assert client.data(make_message(token, purpose=ORDERS))[0] == 250
    received = upstream.wait_for(token=token, count=MAX_RECIPIENTS)
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(rcpts[:MAX_RECIPIENTS])


def test_bdat_chunks_arrive_as_one_message_with_crlf(gate, upstream):
    """A message sent in two BDAT chunks (CHUNKING) gets 250 for each and arrives whole, its bare LF made CRLF."""
    token = unique("bdat")
    message = make_message(token, purpose=ORDERS, body="line one\nline two\r\n")
    chunks = [message[:50], message[50:]]
    with RawSmtp(gate.smtp_port) as smtp:
        assert "CHUNKING" in smtp.command("EHLO client.test").text.split("\n")
        assert smtp.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert smtp.command(f"RCPT TO:<{token}@example.com>").code == 250
        smtp.send(f"BDAT {len(chunks[0])}\r\n".encode() + chunks[0])
        assert smtp.reply().code == 250
        smtp.send(f"BDAT {len(chunks[1])} LAST\r\n".encode() + chunks[1])
        last = smtp.reply()
        assert last.code == 250 and reply_counts(last.text) == (1, 0), last
    [received] = upstream.wait_for(token=token)
    assert received.data.endswith(b"\r\n\r\nline one\r\nline two\r\n")
    assert_crlf_only(received.data)


def test_vrfy_noop_rset(gate):
    """VRFY is answered 252 (no address is disclosed), NOOP and RSET 250."""
    with connect(gate.smtp_port) as client:
        assert client.verify("someone@example.com")[0] == 252
        assert client.noop()[0] == 250
        assert client.rset()[0] == 250


def test_commands_pipelined_with_starttls_are_discarded(gate):
    """Commands sent in the same write as STARTTLS are not run inside the TLS session (no command injection)."""
    with RawSmtp(gate.smtp_port) as smtp:
        assert smtp.command("EHLO client.test").code == 250
        smtp.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@example.com>\r\n")
        assert smtp.reply().code == 220
        assert smtp.pending == b"", "optgate answered the injected commands in clear"
        smtp.starttls()
        ehlo = smtp.command("EHLO client.test")
        assert ehlo.code == 250 and "PIPELINING" in ehlo.text, f"first reply inside TLS: {ehlo}"
        assert smtp.command(f"MAIL FROM:<{SENDER}>").code == 250  # not 503: no MAIL ran before


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"],
    ids=["LF.CRLF", "CRLF.LF", "LF.LF", "CR.CRLF"],
)
def test_smuggled_message_stays_inside_the_first(gate, upstream, fake_end):
    """A body with a fake end of data followed by MAIL/RCPT/DATA yields one message containing that text, relayed with CRLF line endings only."""
    token = unique("smuggle")
    victim = f"victim.{token}@example.com"
    smuggled = (
        f"MAIL FROM:<evil@example.com>\r\nRCPT TO:<{victim}>\r\nDATA\r\n"
        f"Subject: smuggled {token}\r\nX-Optgate-Purpose: {ORDERS}\r\n\r\nevil\r\n.\r\n"
    ).encode()
    body = make_message(token, purpose=ORDERS, body="first line") + fake_end + smuggled
    with RawSmtp(gate.smtp_port) as smtp:
        assert smtp.command("EHLO client.test").code == 250
        assert smtp.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert smtp.command(f"RCPT TO:<{token}@example.com>").code == 250
        assert smtp.command("DATA").code == 354
        smtp.send(body)
        assert smtp.reply().code == 250
        quit_reply = smtp.command("QUIT")
        assert quit_reply.code == 221, f"a second transaction ran: {quit_reply}"
    [received] = upstream.wait_for(token=token)
    assert upstream.received(rcpt=victim) == []
    assert received.rcpt_tos == [f"{token}@example.com"]
    assert b"MAIL FROM:<evil@example.com>" in received.data
    assert_crlf_only(received.data)


def test_line_over_max_line_length_is_refused_and_the_connection_goes_on(gate, upstream):
    """A data line longer than max_line_length (998) gets a 5xx; nothing is relayed and the connection still answers."""
    token = unique("longline")
    with connect(gate.smtp_port) as client:
        message = make_message(token, purpose=ORDERS, body="x" * 1200 + "\r\n")
        reply = client.transaction(SENDER, [f"{token}@example.com"], message)
        assert 500 <= reply.code < 600, reply
        assert client.noop()[0] == 250
    assert upstream.wait_for(token=token, count=0) == []


@pytest.fixture
def strict_gate(launch, upstream):
    """A gateway with tight connection limits: 2 s of silence, 2 connections per IP."""
    return launch(upstream.port, smtp={"idle_timeout": "2s", "max_connections_per_ip": 2})


def test_idle_client_gets_421_and_is_disconnected(strict_gate):
    """A client silent for longer than idle_timeout gets 421 4.4.2 and the connection is closed."""
    with RawSmtp(strict_gate.smtp_port) as smtp:
        reply = smtp.reply()
        assert reply.code == 421 and "4.4.2" in reply.text, reply
        assert smtp.sock.recv(1) == b""


def test_connections_over_the_per_ip_limit_get_421(strict_gate):
    """A third simultaneous connection from one IP is greeted 421; once one closes, a new one is welcome."""
    first, second = RawSmtp(strict_gate.smtp_port), RawSmtp(strict_gate.smtp_port)
    with second:
        with first:
            assert first.greeting.code == second.greeting.code == 220
            with RawSmtp(strict_gate.smtp_port) as third:
                assert third.greeting.code == 421, third.greeting
        wait_until(lambda: greeting(strict_gate.smtp_port).code == 220, "a new connection to be welcome again")


def greeting(port: int):
    """The greeting of a new connection, which is then closed."""
    with RawSmtp(port) as smtp:
        return smtp.greeting
