"""The command line an operator uses on its own (no `serve` running): consents, contacts,
and errors that say in one line what is wrong."""

import json

import pytest

from helpers import PURPOSES, Optgate, free_port, gateway_config, purpose_verdict, run_optgate, to_toml, unique

NEWS, OFFERS, B2B, ORDERS = (PURPOSES[b] for b in ("consent", "soft_opt_in", "legitimate_interest", "transactional"))


@pytest.fixture(scope="module")
def gate(tmp_path_factory, password_hash) -> Optgate:
    """A gateway's config and data folder, never served: the CLI works on them directly."""
    workdir = tmp_path_factory.mktemp("cli")
    gate = Optgate(workdir / "optgate.toml", gateway_config(workdir, free_port(), password_hash))
    gate.write_config()
    return gate


def address() -> str:
    return f"{unique('cli')}@example.com"


def history(shown: str) -> list[str]:
    """The history lines of `consent show`, oldest first."""
    return [line.strip() for line in shown.split("\nhistory", 1)[1].splitlines()[1:] if line.strip()]


def assert_one_line_error(result, *named: str):
    """The command failed and said why in one line naming each of `named`."""
    assert result.code != 0, result
    assert len(result.err.strip().splitlines()) == 1, result
    for word in named:
        assert word in result.err, result


def test_grant_is_shown_with_its_proof(gate):
    """`consent grant --source --evidence` then `consent show`: the purpose may be mailed, and the history shows the source and evidence."""
    email = address()
    evidence = {"ip": "192.0.2.7", "wording": "signup-v3"}
    out = gate.cli_ok("consent", "grant", email, NEWS, "--source", "signup-form", "--evidence", json.dumps(evidence))
    assert email in out and NEWS in out

    shown = gate.cli_ok("consent", "show", email)
    assert purpose_verdict(shown, NEWS).startswith("yes")
    assert purpose_verdict(shown, OFFERS) == "no: not a customer"
    [event] = history(shown)
    assert "grant" in event and NEWS in event and "source=signup-form" in event
    assert "192.0.2.7" in event and "signup-v3" in event


def test_withdraw_one_purpose(gate):
    """After grant then `consent withdraw EMAIL PURPOSE`, show says the consent is withdrawn and lists both events in order."""
    email = address()
    gate.cli_ok("consent", "grant", email, NEWS)
    gate.cli_ok("consent", "grant", email, B2B)
    gate.cli_ok("consent", "withdraw", email, NEWS, "--source", "phone")

    shown = gate.cli_ok("consent", "show", email)
    assert purpose_verdict(shown, NEWS) == "no: consent withdrawn"
    assert purpose_verdict(shown, B2B).startswith("yes")
    events = history(shown)
    assert len(events) == 3
    assert "withdraw" in events[-1] and NEWS in events[-1] and "source=phone" in events[-1]


def test_withdraw_all(gate):
    """`consent withdraw EMAIL --all` blocks every purpose but the transactional one."""
    email = address()
    gate.cli_ok("contact", "set", email, "--customer", "true")
    gate.cli_ok("consent", "grant", email, NEWS)
    gate.cli_ok("consent", "withdraw", email, "--all")

    shown = gate.cli_ok("consent", "show", email)
    assert purpose_verdict(shown, NEWS) == "no: consent withdrawn"
    assert purpose_verdict(shown, OFFERS) == "no: objected"
    assert purpose_verdict(shown, B2B) == "no: objected"
    assert purpose_verdict(shown, ORDERS).startswith("yes")
    assert "withdraw" in history(shown)[-1] and "all" in history(shown)[-1]


def test_contact_set_customer(gate):
    """`contact set EMAIL --customer true` makes the soft opt-in purpose mailable."""
    email = address()
    assert "yes" in gate.cli_ok("contact", "set", email, "--customer", "true")
    shown = gate.cli_ok("consent", "show", email)
    assert "customer: yes" in shown
    assert purpose_verdict(shown, OFFERS).startswith("yes")


def test_show_unknown_address(gate):
    """`consent show` of an address never seen says so, and only the opt-out purposes may be mailed."""
    shown = gate.cli_ok("consent", "show", address())
    assert purpose_verdict(shown, NEWS) == "no: no consent"
    assert purpose_verdict(shown, B2B).startswith("yes")
    assert history(shown) == []


@pytest.mark.parametrize(
    "command",
    [
        ["consent", "grant", "not-an-address", NEWS],
        ["consent", "withdraw", "not-an-address", NEWS],
        ["consent", "show", "not-an-address"],
        ["contact", "set", "not-an-address", "--customer", "true"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_bad_address_is_one_line_error(gate, command):
    """A malformed address makes the command exit non-zero with one line naming it."""
    assert_one_line_error(gate.cli(*command), "not-an-address", "not an email address")


@pytest.mark.parametrize("verb", ["grant", "withdraw"])
def test_unknown_purpose_is_one_line_error(gate, verb):
    """An unknown purpose makes grant/withdraw exit non-zero with one line naming it, and records nothing."""
    email = address()
    assert_one_line_error(gate.cli("consent", verb, email, "spam"), "unknown purpose", "spam")
    assert history(gate.cli_ok("consent", "show", email)) == []


def test_check_config_accepts_a_good_file(gate):
    """`check-config` on a valid file exits 0 and says ok."""
    out = gate.cli_ok("check-config")
    assert "ok" in out


def test_check_config_names_the_key_and_line_of_a_typo(gate, tmp_path):
    """`check-config` on a file with a misspelt key exits non-zero, naming the file, the key and its line."""
    lines = to_toml(gate.config).splitlines()
    at = lines.index("[queue]") + 1
    lines.insert(at, 'retry_shedule = ["1s"]')
    broken = tmp_path / "broken.toml"
    broken.write_text("\n".join(lines) + "\n")
    assert_one_line_error(run_optgate("check-config", config=broken), "broken.toml", "retry_shedule", f"line {at + 1}")


def test_check_config_names_the_key_of_a_bad_value(gate, tmp_path):
    """`check-config` on a file with a bad value exits non-zero naming the key and the value."""
    broken = tmp_path / "bad-value.toml"
    broken.write_text(to_toml({**gate.config, "queue": {"retry_schedule": ["soon"]}}))
    assert_one_line_error(run_optgate("check-config", config=broken), "queue.retry_schedule", "soon")


def test_missing_config_file_is_one_line_error(tmp_path):
    """A config file that does not exist is named in a one-line error."""
    missing = tmp_path / "nowhere.toml"
    assert_one_line_error(run_optgate("consent", "show", "a@example.com", config=missing), str(missing))
