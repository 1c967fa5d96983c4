"""Backpressure: while more copies wait to be made than `queue.backpressure_copies`, a
new SMTP session waits for its greeting, at most `queue.backpressure_max_wait`, and is
greeted as soon as delivery catches up. Here a single delivery slot, kept busy by an
upstream that does not answer, leaves the next copies waiting."""

import threading
import time

from helpers import PURPOSES, RawSmtp, make_message, metric, submit, unique, wait_until

ORDERS = PURPOSES["transactional"]
MAX_WAIT = 5.0


def greeted_after(port: int) -> tuple[float, RawSmtp]:
    """Connects; how long the 220 took, and the connection."""
    started = time.monotonic()
    conn = RawSmtp(port)
    return time.monotonic() - started, conn


def test_sessions_wait_for_their_greeting_while_delivery_is_behind(launch, upstream):
    """One copy hangs at the upstream and two wait behind it (the limit): the next
    client waits its longest for the 220, then is served; once the upstream answers,
    a waiting client is greeted at once, and every message arrives."""
    gate = launch(
        upstream.port,
        queue={"concurrency": 1, "backpressure_copies": 2, "backpressure_max_wait": f"{MAX_WAIT:.0f}s"},
    )
    token = unique("backpressure")
    slow, *others = [f"{token}.{n}@example.com" for n in range(5)]
    upstream.hold(slow)
    try:
        for rcpt in [slow, others[0], others[1]]:
            reply = submit(gate.smtp_port, [rcpt], make_message(token, purpose=ORDERS))
            assert reply.code == 250, reply

        waited, conn = greeted_after(gate.smtp_port)
        with conn:
            assert conn.greeting.code == 220, conn.greeting
            assert MAX_WAIT - 0.5 <= waited < MAX_WAIT + 3, f"greeted after {waited:.1f}s"
            # Once greeted, the session is served as usual.
            assert conn.command("EHLO client.test").code == 250
            assert conn.command("MAIL FROM:<shop@example.com>").code == 250
            assert conn.command(f"RCPT TO:<{others[2]}>").code == 250
            assert conn.command("DATA").code == 354
            conn.send(make_message(token, purpose=ORDERS) + b".\r\n")
            assert conn.reply().code == 250

        waiting = {}
        client = threading.Thread(target=lambda: waiting.update(result=greeted_after(gate.smtp_port)))
        client.start()
        time.sleep(1.0)
        assert "result" not in waiting, "greeted while the backlog was full"
        # What an operator sees meanwhile: the backlog, and who waits on it.
        assert metric(gate, "optgate_smtp_sessions_waiting") == 1
        assert metric(gate, "optgate_queue_copies_pending") >= 2
        let_go = time.monotonic()
        upstream.let_go(slow)
        client.join(timeout=MAX_WAIT + 5)
        waited, conn = waiting["result"]
        with conn:
            assert conn.greeting.code == 220
            assert time.monotonic() - let_go < 2.5, "not greeted when delivery caught up"
            assert conn.command("QUIT").code == 221
    finally:
        upstream.let_go(slow)

    for rcpt in [slow, *others[:3]]:
        assert len(upstream.wait_for(token=token, rcpt=rcpt)) == 1, rcpt
    wait_until(lambda: metric(gate, "optgate_queue_copies_pending") == 0, "an empty backlog")
    assert metric(gate, "optgate_smtp_sessions_waiting") == 0
