"""Nothing accepted is ever lost: across `kill -9`, SIGTERM and restarts. Each test has
its own gateway, since each stops it."""

import signal
import socket
import time

import pytest

from helpers import PURPOSES, SENDER, RawSmtp, connect, free_port, make_message, submit, unique

ORDERS = PURPOSES["transactional"]


def test_kill_9_right_after_250_loses_nothing(launch, upstream):
    """A message answered 250 while the upstream is unreachable survives `kill -9`: after a restart with the upstream back, it arrives."""
    gate = launch(free_port())  # nothing listens there
    token = unique("kill9")
    with connect(gate.smtp_port) as client:
        reply = client.transaction(SENDER, [f"{token}@example.com"], make_message(token, purpose=ORDERS))
        gate.kill()
    assert reply.code == 250, reply

    gate.config["upstream"]["port"] = upstream.port
    gate.start()
    [message] = upstream.wait_for(token=token)
    assert message.rcpt_tos == [f"{token}@example.com"]


def test_sigterm_while_idle_exits_0_and_stops_listening(launch, upstream):
    """SIGTERM to an idle gateway: it exits 0 within seconds and its port is closed."""
    gate = launch(upstream.port)
    gate.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gate.smtp_port), timeout=5).close()


def delivered_before_exit_or_after_restart(gate, upstream, token: str):
    """Waits for the gateway to exit 0, then for the message: already there, or
    delivered once the gateway is started again."""
    assert gate.wait() == 0, gate.log_tail()
    if not upstream.received(token=token):
        gate.start()
    return upstream.wait_for(token=token)


def test_message_accepted_just_before_sigterm_is_delivered(launch, upstream):
    """A message answered 250 just before SIGTERM (its first attempt deferred) reaches the upstream, before exit or after restart."""
    gate = launch(upstream.port)
    token = unique("sigterm")
    rcpt = f"{token}@example.com"
    upstream.answer(rcpt, "451 4.3.0 Try again later")

    assert submit(gate.smtp_port, [rcpt], make_message(token, purpose=ORDERS)).code == 250
    gate.signal(signal.SIGTERM)

    assert delivered_before_exit_or_after_restart(gate, upstream, token)


def test_transaction_in_flight_at_sigterm_is_finished(launch, upstream):
    """SIGTERM arrives in the middle of DATA: the client still gets its 250 and the message is delivered."""
    gate = launch(upstream.port)
    token = unique("inflight")
    message = make_message(token, purpose=ORDERS)
    with RawSmtp(gate.smtp_port) as smtp:
        assert smtp.command("EHLO client.test").code == 250
        assert smtp.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert smtp.command(f"RCPT TO:<{token}@example.com>").code == 250
        assert smtp.command("DATA").code == 354
        smtp.send(message[:40])
        gate.signal(signal.SIGTERM)
        time.sleep(0.5)
        smtp.send(message[40:] + b".\r\n")
        reply = smtp.reply()
        assert reply.code == 250, reply
        smtp.send(b"QUIT\r\n")

    assert delivered_before_exit_or_after_restart(gate, upstream, token)
