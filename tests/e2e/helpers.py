"""What the end-to-end tests drive and watch: a recording upstream SMTP server, an
`optgate serve` process with its config and log, the `optgate` command line, and
SMTP clients (smtplib for the ordinary path, a raw socket for what smtplib won't do).
The fixtures in conftest.py put them together."""

import asyncio
import email
import email.policy
import http.client
import itertools
import logging
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections import Counter, namedtuple
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("OPTGATE_BIN", REPO / "target" / "release" / "optgate"))
# Logs and errors as plain text, without colour codes.
ENV = {**os.environ, "NO_COLOR": "1"}

# The longest any wait in the suite may take, in seconds.
WAIT = 15
# How long to keep watching for a message that must not arrive.
SETTLE = 0.7

PASSWORD = "secret"
# One configured purpose per legal basis.
PURPOSES = {
    "consent": "news",
    "soft_opt_in": "offers",
    "legitimate_interest": "b2b",
    "transactional": "orders",
}
SENDER = "shop@example.com"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str = "msg") -> str:
    """A token that marks one test's messages (in a subject, an address)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(check, what: str, timeout: float = WAIT, interval: float = 0.1):
    """Polls `check` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout}s for {what}")
        time.sleep(interval)


def insecure_tls() -> ssl.SSLContext:
    """optgate presents a self-signed certificate: accept it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def make_message(subject: str, purpose: str | None = None, body: str = "Hello from the shop.\r\n") -> bytes:
    """A small RFC 5322 message with CRLF line endings, optionally naming its purpose."""
    headers = [
        "From: Shop <shop@example.com>",
        "To: Customers <customers@example.com>",
        f"Subject: {subject}",
        f"Message-ID: <{subject}@example.com>",
        "Date: Mon, 02 Mar 2026 10:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    if purpose:
        headers.append(f"X-Optgate-Purpose: {purpose}")
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


def reply_counts(text: str) -> tuple[int, int]:
    """(accepted, suppressed) as the 250 reply after DATA states them."""
    accepted = sum(int(n) for n in re.findall(r"(\d+) accepted", text))
    suppressed = sum(int(n) for n in re.findall(r"(\d+) suppressed", text))
    return accepted, suppressed


def purpose_verdict(shown: str, purpose: str) -> str:
    """From `optgate consent show` output, whether `purpose` may be mailed ("yes …" or "no: reason")."""
    found = re.search(rf"^{re.escape(purpose)}\s+\S+\s+(.+)$", shown, re.M)
    assert found, f"no line for purpose {purpose} in:\n{shown}"
    return found[1].strip()


def assert_crlf_only(data: bytes):
    """Every line of `data` ends with CRLF: no bare LF, no bare CR."""
    assert not re.search(rb"(?<!\r)\n", data), f"bare LF in {data!r}"
    assert not re.search(rb"\r(?!\n)", data), f"bare CR in {data!r}"


# ---- the upstream: a real SMTP server that records what optgate relays -------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list
    data: bytes  # as received, dot-unstuffed, nothing else changed

    @property
    def null_sender(self) -> bool:
        return self.mail_from in ("", "<>")

    def parsed(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)


class Upstream:
    """An aiosmtpd server on 127.0.0.1 that records every message it accepts, and
    answers as scripted for chosen recipients: transient failures for some attempts,
    or a permanent refusal."""

    def __init__(self):
        self.port = free_port()
        self.messages: list[Received] = []
        self.attempts: Counter = Counter()  # RCPT commands seen, per recipient
        self._scripts: dict = {}  # recipient -> iterator of replies; exhausted = accept
        self._held: dict[str, threading.Event] = {}  # recipient -> set when let go
        self._changed = threading.Condition()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=True)

    def start(self):
        self._controller.start()

    def stop(self):
        self._controller.stop()

    # -- scripting

    def answer(self, rcpt: str, *replies: str):
        """The next attempts to deliver to `rcpt` get these replies, one each; then it is accepted."""
        with self._changed:
            self._scripts[rcpt] = iter(replies)

    def refuse(self, rcpt: str, reply: str):
        """Every attempt to deliver to `rcpt` gets `reply`, until `release`."""
        with self._changed:
            self._scripts[rcpt] = itertools.repeat(reply)

    def release(self, rcpt: str):
        with self._changed:
            self._scripts.pop(rcpt, None)

    def hold(self, rcpt: str):
        """Messages to `rcpt` get no answer after their data (the attempt hangs, as
        with a slow server) until `let_go`."""
        with self._changed:
            self._held[rcpt] = threading.Event()

    def let_go(self, rcpt: str):
        with self._changed:
            held = self._held.pop(rcpt, None)
        if held:
            held.set()

    # -- aiosmtpd hooks

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self._changed:
            self.attempts[address] += 1
            reply = next(self._scripts.get(address, iter(())), None)
            self._changed.notify_all()
        if reply is None:
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK"
        if reply.startswith("421"):
            # 421 means the server closes the connection: do so once the reply is out.
            asyncio.get_running_loop().call_soon(server.transport.close)
        return reply

    async def handle_DATA(self, server, session, envelope):
        with self._changed:
            held = [self._held[r] for r in envelope.rcpt_tos if r in self._held]
        for event in held:
            await asyncio.get_running_loop().run_in_executor(None, event.wait, WAIT)
        message = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()
        return "250 2.0.0 Stored"

    # -- looking at what arrived

    def received(self, token: str | None = None, rcpt: str | None = None) -> list[Received]:
        """Messages so far, those with `token` in their bytes and/or sent to `rcpt`."""
        with self._changed:
            return [
                m
                for m in self.messages
                if (token is None or token.encode() in m.data) and (rcpt is None or rcpt in m.rcpt_tos)
            ]

    def wait_for(self, token: str | None = None, rcpt: str | None = None, count: int = 1) -> list[Received]:
        """Waits until `count` such messages arrived, watches a moment longer for any
        extra one, and returns them all (so a caller can assert there are exactly `count`)."""
        deadline = time.monotonic() + WAIT
        with self._changed:
            while len(self.received(token, rcpt)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"upstream got {len(self.received(token, rcpt))} of {count} messages "
                        f"(token={token}, rcpt={rcpt}) in {WAIT}s; attempts so far: {dict(self.attempts)}"
                    )
                self._changed.wait(left)
        time.sleep(SETTLE)
        return self.received(token, rcpt)

    def wait_for_attempts(self, rcpt: str, count: int):
        """Waits until optgate tried `rcpt` at least `count` times."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.attempts[rcpt] >= count, WAIT):
                raise AssertionError(f"optgate tried {rcpt} {self.attempts[rcpt]} times, not {count}, in {WAIT}s")


# ---- the optgate command line ------------------------------------------------------


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_optgate(*args: str, config: Path | None = None, input: str | None = None, cwd: Path | None = None) -> CliResult:
    """Runs `optgate [--config FILE] ARGS…` and returns its exit code, stdout and stderr."""
    command = [str(BINARY)] + (["--config", str(config)] if config else []) + list(args)
    done = subprocess.run(command, input=input, capture_output=True, text=True, timeout=60, cwd=cwd, env=ENV)
    return CliResult(done.returncode, done.stdout, done.stderr)


def hash_password(password: str) -> str:
    """What `echo -n PASSWORD | optgate hash-password` prints."""
    result = run_optgate("hash-password", input=password)
    assert result.code == 0 and result.out.startswith("$argon2"), result
    return result.out.strip()


def to_toml(table: dict, path: tuple = ()) -> str:
    """Writes a config dict as TOML: scalars and lists of scalars, tables, arrays of tables."""
    scalars, tables, arrays = [], [], []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(scalars) + "\n" if scalars else ""
    for key, value in tables:
        out += f"\n[{'.'.join(path + (key,))}]\n" + to_toml(value, path + (key,))
    for key, items in arrays:
        for item in items:
            out += f"\n[[{'.'.join(path + (key,))}]]\n" + to_toml(item, path + (key,))
    return out


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, table by table."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def purpose_tables(*extra: dict) -> list[dict]:
    """The config's [[purpose]] tables: one per basis (see PURPOSES), then `extra` ones."""
    return [{"id": pid, "name": pid.capitalize(), "basis": basis} for basis, pid in PURPOSES.items()] + list(extra)


def gateway_config(workdir: Path, upstream_port: int, password_hash: str) -> dict:
    """A test gateway: 127.0.0.1 trusted, two accounts (`mailer`, free; `crm`, limited
    to offers and orders), one purpose per basis, the upstream over plain SMTP, quick
    retries, its own HTTP port (in every link it writes), and an HTTP rate limit no
    test reaches by accident (every test client is 127.0.0.1)."""
    http_port = free_port()
    return {
        "smtp": {
            "listen": [f"127.0.0.1:{free_port()}"],
            "hostname": "optgate.test",
            "trusted_networks": ["127.0.0.0/8"],
            "max_message_size": 1_000_000,
            "account": [
                {"username": "mailer", "password_hash": password_hash, "default_purpose": "orders"},
                {
                    "username": "crm",
                    "password_hash": password_hash,
                    "purposes": ["offers", "orders"],
                    "default_purpose": "offers",
                },
            ],
        },
        "http": {"listen": f"127.0.0.1:{http_port}", "public_url": f"http://127.0.0.1:{http_port}"},
        "storage": {"data_dir": str(workdir / "data"), "fsync": True},
        "upstream": {"kind": "smtp", "host": "127.0.0.1", "port": upstream_port, "tls": "none", "timeout": "10s"},
        "queue": {"retry_schedule": ["1s", "2s"], "max_age": "1h"},
        "unsubscribe": {"rate_limit_per_minute": 100_000},
        "policy": {"default_purpose": PURPOSES["consent"]},
        "purpose": purpose_tables(),
    }


# ---- optgate serve ----------------------------------------------------------------


class Optgate:
    """One `optgate --config FILE serve`: started, stopped, killed, restarted. Its
    stderr goes to a log file that survives restarts. If `config` is a dict it is
    (re)written to `config_path` at each start, so a test may change it in between."""

    def __init__(self, config_path: Path, config: dict | None = None):
        self.config_path = config_path
        self.config = config
        self.log_path = config_path.with_suffix(".log")
        self.proc: subprocess.Popen | None = None
        # What `serve` printed: "smtp listening on ADDR", "http listening on ADDR".
        self.listening: dict[str, tuple[str, int]] = {}

    def __repr__(self):
        return f"<optgate {self.config_path} listening={self.listening}>"

    @property
    def smtp_address(self) -> tuple[str, int] | None:
        return self.listening.get("smtp")

    @property
    def smtp_port(self) -> int:
        return self.smtp_address[1]

    @property
    def http_url(self) -> str:
        """The base URL of the HTTP listener, e.g. http://127.0.0.1:8080."""
        host, port = self.listening["http"]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self):
        if self.config is not None:
            self.config_path.write_text(to_toml(self.config))

    def start(self):
        self.write_config()
        log = open(self.log_path, "ab")
        log.write(f"---- optgate serve started at {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [str(BINARY), "--config", str(self.config_path), "serve"],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=self.config_path.parent,
            env=ENV,
        )
        log.close()
        self.listening = {}
        listening = threading.Event()
        threading.Thread(target=self._read_stdout, args=(self.proc, listening), daemon=True).start()
        deadline = time.monotonic() + WAIT
        while not listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"optgate did not print both `smtp listening on …` and `http listening on …`:\n{self.log_tail()}"
                )

    def _read_stdout(self, proc: subprocess.Popen, listening: threading.Event):
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            with open(self.log_path, "a") as log:
                log.write(f"[stdout] {line}\n")
            found = re.match(r"(smtp|http) listening on \[?([^\]]+?)\]?:(\d+)$", line)
            if found:
                self.listening[found[1]] = (found[2], int(found[3]))
                if {"smtp", "http"} <= self.listening.keys():
                    listening.set()

    def signal(self, sig: int = signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"optgate still running {timeout}s after SIGTERM:\n{self.log_tail()}")

    def stop(self):
        """SIGTERM, and check it exits 0 in time."""
        self.signal(signal.SIGTERM)
        code = self.wait()
        assert code == 0, f"optgate exited {code} after SIGTERM:\n{self.log_tail()}"

    def kill(self):
        """kill -9."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str) -> CliResult:
        return run_optgate(*args, config=self.config_path)

    def cli_ok(self, *args: str) -> str:
        """Runs a command that must succeed; returns its stdout."""
        result = self.cli(*args)
        assert result.code == 0, f"optgate {' '.join(args)} failed: {result}"
        return result.out

    def cli_until(self, check, *args: str) -> str:
        """Polls a command until `check(stdout)` holds; returns that stdout."""

        def output():
            out = self.cli_ok(*args)
            return out if check(out) else None

        return wait_until(output, f"`optgate {' '.join(args)}` to show what the test expects")

    def log_tail(self, lines: int = 80) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# ---- SMTP clients -------------------------------------------------------------------

Reply = namedtuple("Reply", "code text")


class SmtpClient(smtplib.SMTP):
    """smtplib's client, answering with `Reply`s and logging in with AUTH PLAIN."""

    def __init__(self, port: int):
        super().__init__("127.0.0.1", port, local_hostname="client.test", timeout=WAIT)

    def auth_plain_login(self, user: str, password: str) -> Reply:
        self.user, self.password = user, password
        return Reply(*self.auth("PLAIN", self.auth_plain))

    def transaction(self, sender: str, recipients: list[str], message: bytes) -> Reply:
        """MAIL, RCPT for each, DATA: the reply after the message's final dot."""
        reply = self.mail(sender)
        assert reply[0] == 250, f"MAIL FROM:<{sender}> got {reply}"
        for rcpt in recipients:
            reply = self.rcpt(rcpt)
            assert reply[0] == 250, f"RCPT TO:<{rcpt}> got {reply}"
        code, text = self.data(message)
        return Reply(code, text.decode())

    def __exit__(self, *exc):
        """QUIT if the server still listens; close in any case."""
        try:
            self.quit()
        except (smtplib.SMTPException, OSError):
            self.close()


def connect(port: int, starttls: bool = False, login: tuple[str, str] | None = None) -> SmtpClient:
    """An SMTP session after EHLO, and if asked STARTTLS (then EHLO again) and AUTH PLAIN."""
    client = SmtpClient(port)
    client.ehlo()
    if starttls:
        client.starttls(context=insecure_tls())
        client.ehlo()
    if login:
        client.auth_plain_login(*login)
    return client


def submit(port: int, recipients: list[str], message: bytes, sender: str = SENDER, **session) -> Reply:
    """Sends one message in its own session; returns the reply after DATA."""
    with connect(port, **session) as client:
        return client.transaction(sender, recipients, message)


class RawSmtp:
    """A hand-driven SMTP connection, for what smtplib won't do: pipelining, bare LFs."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.pending = b""
        self.greeting = self.reply()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def reply(self) -> Reply:
        """Reads one whole (possibly multi-line) reply."""
        lines = []
        while not lines or lines[-1][3:4] == "-":
            while b"\r\n" not in self.pending:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"optgate closed the connection; reply so far: {lines}")
                self.pending += chunk
            line, self.pending = self.pending.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
        return Reply(int(lines[-1][:3]), "\n".join(line[4:] for line in lines))

    def command(self, line: str) -> Reply:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self):
        self.sock = insecure_tls().wrap_socket(self.sock)


# ---- what a marketing copy carries ---------------------------------------------------

# An unsubscribe link optgate wrote into a copy; group 1 is the token.
UNSUBSCRIBE_LINK = re.compile(r"https?://[^\s<>\"'/]+/u/([A-Za-z0-9_-]+)")
# The body RFC 8058 one-click POSTs carry, and the List-Unsubscribe-Post value.
ONE_CLICK = "List-Unsubscribe=One-Click"


def subscriber(gate: "Optgate", purpose: str = PURPOSES["consent"], prefix: str = "reader") -> str:
    """A new address that consented to `purpose` (recorded with the CLI)."""
    address = f"{unique(prefix)}@example.net"
    gate.cli_ok("consent", "grant", address, purpose)
    return address


def deliver(gate: "Optgate", upstream: Upstream, rcpt: str, message: bytes) -> Received:
    """Sends `message` to `rcpt`, who may receive it, and returns the one copy the upstream got."""
    before = len(upstream.received(rcpt=rcpt))
    reply = submit(gate.smtp_port, [rcpt], message)
    assert reply.code == 250 and reply_counts(reply.text) == (1, 0), reply
    copies = upstream.wait_for(rcpt=rcpt, count=before + 1)
    assert len(copies) == before + 1, f"{len(copies) - before} copies for {rcpt}"
    return copies[-1]


def subscribe_and_mail(gate: "Optgate", upstream: Upstream, *purposes: str) -> tuple[str, dict]:
    """A new address that consented to `purposes` and got one message for each: the
    address, and per purpose the unsubscribe URL of its copy."""
    rcpt = subscriber(gate, purposes[0])
    urls = {}
    for purpose in purposes:
        if purpose != purposes[0]:
            gate.cli_ok("consent", "grant", rcpt, purpose)
        copy = deliver(gate, upstream, rcpt, make_message(unique(purpose), purpose=purpose))
        urls[purpose] = one_click_url(copy, gate)
    return rcpt, urls


def delivered(gate: "Optgate", upstream: Upstream, rcpt: str, purpose: str) -> bool:
    """Sends one message for `purpose` to `rcpt`: True if it was delivered, False if
    the 250 says it was suppressed (and then the upstream got nothing)."""
    subject = unique(f"next-{purpose}")
    reply = submit(gate.smtp_port, [rcpt], make_message(subject, purpose=purpose))
    assert reply.code == 250, reply
    if reply_counts(reply.text) == (0, 1):
        assert upstream.wait_for(token=subject, count=0) == []
        return False
    assert reply_counts(reply.text) == (1, 0), reply
    upstream.wait_for(token=subject, rcpt=rcpt)
    return True


def assert_wire_format(data: bytes):
    """What every relayed copy must be: CRLF line ends only, no line over 998 octets
    (RFC 5322), no X-Optgate-* field left in the header."""
    assert_crlf_only(data)
    longest = max(len(line) for line in data.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} octets"
    header = data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"(?im)^x-optgate-", header), header.decode(errors="replace")


def one_click_url(copy: Received, gate: "Optgate") -> str:
    """The copy's unsubscribe URL, once its RFC 2369 / RFC 8058 fields are checked:
    exactly one `List-Unsubscribe: <{public_url}/u/TOKEN>` and exactly one
    `List-Unsubscribe-Post: List-Unsubscribe=One-Click`."""
    message = copy.parsed()
    fields = [str(v).strip() for v in message.get_all("List-Unsubscribe", [])]
    posts = [str(v).strip() for v in message.get_all("List-Unsubscribe-Post", [])]
    assert posts == [ONE_CLICK], f"List-Unsubscribe-Post fields: {posts}"
    assert len(fields) == 1, f"List-Unsubscribe fields: {fields}"
    found = re.fullmatch(rf"<({re.escape(gate.http_url)}/u/[A-Za-z0-9_-]{{1,64}})>", fields[0])
    assert found, f"List-Unsubscribe: {fields[0]} (expected <{gate.http_url}/u/TOKEN>, a token of at most 64 URL-safe characters)"
    return found[1]


def text_parts(message: email.message.EmailMessage) -> list:
    """The text/* parts of a message that are not attachments (those a reader sees)."""
    return [p for p in message.walk() if p.get_content_maintype() == "text" and not p.is_attachment()]


def consent_history(shown: str) -> list[dict]:
    """The history of `optgate consent show` output: per event its id, action,
    purpose, source and evidence (a dict), oldest first."""
    pattern = r"^\s+#(\d+) (\S+) (\S+)\s+(\S+)\s+source=(\S+) evidence=(.*)$"
    return [
        {"id": int(m[1]), "at": m[2], "action": m[3], "purpose": m[4], "source": m[5], "evidence": json.loads(m[6])}
        for m in re.finditer(pattern, shown, re.M)
    ]


# ---- HTTP clients -------------------------------------------------------------------


@dataclass
class HttpReply:
    status: int
    headers: http.client.HTTPMessage
    text: str


def fetch(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> HttpReply:
    """One HTTP request (http.client): no redirect followed, no status raised."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT)
    try:
        connection.request(method, parts.path or "/", body=body, headers=headers or {})
        response = connection.getresponse()
        return HttpReply(response.status, response.headers, response.read().decode("utf-8", "replace"))
    finally:
        connection.close()


def metric(gate: "Optgate", sample: str) -> float:
    """One sample of /metrics, e.g. `optgate_web_invalid_tokens_total`."""
    page = fetch(f"{gate.http_url}/metrics")
    assert page.status == 200, page
    found = re.search(rf"^{re.escape(sample)} (\S+)$", page.text, re.M)
    assert found, f"no {sample} in /metrics:\n{page.text}"
    return float(found[1])


# ---- DKIM, checked by an independent verifier (dkimpy) ------------------------------


def dns_record(line: str) -> tuple[str, str]:
    """A printed `NAME. IN TXT "v=DKIM1; …"` line as (name without the final dot, TXT text)."""
    found = re.fullmatch(r'(\S+?)\.?\s+IN\s+TXT\s+"([^"]*)"', line.strip())
    assert found, f"not a DNS TXT record line: {line!r}"
    return found[1].lower(), found[2]


def generated_dkim_record(gate: "Optgate", domain: str) -> tuple[str, str]:
    """The DNS record `serve` logged on generating a DKIM key for `domain`."""
    pattern = rf'publish this DNS record: (optgate\._domainkey\.{re.escape(domain)}\. IN TXT "[^"]*")'
    line = wait_until(
        lambda: re.findall(pattern, gate.log_path.read_text()), f"the DNS record of the DKIM key generated for {domain}"
    )
    assert len(line) == 1, f"{len(line)} keys generated for {domain}: {line}"
    return dns_record(line[0])


def dkim_tags(data: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field at the top of `data`, in order, with
    folding whitespace removed (h= as written, e.g. `From:To:…`)."""
    signatures = email.message_from_bytes(data, policy=email.policy.compat32).get_all("DKIM-Signature", [])
    out = []
    for value in signatures:
        tags = {}
        for tag in re.sub(r"\s+", "", value).split(";"):
            if "=" in tag:
                name, _, text = tag.partition("=")
                tags[name] = text
        out.append(tags)
    return out


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def dkim_verify(data: bytes, records: dict[str, str]) -> list[dict[str, str]]:
    """Checks with dkimpy that every DKIM-Signature of `data` verifies, each key read
    from `records` (DNS name → TXT text) instead of the DNS; returns their tags."""
    import dkim  # dkimpy; imported here so that modules without DKIM tests need not have it

    def lookup(name, timeout=5):
        return records.get((name.decode() if isinstance(name, bytes) else name).rstrip(".").lower())

    tags = dkim_tags(data)
    assert tags, "the copy has no DKIM-Signature"
    logger = logging.getLogger("e2e.dkimpy")
    logger.setLevel(logging.DEBUG)
    for index, signature in enumerate(tags):
        collect = _Collect()
        logger.addHandler(collect)
        try:
            ok = dkim.DKIM(data, logger=logger).verify(idx=index, dnsfunc=lookup)
        except dkim.DKIMException as e:
            ok = False
            collect.lines.append(f"{type(e).__name__}: {e}")
        finally:
            logger.removeHandler(collect)
        raw = email.message_from_bytes(data, policy=email.policy.compat32).get_all("DKIM-Signature")[index]
        assert ok, (
            f"DKIM signature {index} (a={signature.get('a')}, s={signature.get('s')}) does not verify; "
            f"dkimpy says {collect.lines[-1:]}; the field ends {raw[-40:]!r}"
        )
    return tags
