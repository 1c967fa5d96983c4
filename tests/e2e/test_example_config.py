"""The newcomer's path: the example config/optgate.toml as shipped (upstream `file`),
a message sent with smtplib, the result in data/outbox."""

import email
import email.policy
import time

from helpers import REPO, SETTLE, Optgate, free_port, make_message, reply_counts, submit, unique, wait_until


def test_example_config_puts_the_mail_in_the_outbox(launch, tmp_path):
    """With the example config (only its ports moved), mail to an opted-in and a never-asked address gives 250 "1 accepted, 1 suppressed" and one .eml in data/outbox."""
    folder = tmp_path / "config"  # the example's "../data" then lands in tmp_path/data
    folder.mkdir()
    text = (REPO / "config" / "optgate.toml").read_text()
    for port in ("2525", "8080"):
        assert f"127.0.0.1:{port}" in text
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    (folder / "optgate.toml").write_text(text)
    gate = launch.adopt(Optgate(folder / "optgate.toml"))

    token = unique("example")
    granted, never = f"granted.{token}@example.com", f"never.{token}@example.com"
    gate.cli_ok("consent", "grant", granted, "newsletter")
    reply = submit(gate.smtp_port, [granted, never], make_message(token))

    assert reply.code == 250 and reply_counts(reply.text) == (1, 1), reply
    outbox = tmp_path / "data" / "outbox"
    wait_until(lambda: outbox.is_dir() and any(outbox.glob("*.eml")), "an .eml in data/outbox")
    time.sleep(SETTLE)  # any second copy would show up now
    [eml] = outbox.glob("*.eml")
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == token
    assert message["X-Optgate-Purpose"] is None
