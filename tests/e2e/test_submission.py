"""Mailers outside the trusted networks: STARTTLS, AUTH PLAIN and LOGIN, no open relay,
and the purposes an account may use. Here 127.0.0.1 is not trusted (trusted_networks = [])."""

import smtplib
import socket
import subprocess

import pytest

from helpers import (
    PASSWORD,
    SENDER,
    WAIT,
    connect,
    free_port,
    insecure_tls,
    make_message,
    reply_counts,
    submit,
    unique,
)

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


def swaks_auth_login_delivers(port: int, tls_flag: str, upstream):
    """swaks with `tls_flag` and AUTH LOGIN completes its transaction and the upstream receives it."""
    token = unique("swaks")
    rcpt = f"{token}@example.com"
    done = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", tls_flag, "--helo", "client.test",
         "--auth", "LOGIN", "--auth-user", MAILER[0], "--auth-password", MAILER[1],
         "--from", SENDER, "--to", rcpt, "--header", f"Subject: {token}", "--timeout", "15"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 " in done.stdout  # authenticated
    [message] = upstream.wait_for(token=token)
    assert message.rcpt_tos == [rcpt]


def test_swaks_starttls_auth_login_delivers(gate, upstream):
    """swaks with -tls and AUTH LOGIN completes its transaction and the upstream receives it."""
    swaks_auth_login_delivers(gate.smtp_port, "-tls", upstream)


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


@pytest.fixture(scope="module")
def implicit(launch_shared, upstream):
    """A gateway with an implicit-TLS listener (RFC 8314, what port 465 is) beside its plain one."""
    port = free_port()
    gate = launch_shared(upstream.port, smtp={"trusted_networks": [], "listen_implicit_tls": [f"127.0.0.1:{port}"]})
    return gate, port


def test_smtplib_over_implicit_tls_authenticates_and_delivers(implicit, upstream):
    """smtplib.SMTP_SSL (a mailer set to "SSL", nodemailer's secure: true): the greeting comes over TLS, EHLO offers AUTH and no STARTTLS, AUTH PLAIN and the message reach the upstream."""
    gate, port = implicit
    token = unique("smtps")
    rcpt = f"{token}@example.com"
    with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test", timeout=WAIT, context=insecure_tls()) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert not client.has_extn("starttls")
        assert {"PLAIN", "LOGIN"} <= set(client.esmtp_features["auth"].upper().split())
        client.login(*MAILER)
        refused = client.sendmail(SENDER, [rcpt], make_message(token))
        assert refused == {}
    [message] = upstream.wait_for(token=token)
    assert message.rcpt_tos == [rcpt]
    # The plain listener of the same gateway still offers STARTTLS.
    with connect(gate.smtp_port) as client:
        assert client.has_extn("starttls")


def test_swaks_tls_on_connect_auth_login_delivers(implicit, upstream):
    """swaks --tls-on-connect with AUTH LOGIN completes its transaction and the upstream receives it."""
    _, port = implicit
    swaks_auth_login_delivers(port, "--tls-on-connect", upstream)


def test_a_client_in_clear_on_the_implicit_tls_port_gets_no_greeting(implicit):
    """A client that speaks plain SMTP to the implicit-TLS port sees no 220 in clear: the handshake fails and the connection is closed, and the gateway serves on."""
    gate, port = implicit
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        raw.settimeout(1.5)
        try:
            greeting = raw.recv(512)
        except socket.timeout:
            greeting = b""
        assert not greeting.startswith(b"220"), greeting
        raw.settimeout(WAIT)
        raw.sendall(b"EHLO client.test\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        assert b"250" not in answer and b"220" not in answer, answer
    with connect(gate.smtp_port) as client:
        assert client.has_extn("starttls")
