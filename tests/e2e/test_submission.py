"""Mailers outside the trusted networks: STARTTLS, AUTH PLAIN and LOGIN, no open relay,
and the purposes an account may use. Here 127.0.0.1 is not trusted (trusted_networks = [])."""

import smtplib
import subprocess

import pytest

from helpers import PASSWORD, SENDER, connect, insecure_tls, make_message, reply_counts, submit, unique

MAILER = ("mailer", PASSWORD)  # default purpose: orders (transactional)
CRM = ("crm", PASSWORD)  # may send only offers and orders


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port, smtp={"trusted_networks": []})


def test_auth_is_offered_only_after_starttls(gate):
    """EHLO in clear advertises STARTTLS and no AUTH; after STARTTLS it advertises AUTH PLAIN LOGIN."""
    with connect(gate.smtp_port) as client:
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        client.starttls(context=insecure_tls())
        client.ehlo()
        mechanisms = client.esmtp_features["auth"].upper().split()
        assert {"PLAIN", "LOGIN"} <= set(mechanisms)


def test_smtplib_starttls_auth_plain_delivers(gate, upstream):
    """smtplib over STARTTLS with AUTH PLAIN gets 250 and the upstream receives the message (mailer's default purpose is transactional)."""
    token = unique("plain")
    rcpt = f"{token}@example.com"
    reply = submit(gate.smtp_port, [rcpt], make_message(token), starttls=True, login=MAILER)
    assert reply.code == 250, reply
    assert reply_counts(reply.text) == (1, 0), reply
    [message] = upstream.wait_for(token=token)
    assert message.rcpt_tos == [rcpt]
    assert message.mail_from == SENDER


def test_swaks_starttls_auth_login_delivers(gate, upstream):
    """swaks with -tls and AUTH LOGIN completes its transaction and the upstream receives it."""
    token = unique("swaks")
    rcpt = f"{token}@example.com"
    done = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gate.smtp_port}", "-tls", "--helo", "client.test",
         "--auth", "LOGIN", "--auth-user", MAILER[0], "--auth-password", MAILER[1],
         "--from", SENDER, "--to", rcpt, "--header", f"Subject: {token}", "--timeout", "15"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 " in done.stdout  # authenticated
    [message] = upstream.wait_for(token=token)
    assert message.rcpt_tos == [rcpt]


@pytest.mark.parametrize("starttls", [False, True], ids=["clear", "after-starttls"])
def test_unauthenticated_client_is_refused_at_mail_from(gate, starttls):
    """Without AUTH, an untrusted client's MAIL FROM gets 530: optgate is no open relay."""
    with connect(gate.smtp_port, starttls=starttls) as client:
        code, text = client.mail(SENDER)
        assert code == 530, (code, text)


def test_auth_in_clear_is_refused(gate):
    """AUTH PLAIN before STARTTLS is refused with a 5xx: no password crosses in clear."""
    with connect(gate.smtp_port) as client:
        code, text = client.docmd("AUTH", "PLAIN AG1haWxlcgBzZWNyZXQ=")  # \0mailer\0secret
        assert 500 <= code < 600, (code, text)
        assert client.mail(SENDER)[0] == 530


def test_wrong_password_gets_535(gate):
    """A wrong password is answered 535 and the client stays unable to send."""
    with connect(gate.smtp_port, starttls=True) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth_plain_login("mailer", "not the password")
        assert refused.value.smtp_code == 535
        assert client.mail(SENDER)[0] == 530


def test_account_default_purpose_applies(gate, upstream):
    """With no X-Optgate-Purpose, the account's default decides: crm's (offers, soft opt-in) suppresses a non-customer as "not a customer"."""
    token = unique("default")
    reply = submit(gate.smtp_port, [f"{token}@example.com"], make_message(token), starttls=True, login=CRM)
    assert reply.code == 250 and reply_counts(reply.text) == (0, 1), reply
    assert "not a customer" in reply.text
    assert upstream.wait_for(token=token, count=0) == []


@pytest.mark.parametrize(
    "login, purpose, named",
    [(CRM, "b2b", ["crm", "b2b"]), (MAILER, "spam", ["spam"])],
    ids=["forbidden-for-account", "unknown"],
)
def test_refused_purpose_gets_550_naming_it(gate, upstream, login, purpose, named):
    """A purpose the account may not use, or that does not exist, gets 550 5.7.1 naming it; nothing is relayed."""
    token = unique("refused")
    message = make_message(token, purpose=purpose)
    reply = submit(gate.smtp_port, [f"{token}@example.com"], message, starttls=True, login=login)
    assert reply.code == 550, reply
    assert "5.7.1" in reply.text
    for word in named:
        assert word in reply.text, reply
    assert upstream.wait_for(token=token, count=0) == []
