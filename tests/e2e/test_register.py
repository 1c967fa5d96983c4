"""The consent register from the operator's command line: importing a large CSV with
its proof (rejected rows named by line, nothing partial when killed), exporting it so
that it imports back the same, listing the consents about to lapse, and erasing a
person while still refusing to mail or re-import them."""

import csv
import io
import json
import re
import signal
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from helpers import (
    BINARY,
    ENV,
    PURPOSES,
    WAIT,
    Optgate,
    deliver,
    free_port,
    gateway_config,
    make_message,
    purpose_tables,
    reply_counts,
    submit,
    unique,
)

NEWS, OFFERS, B2B = PURPOSES["consent"], PURPOSES["soft_opt_in"], PURPOSES["legitimate_interest"]
HEADER = "email,purpose,status,timestamp,source,evidence\n"
# The news purpose's consent lapses after this many days, in the gateways that serve.
LIFETIME_DAYS = 60


# ---- helpers of this module ------------------------------------------------------------


@pytest.fixture
def offline(tmp_path_factory, password_hash):
    """Makes gateways' configs and data folders, never served: the CLI works on them."""

    def make() -> Optgate:
        workdir = tmp_path_factory.mktemp("register")
        gate = Optgate(workdir / "optgate.toml", gateway_config(workdir, free_port(), password_hash))
        gate.write_config()
        return gate

    return make


@pytest.fixture
def gate(launch, upstream):
    """A served gateway whose consent purpose (news) lapses after LIFETIME_DAYS."""
    purposes = purpose_tables()
    for table in purposes:
        if table["id"] == NEWS:
            table["expires_after_days"] = LIFETIME_DAYS
    return launch(upstream.port, purpose=purposes)


def rfc3339(days_ago: float) -> str:
    moment = datetime.now(timezone.utc) - timedelta(days=days_ago)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def database(gate: Optgate):
    return gate.config_path.parent / "data" / "optgate.db"


def tables_holding(gate: Optgate, needle: str) -> dict[str, int]:
    """Per table of the SQLite file, how many rows mention `needle` in any column (text
    or bytes). Read with Python's own sqlite3, beside a running `serve`."""
    found = {}
    with sqlite3.connect(f"file:{database(gate)}?mode=ro", uri=True) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"contacts", "consent_history", "events", "suppressions", "erasures", "signups"} <= set(tables), tables
        for table in tables:
            hits = 0
            for row in db.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, str) and needle in value:
                        hits += 1
                        break
                    if isinstance(value, bytes) and needle.encode() in value:
                        hits += 1
                        break
            if hits:
                found[table] = hits
    return found


def import_csv(gate: Optgate, path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BINARY), "--config", str(gate.config_path), "consent", "import", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def export_rows(gate: Optgate) -> list[dict]:
    out = gate.cli_ok("consent", "export")
    assert out.startswith(HEADER), out[:200]
    return list(csv.DictReader(io.StringIO(out)))


def rejected_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("line ")]


def summary(stdout: str) -> re.Match:
    found = re.search(r"^imported (\d+) rows, rejected (\d+) \((\d+) rows/s\)$", stdout, re.M)
    assert found, stdout[-500:]
    return found


def write_rows(path, count: int, prefix: str, bad: dict[int, str] | None = None):
    """A CSV of `count` grants (two purposes in turn), with row i replaced by bad[i]."""
    bad = bad or {}
    with open(path, "w") as f:
        f.write(HEADER)
        for i in range(count):
            if i in bad:
                f.write(bad[i] + "\n")
                continue
            purpose = NEWS if i % 2 == 0 else B2B
            f.write(f'{prefix}{i}@example.org,{purpose},granted,2025-0{1 + i % 9}-01T12:00:00Z,form,"{{""ip"":""192.0.2.{i % 250}""}}"\n')


# ---- import ------------------------------------------------------------------------------


def test_a_large_import_names_its_bad_rows_and_writes_the_rest(offline, tmp_path):
    """100 000 rows with 3 bad ones: exit 2, exactly 3 errors naming their line and
    field, 99 997 consents recorded, in well under a minute."""
    gate = offline()
    path = tmp_path / "list.csv"
    # Row i is on line i + 2 (the header is line 1).
    bad = {
        41: "not-an-address,news,granted,2025-01-01T12:00:00Z,form,",
        50_000: "bad.purpose@example.org,newsletters,granted,2025-01-01T12:00:00Z,form,",
        99_998: "bad.time@example.org,news,granted,01/02/2025,form,",
    }
    write_rows(path, 100_000, "bulk", bad)

    started = time.monotonic()
    done = import_csv(gate, path)
    took = time.monotonic() - started

    assert done.returncode == 2, done
    errors = rejected_lines(done.stdout)
    assert len(errors) == 3, done.stdout[-2000:]
    assert errors[0].startswith("line 43: email: 'not-an-address'"), errors
    assert errors[1].startswith("line 50002: purpose: unknown purpose 'newsletters'"), errors
    assert errors[2].startswith("line 100000: timestamp: '01/02/2025'"), errors
    found = summary(done.stdout)
    assert (int(found[1]), int(found[2])) == (99_997, 3)
    assert took < 30, f"the import took {took:.1f}s"
    print(f"imported 100 000 rows in {took:.2f}s; optgate says {found[3]} rows/s")
    assert "3 rows rejected" in done.stderr.splitlines()[-1]

    rows = export_rows(gate)
    assert len(rows) == 99_997
    assert len({r["email"] for r in rows}) == 99_997
    assert not {"not-an-address", "bad.purpose@example.org", "bad.time@example.org"} & {r["email"] for r in rows}
    first = rows[0]
    assert first == {
        "email": "bulk0@example.org",
        "purpose": NEWS,
        "status": "granted",
        "timestamp": "2025-01-01T12:00:00Z",
        "source": "form",
        "evidence": '{"ip":"192.0.2.0"}',
    }
    shown = gate.cli_ok("consent", "show", "bulk99999@example.org")
    assert re.search(rf"#\d+ 2025-01-01T12:00:00Z grant\s+{B2B}\s+source=form", shown), shown


def test_a_clean_import_exits_0(offline, tmp_path):
    """Every row valid: exit 0 and the summary, nothing rejected."""
    gate = offline()
    path = tmp_path / "clean.csv"
    write_rows(path, 10, "clean")
    done = import_csv(gate, path)
    assert done.returncode == 0, done
    assert rejected_lines(done.stdout) == []
    assert summary(done.stdout)[1] == "10"


def test_a_file_that_is_not_a_consent_csv_is_one_line_error(offline, tmp_path):
    """A missing file, or a header without the needed columns: exit 1, one line, nothing written."""
    gate = offline()
    missing = import_csv(gate, tmp_path / "nowhere.csv")
    assert missing.returncode == 1 and "nowhere.csv" in missing.stderr, missing
    headless = tmp_path / "headless.csv"
    headless.write_text("email,purpose\na@example.org,news\n")
    done = import_csv(gate, headless)
    assert done.returncode == 1, done
    assert "no 'status' column" in done.stderr.splitlines()[-1], done
    assert export_rows(gate) == []


def test_a_killed_import_leaves_nothing(offline, tmp_path):
    """SIGKILL while the rows are being written: nothing of the file is in the register,
    what was there before is intact, and the next import works."""
    gate = offline()
    gate.cli_ok("consent", "grant", "before@example.org", NEWS)
    path = tmp_path / "huge.csv"
    write_rows(path, 400_000, "killed")

    proc = subprocess.Popen(
        [str(BINARY), "--config", str(gate.config_path), "consent", "import", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    seen = []
    deadline = time.monotonic() + WAIT
    for line in proc.stderr:
        seen.append(line)
        if "writing 400000 rows" in line or time.monotonic() > deadline:
            break
    time.sleep(0.3)  # into the transaction
    assert proc.poll() is None, f"the import ended before it could be killed: {seen}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(WAIT)
    assert any("writing 400000 rows" in line for line in seen), seen

    rows = export_rows(gate)
    assert [r["email"] for r in rows] == ["before@example.org"]
    assert "killed" not in gate.cli_ok("consent", "export", "--format", "json")
    small = tmp_path / "after.csv"
    write_rows(small, 5, "after")
    done = import_csv(gate, small)
    assert done.returncode == 0, done
    assert len(export_rows(gate)) == 6


# ---- export ------------------------------------------------------------------------------


def test_export_imports_back_as_the_same_register(offline, tmp_path):
    """Export → import into a fresh data folder → export: the same rows, byte for byte,
    including withdrawals from everything and evidence with commas, quotes and accents."""
    first = offline()
    path = tmp_path / "mixed.csv"
    evidence = json.dumps({"ip": "192.0.2.9", "wording": 'v3, "short"', "page": "inscription-été"})
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(HEADER.strip().split(","))
        out.writerow(["ann@example.org", NEWS, "granted", "2025-03-01T10:00:00Z", "paper form", evidence])
        out.writerow(["ann@example.org", B2B, "withdrawn", "2025-03-02T10:00:00+02:00", "", ""])
        out.writerow(["bob@example.org", NEWS, "granted", "2025-03-03T10:00:00Z", "api", '{"n":1}'])
        out.writerow(["ann@example.org", "*", "withdrawn", "2025-03-04T10:00:00Z", "phone", ""])
    assert import_csv(first, path).returncode == 0
    first.cli_ok("consent", "grant", "cid@example.org", NEWS, "--source", "desk", "--evidence", '{"ticket":"T-1"}')
    exported = first.cli_ok("consent", "export")

    rows = list(csv.DictReader(io.StringIO(exported)))
    assert [(r["email"], r["purpose"], r["status"]) for r in rows] == [
        ("ann@example.org", NEWS, "granted"),
        ("ann@example.org", B2B, "withdrawn"),
        ("bob@example.org", NEWS, "granted"),
        ("ann@example.org", "*", "withdrawn"),
        ("cid@example.org", NEWS, "granted"),
    ]
    assert rows[1]["timestamp"] == "2025-03-02T08:00:00Z" and rows[1]["source"] == "import"
    assert json.loads(rows[0]["evidence"]) == json.loads(evidence)

    second = offline()
    copy = tmp_path / "exported.csv"
    copy.write_text(exported)
    done = import_csv(second, copy)
    assert done.returncode == 0, done
    assert second.cli_ok("consent", "export") == exported

    # The JSON export holds the same contacts and histories.
    def contacts(gate):
        data = json.loads(gate.cli_ok("consent", "export", "--format", "json"))
        return {
            c["address"]: [(e["purpose"], e["action"], e["at"], e["source"], e["evidence"]) for e in c["history"]]
            for c in data["contacts"]
        }

    assert contacts(second) == contacts(first)
    assert len(contacts(first)["ann@example.org"]) == 3


# ---- expiry ------------------------------------------------------------------------------


def test_a_consent_past_its_lifetime_is_suppressed_and_listed(gate, upstream, tmp_path):
    """news lapses after LIFETIME_DAYS: a grant imported older than that is suppressed
    with reason `consent expired`; one lapsing within 30 days is still mailed and is
    listed by `consent expiring --within 30d`, with the lapsed one."""
    token = unique("expiry")
    lapsed, lapsing, fresh = (f"{who}.{token}@example.org" for who in ("lapsed", "lapsing", "fresh"))
    path = tmp_path / "ages.csv"
    path.write_text(
        HEADER
        + f"{lapsed},{NEWS},granted,{rfc3339(LIFETIME_DAYS + 5)},old-form,\n"
        + f"{lapsing},{NEWS},granted,{rfc3339(LIFETIME_DAYS - 10)},old-form,\n"
        + f"{fresh},{NEWS},granted,{rfc3339(1)},new-form,\n"
    )
    assert import_csv(gate, path).returncode == 0

    reply = submit(gate.smtp_port, [lapsed], make_message(f"{token}-1", purpose=NEWS))
    assert reply.code == 250 and reply_counts(reply.text) == (0, 1), reply
    assert "consent expired" in reply.text, reply
    assert upstream.wait_for(token=f"{token}-1", count=0) == []
    deliver(gate, upstream, lapsing, make_message(f"{token}-2", purpose=NEWS))

    listed = gate.cli_ok("consent", "expiring", "--within", "30d")
    lines = {line.split()[0]: line.split() for line in listed.splitlines() if token in line}
    assert set(lines) == {lapsed, lapsing}, listed
    assert lines[lapsed][1] == NEWS and lines[lapsed][-1] == "lapsed"
    assert lines[lapsing][-1] == "lapsing"
    granted, lapses = (datetime.fromisoformat(v.replace("Z", "+00:00")) for v in lines[lapsing][2:4])
    assert lapses - granted == timedelta(days=LIFETIME_DAYS)
    assert fresh not in gate.cli_ok("consent", "expiring", "--within", "1d")

    # Renewed: a new grant makes the old one no longer the one that counts.
    gate.cli_ok("consent", "grant", lapsed, NEWS)
    deliver(gate, upstream, lapsed, make_message(f"{token}-3", purpose=NEWS))
    assert lapsed not in gate.cli_ok("consent", "expiring", "--within", "30d")


# ---- erasure -----------------------------------------------------------------------------


def test_a_forgotten_person_is_nowhere_and_never_mailed_again(gate, upstream, tmp_path):
    """After `contact forget`, the address is in no table of the database nor in any
    export; a new message to it is suppressed (erased) and an import row for it is
    rejected — and it still is not stored anywhere."""
    token = unique("forget")
    who = f"{token}@example.org"
    other = f"{token}.other@example.org"
    gate.cli_ok("consent", "grant", who, NEWS, "--source", "form", "--evidence", '{"ip":"192.0.2.50"}')
    gate.cli_ok("consent", "grant", other, NEWS)
    gate.cli_ok("contact", "set", who, "--customer", "true")
    deliver(gate, upstream, who, make_message(f"{token}-before", purpose=NEWS))
    person = json.loads(gate.cli_ok("contact", "export", who))
    assert person["contact"] == {"customer": True} and len(person["consent_history"]) == 1
    assert {"consent.granted", "decision", "delivered"} <= {e["kind"] for e in person["events"]}
    assert tables_holding(gate, who).keys() >= {"contacts", "consent_history", "events"}

    said = gate.cli_ok("contact", "forget", who)
    assert "forgotten" in said and who not in said and token not in said

    assert tables_holding(gate, who) == {}
    assert tables_holding(gate, other), "only that person is forgotten"
    # Not even in the file's free space or its write-ahead log: the deleted rows were
    # overwritten, and the log emptied into the file.
    for path in database(gate).parent.glob("optgate.db*"):
        assert who.encode() not in path.read_bytes(), path
    for args in (("consent", "export"), ("consent", "export", "--format", "json")):
        exported = gate.cli_ok(*args)
        assert who not in exported and other in exported
    person = json.loads(gate.cli_ok("contact", "export", who))
    assert person["erased"] is True
    assert person["consent_history"] == [] and person["events"] == [] and person["contact"] is None

    # Never mailed again, whatever the purpose, even transactional.
    for purpose in (NEWS, B2B, PURPOSES["transactional"]):
        reply = submit(gate.smtp_port, [who], make_message(f"{token}-{purpose}", purpose=purpose))
        assert reply.code == 250 and reply_counts(reply.text) == (0, 1), reply
        assert "erased" in reply.text, reply
    assert upstream.wait_for(token=f"{token}-{NEWS}", count=0) == []

    # Never imported or recorded again.
    path = tmp_path / "again.csv"
    path.write_text(HEADER + f"{other},{B2B},granted,2025-01-01T00:00:00Z,,\n{who},{NEWS},granted,2025-01-01T00:00:00Z,,\n")
    done = import_csv(gate, path)
    assert done.returncode == 2, done
    assert rejected_lines(done.stdout) == ["line 3: email: erased at the person's request"]
    assert summary(done.stdout)[1] == "1"
    refused = gate.cli("consent", "grant", who, NEWS)
    assert refused.code != 0 and "erased" in refused.err

    assert tables_holding(gate, who) == {}
    assert "already forgotten" in gate.cli_ok("contact", "forget", who)
