#!/usr/bin/env python3
"""The benchmark's consent database: COUNT contacts, every one with a recorded consent
for PURPOSE, one in ten of the others having withdrawn it since (so lookups do not all
find the same shape). The test recipients are left out: bench/run grants them with
`optgate consent grant`, and they count towards COUNT.

    contacts.py csv    FILE   --count N --purpose P --skip K
        writes the CSV that `optgate consent import` reads
        (email,purpose,status,timestamp,source)
    contacts.py sqlite DBFILE --count N --purpose P --skip K
        the fallback while there is no import command: inserts the same rows
        straight into the tables of a database optgate has already created
        (contacts, consent_history), in one transaction
"""
import argparse
import datetime
import random
import sqlite3
import sys
import time


def rows(count, purpose, skip):
    rng = random.Random(42)
    now = int(time.time())
    for i in range(count - skip):
        email = f"contact{i:06d}@example.org"
        granted = now - rng.randint(86400, 700 * 86400)
        yield email, purpose, "granted", granted
        if i % 10 == 9:
            yield email, purpose, "withdrawn", min(granted + rng.randint(3600, 30 * 86400), now - 60)


def rfc3339(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["csv", "sqlite"])
    ap.add_argument("path")
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--purpose", default="newsletter")
    ap.add_argument("--skip", type=int, default=0, help="contacts added otherwise")
    a = ap.parse_args()

    if a.mode == "csv":
        with open(a.path, "w") as f:
            f.write("email,purpose,status,timestamp,source\n")
            for email, purpose, status, at in rows(a.count, a.purpose, a.skip):
                f.write(f"{email},{purpose},{status},{rfc3339(at)},benchmark\n")
        return 0

    db = sqlite3.connect(a.path, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 5000")
    have = {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")}
            for t in ("contacts", "consent_history")}
    need = {"contacts": {"address", "customer", "created_at"},
            "consent_history": {"address", "purpose", "action", "at", "recorded_at",
                                "source", "evidence"}}
    for table, cols in need.items():
        if not cols <= have[table]:
            sys.exit(f"contacts.py: {a.path}: table {table} lacks {sorted(cols - have[table])}: "
                     "the schema changed; use `optgate consent import` or update this script")
    now = int(time.time())
    db.execute("BEGIN IMMEDIATE")
    seen = set()
    for email, purpose, status, at in rows(a.count, a.purpose, a.skip):
        if email not in seen:
            seen.add(email)
            db.execute("INSERT INTO contacts (address, customer, created_at) VALUES (?, 0, ?) "
                       "ON CONFLICT (address) DO NOTHING", (email, at))
        db.execute("INSERT INTO consent_history "
                   "(address, purpose, action, at, recorded_at, source, evidence) "
                   "VALUES (?, ?, ?, ?, ?, 'benchmark', '{}')",
                   (email, purpose, "grant" if status == "granted" else "withdraw", at, now))
    db.execute("COMMIT")
    n = db.execute("SELECT count(*) FROM contacts").fetchone()[0]
    print(f"{n} contacts in {a.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
