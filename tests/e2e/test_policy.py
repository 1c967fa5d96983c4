"""The consent policy seen from outside: consents recorded with the CLI, a message from
a trusted mailer, and what the upstream receives, per legal basis."""

import pytest

from helpers import PURPOSES, make_message, reply_counts, submit, unique

ROLES = ("optin", "never", "withdrawn", "customer")

# Per basis, what happens to each recipient: None = delivered, else the reason given.
#   optin: granted this purpose · never: nothing recorded · withdrawn: granted, then
#   withdrew this purpose · customer: marked an existing customer.
EXPECTED = {
    "consent": {"optin": None, "never": "no consent", "withdrawn": "consent withdrawn", "customer": "no consent"},
    "soft_opt_in": {"optin": "not a customer", "never": "not a customer", "withdrawn": "objected", "customer": None},
    "legitimate_interest": {"optin": None, "never": None, "withdrawn": "objected", "customer": None},
    "transactional": {"optin": None, "never": None, "withdrawn": None, "customer": None},
}


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port)


@pytest.mark.parametrize("basis", EXPECTED)
def test_four_recipients_land_where_the_policy_says(gate, upstream, basis):
    """One message to opted-in, never-asked, withdrawn and customer addresses: only the lawful ones get it, and the 250 says why the others did not."""
    purpose = PURPOSES[basis]
    token = unique(basis.replace("_", "-"))
    address = {role: f"{role}.{token}@example.com" for role in ROLES}
    gate.cli_ok("consent", "grant", address["optin"], purpose)
    gate.cli_ok("consent", "grant", address["withdrawn"], purpose)
    gate.cli_ok("consent", "withdraw", address["withdrawn"], purpose)
    gate.cli_ok("contact", "set", address["customer"], "--customer", "true")

    reply = submit(gate.smtp_port, list(address.values()), make_message(token, purpose=purpose))

    expected = EXPECTED[basis]
    allowed = {address[role] for role, reason in expected.items() if reason is None}
    reasons = {reason for reason in expected.values() if reason}
    assert reply.code == 250, reply
    assert reply_counts(reply.text) == (len(allowed), len(ROLES) - len(allowed)), reply
    for reason in reasons:
        assert reason in reply.text, reply
    received = upstream.wait_for(token=token, count=len(allowed))
    assert sorted(rcpt for m in received for rcpt in m.rcpt_tos) == sorted(allowed)


def test_purpose_header_is_honoured_and_stripped(gate, upstream):
    """X-Optgate-Purpose: orders makes a never-asked address a lawful recipient, and the copy relayed has no such header."""
    token = unique("header")
    rcpt = f"{token}@example.com"
    message = make_message(token, purpose=PURPOSES["transactional"], body="Your order has shipped.\r\n")

    reply = submit(gate.smtp_port, [rcpt], message)

    assert reply.code == 250 and reply_counts(reply.text) == (1, 0), reply
    [received] = upstream.wait_for(token=token)
    relayed = received.parsed()
    assert relayed["X-Optgate-Purpose"] is None
    assert b"x-optgate" not in received.data.lower()
    assert relayed["Subject"] == token
    assert relayed.get_content().strip() == "Your order has shipped."


def test_no_header_means_the_configured_default_purpose(gate, upstream):
    """Without X-Optgate-Purpose the config's default (news, consent) applies: a never-asked address is suppressed."""
    token = unique("nopurpose")
    granted, never = f"granted.{token}@example.com", f"never.{token}@example.com"
    gate.cli_ok("consent", "grant", granted, PURPOSES["consent"])

    reply = submit(gate.smtp_port, [granted, never], make_message(token))

    assert reply.code == 250 and reply_counts(reply.text) == (1, 1), reply
    assert "no consent" in reply.text
    received = upstream.wait_for(token=token)
    assert [m.rcpt_tos for m in received] == [[granted]]


def test_all_suppressed_is_still_250_and_nothing_is_queued(gate, upstream):
    """A message none of whose recipients may get it is answered 250, says so, and nothing reaches the upstream or the queue."""
    token = unique("nobody")
    reply = submit(gate.smtp_port, [f"never.{token}@example.com"], make_message(token, purpose=PURPOSES["consent"]))
    assert reply.code == 250, reply
    assert reply_counts(reply.text) == (0, 1), reply
    assert "no consent" in reply.text
    assert upstream.wait_for(token=token, count=0) == []
    assert token not in gate.cli_ok("queue", "list")


def test_withdraw_all_blocks_every_purpose_but_transactional(gate, upstream):
    """After `consent withdraw --all`, the address gets transactional mail only."""
    token = unique("all")
    rcpt = f"{token}@example.com"
    gate.cli_ok("consent", "grant", rcpt, PURPOSES["consent"])
    gate.cli_ok("contact", "set", rcpt, "--customer", "true")
    gate.cli_ok("consent", "withdraw", rcpt, "--all")

    for basis, purpose in PURPOSES.items():
        reply = submit(gate.smtp_port, [rcpt], make_message(f"{token}-{purpose}", purpose=purpose))
        expected = (1, 0) if basis == "transactional" else (0, 1)
        assert reply.code == 250 and reply_counts(reply.text) == expected, (basis, reply)
    received = upstream.wait_for(token=token)
    assert [m.parsed()["Subject"] for m in received] == [f"{token}-{PURPOSES['transactional']}"]
