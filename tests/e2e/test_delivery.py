"""Delivery to the upstream when it does not simply say yes: transient failures are
retried, permanent ones bounce to the sender with a DSN, and a mailbox that does not
exist goes on the suppression list. Retries here come after 1 s, then every 2 s."""

import re

import pytest

from helpers import PURPOSES, make_message, purpose_verdict, reply_counts, submit, unique

ORDERS = PURPOSES["transactional"]
USER_UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port)


def test_transient_failures_are_retried_until_delivered(gate, upstream):
    """The upstream answers 421, then 451: the mailer got 250 at once, and the message arrives on the third attempt, with no bounce."""
    token = unique("transient")
    sender, rcpt = f"shop.{token}@example.com", f"{token}@example.com"
    upstream.answer(rcpt, "421 4.3.2 Service shutting down", "451 4.3.0 Temporary local problem")

    reply = submit(gate.smtp_port, [rcpt], make_message(token, purpose=ORDERS), sender=sender)

    assert reply.code == 250, reply
    [message] = upstream.wait_for(token=token)
    assert message.rcpt_tos == [rcpt] and message.mail_from == sender
    assert upstream.attempts[rcpt] == 3
    assert upstream.received(rcpt=sender) == []


def test_queue_list_shows_a_deferred_delivery(gate, upstream):
    """While the upstream answers 451, `optgate queue list` shows the delivery, its attempts and the reply; once the upstream accepts, it is delivered and leaves the queue."""
    token = unique("deferred")
    rcpt = f"{token}@example.com"
    upstream.refuse(rcpt, "451 4.7.1 Greylisted, try again later")

    assert submit(gate.smtp_port, [rcpt], make_message(token, purpose=ORDERS)).code == 250
    listing = gate.cli_until(lambda out: rcpt in out and "451" in out, "queue", "list")
    [line] = [line for line in listing.splitlines() if rcpt in line]
    assert int(re.search(r"attempts=(\d+)", line)[1]) >= 1, line
    assert ORDERS in line

    upstream.release(rcpt)
    upstream.wait_for(token=token)
    gate.cli_until(lambda out: rcpt not in out, "queue", "list")


def delivery_status(dsn) -> dict:
    """The per-recipient fields of a DSN's message/delivery-status part, by Final-Recipient."""
    report = dsn.parsed()
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status"
    [status] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    return {
        block["Final-Recipient"].split(";")[-1].strip(): block
        for block in status.get_payload()
        if block["Final-Recipient"]
    }


def first_text(dsn) -> str:
    """The human-readable first part of a DSN."""
    return next(p for p in dsn.parsed().walk() if p.get_content_type() == "text/plain").get_content()


def test_hard_bounce_sends_a_dsn_and_suppresses_the_address(gate, upstream):
    """The upstream answers 550 5.1.1 for one recipient: the other gets the mail, the sender gets a DSN naming the bounced one, `consent show` says it is suppressed (hard bounce), later mail to it, even transactional, is suppressed, until `contact unsuppress`."""
    token = unique("bounce")
    sender, good, bad = f"shop.{token}@example.com", f"good.{token}@example.com", f"bad.{token}@example.com"
    upstream.refuse(bad, USER_UNKNOWN.format(bad))

    reply = submit(gate.smtp_port, [good, bad], make_message(token, purpose=ORDERS), sender=sender)

    assert reply.code == 250 and reply_counts(reply.text) == (2, 0), reply
    [dsn] = upstream.wait_for(rcpt=sender)
    assert dsn.null_sender, dsn.mail_from
    status = delivery_status(dsn)
    assert list(status) == [bad]
    assert status[bad]["Action"].strip().lower() == "failed"
    assert status[bad]["Status"].strip() == "5.1.1"
    assert bad in first_text(dsn)
    assert [m.rcpt_tos for m in upstream.received(token=token) if not m.null_sender] == [[good]]

    shown = gate.cli_until(lambda out: "hard bounce" in out, "consent", "show", bad)
    assert "suppressed" in shown
    assert purpose_verdict(shown, ORDERS) == "no: suppressed"

    attempts = upstream.attempts[bad]
    later = submit(gate.smtp_port, [bad], make_message(f"{token}-later", purpose=ORDERS), sender=sender)
    assert later.code == 250 and reply_counts(later.text) == (0, 1), later
    assert "suppressed" in later.text
    assert upstream.wait_for(token=f"{token}-later", count=0) == []
    assert upstream.attempts[bad] == attempts

    upstream.release(bad)
    gate.cli_ok("contact", "unsuppress", bad)
    lifted = submit(gate.smtp_port, [bad], make_message(f"{token}-lifted", purpose=ORDERS), sender=sender)
    assert lifted.code == 250 and reply_counts(lifted.text) == (1, 0), lifted
    upstream.wait_for(token=f"{token}-lifted", rcpt=bad)


def test_delivery_past_max_age_bounces(launch, upstream):
    """A delivery still deferred after queue.max_age is given up: the sender gets a DSN saying it failed."""
    gate = launch(upstream.port, queue={"max_age": "3s"})
    token = unique("expired")
    sender, rcpt = f"shop.{token}@example.com", f"{token}@example.com"
    upstream.refuse(rcpt, "451 4.3.0 Try again later")

    assert submit(gate.smtp_port, [rcpt], make_message(token, purpose=ORDERS), sender=sender).code == 250

    [dsn] = upstream.wait_for(rcpt=sender)
    assert dsn.null_sender
    assert delivery_status(dsn)[rcpt]["Action"].strip().lower() == "failed"
    upstream.release(rcpt)
    assert upstream.received(token=token, rcpt=rcpt) == []
