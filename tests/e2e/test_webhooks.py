"""Webhooks: every consent change (CLI grants and withdrawals, a one-click
unsubscribe, a hard bounce, an erasure) reaches a real HTTP receiver as signed JSON,
in order, each event acknowledged once, through a receiver that refuses, then is
gone, and an optgate restart in between: nothing lost, nothing resent once
acknowledged. optgate retries after 1 s, doubling, so the waits here are longer than
the suite's usual ones."""

import hashlib
import hmac
import http.server
import json
import re
import threading
import time
from dataclasses import dataclass, field

from helpers import (
    ONE_CLICK,
    PURPOSES,
    deliver,
    fetch,
    free_port,
    make_message,
    one_click_url,
    reply_counts,
    submit,
    subscriber,
    unique,
    wait_until,
)

SECRET = "whsec_e2e_0123456789abcdef"
NEWS, OFFERS, ORDERS = PURPOSES["consent"], PURPOSES["soft_opt_in"], PURPOSES["transactional"]
USER_UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
# A receiver that refused a few times is retried after up to 2^n s: allow for it.
WEBHOOK_WAIT = 60
# How long to watch for a request that must not come (polling is every second).
QUIET = 2.5


@dataclass
class Request:
    headers: dict
    body: bytes
    status: int  # what the receiver answered
    received_at: float = field(default_factory=time.time)

    @property
    def payload(self) -> dict:
        return json.loads(self.body)

    @property
    def acknowledged(self) -> bool:
        return 200 <= self.status < 300


class Receiver:
    """An HTTP server on 127.0.0.1:`port` that records every request and answers as
    `decide(payload)` says (a status code). It can be stopped and started again on the
    same port, so that optgate finds it refusing, then gone, then back."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/optgate"
        self.requests: list[Request] = []
        self.decide = lambda payload: 503
        self._lock = threading.Condition()
        self._server = None

    def start(self):
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    status = receiver.decide(json.loads(body))
                except ValueError:
                    status = 400
                with receiver._lock:
                    receiver.requests.append(Request(dict(self.headers), body, status))
                    receiver._lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self):
        """Closes the port: optgate's connections are refused until `start`."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def acknowledged(self) -> list[dict]:
        return [r.payload for r in self.snapshot() if r.acknowledged]

    def wait_for(self, check, what: str, timeout: float = WEBHOOK_WAIT):
        """Waits until `check(requests)` holds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not check(list(self.requests)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"waited {timeout}s for {what}; requests: {[(r.status, r.body) for r in self.requests]}"
                    )
                self._lock.wait(min(left, 0.5))


def accept_first(count: int):
    """A receiver's `decide` that acknowledges `count` distinct events, then answers 503."""
    acknowledged = set()

    def decide(payload):
        if payload["id"] in acknowledged or len(acknowledged) < count:
            acknowledged.add(payload["id"])
            return 204
        return 503

    return decide


def number(event_id: str) -> int:
    found = re.fullmatch(r"evt_(\d+)", event_id)
    assert found, f"event id {event_id!r} is not evt_<number>"
    return int(found[1])


def check_request(request: Request):
    """What every webhook request must be: signed with the secret (Stripe's scheme, a
    fresh timestamp), JSON, naming its event in a header, from optgate."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers.get("content-type") == "application/json", headers
    assert headers.get("user-agent", "").startswith("optgate/"), headers
    found = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", headers.get("optgate-signature", ""))
    assert found, f"Optgate-Signature: {headers.get('optgate-signature')!r}"
    timestamp, signature = found[1], found[2]
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, expected), f"bad signature on {request.body!r}"
    assert abs(int(timestamp) - request.received_at) < 60, (timestamp, request.received_at)
    payload = request.payload
    assert headers.get("optgate-event-id") == payload["id"], (headers, payload)
    number(payload["id"])
    assert set(payload) == {"id", "type", "created_at", "data"}, payload
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", payload["created_at"]), payload


def summary(payload: dict) -> tuple:
    """(type, email, purpose); a suppression's purpose (that of the bounced message, if
    any) is left out, as it is not the point here."""
    data = payload["data"]
    purpose = None if payload["type"] == "suppression.added" else data.get("purpose")
    return (payload["type"], data.get("email"), purpose)


def check_acknowledged_once_in_order(requests: list[Request]):
    """Events go one at a time, in id order: the ids of successive requests never go
    down; each id is retried until acknowledged, then never sent again."""
    ids = [number(r.payload["id"]) for r in requests]
    assert ids == sorted(ids), f"events out of order: {ids}"
    by_id: dict[int, list[int]] = {}
    for r in requests:
        by_id.setdefault(number(r.payload["id"]), []).append(r.status)
    for event, statuses in by_id.items():
        assert [200 <= s < 300 for s in statuses] == [False] * (len(statuses) - 1) + [True], (
            f"evt_{event}: answers {statuses} (sent again after its acknowledgement, or never acknowledged)"
        )


def test_every_consent_change_arrives_once_signed_and_in_order(launch, upstream):
    """While the receiver answers 503, optgate records CLI grants and a withdrawal, a
    one-click unsubscribe and a hard bounce, and keeps retrying the first event. Then
    the receiver takes three events and refuses again; optgate is stopped (promptly,
    though it is waiting to retry), a grant is made with the CLI meanwhile, and it
    starts again while the receiver is gone (connection refused). When the receiver
    is back, every change has arrived, in order, each acknowledged exactly once; every
    signature verifies; the log never shows the secret."""
    receiver = Receiver()
    receiver.start()
    gate = launch(upstream.port, webhook=[{"url": receiver.url, "secret": SECRET}])
    try:
        token = unique("hook")
        ann, bob, cid, bad = (f"{name}.{token}@example.net" for name in ("ann", "bob", "cid", "bad"))
        expected = []

        # -- the receiver refuses: everything waits in the outbox
        gate.cli_ok("consent", "grant", ann, NEWS)
        expected.append(("consent.granted", ann, NEWS))
        receiver.wait_for(lambda rs: len(rs) >= 1, "the first attempt", timeout=10)
        gate.cli_ok("consent", "grant", bob, NEWS)
        gate.cli_ok("consent", "grant", bob, OFFERS)
        gate.cli_ok("consent", "withdraw", ann, NEWS)
        expected += [("consent.granted", bob, NEWS), ("consent.granted", bob, OFFERS), ("consent.withdrawn", ann, NEWS)]

        reader = subscriber(gate, NEWS, prefix=f"reader.{token}")
        expected.append(("consent.granted", reader, NEWS))
        copy = deliver(gate, upstream, reader, make_message(f"{token}-news", purpose=NEWS))
        clicked = fetch(
            one_click_url(copy, gate),
            "POST",
            ONE_CLICK.encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert clicked.status == 200, clicked
        expected.append(("consent.withdrawn", reader, NEWS))

        upstream.refuse(bad, USER_UNKNOWN.format(bad))
        reply = submit(gate.smtp_port, [bad], make_message(f"{token}-bounce", purpose=ORDERS))
        assert reply.code == 250 and reply_counts(reply.text) == (1, 0), reply
        gate.cli_until(lambda out: "hard bounce" in out, "consent", "show", bad)
        expected.append(("suppression.added", bad, None))

        receiver.wait_for(lambda rs: len(rs) >= 2, "a retry of the refused event")
        first = {r.payload["id"] for r in receiver.snapshot()}
        assert len(first) == 1, f"optgate moved past an unacknowledged event: {first}"

        # -- three acknowledged, then refused again; optgate stopped while it waits to retry
        receiver.decide = accept_first(3)
        receiver.wait_for(
            lambda rs: sum(r.acknowledged for r in rs) >= 3 and not rs[-1].acknowledged,
            "three acknowledgements and a refusal",
        )
        stopping = time.monotonic()
        gate.stop()
        assert time.monotonic() - stopping < 10, "stop waited for the retry"
        acknowledged_before = [summary(p) for p in receiver.acknowledged()]
        assert acknowledged_before == expected[:3], acknowledged_before

        # -- a change while optgate is down, then optgate back while the receiver is gone
        receiver.stop()
        gate.cli_ok("consent", "grant", cid, NEWS)
        expected.append(("consent.granted", cid, NEWS))
        log_before = len(gate.log_path.read_text())
        gate.start()
        wait_until(
            lambda: "webhook not acknowledged" in gate.log_path.read_text()[log_before:],
            "a failed attempt while the receiver is gone",
            timeout=10,
        )
        receiver.decide = lambda payload: 200
        receiver.start()

        receiver.wait_for(lambda rs: sum(r.acknowledged for r in rs) >= len(expected), "every event acknowledged")
        time.sleep(QUIET)
        requests = receiver.snapshot()
        for request in requests:
            check_request(request)
        check_acknowledged_once_in_order(requests)
        acknowledged = [r.payload for r in requests if r.acknowledged]
        assert [summary(p) for p in acknowledged] == expected
        assert len({p["id"] for p in acknowledged}) == len(expected)

        by_summary = {summary(p): p for p in acknowledged}
        assert by_summary[("consent.granted", ann, NEWS)]["data"]["source"] == "cli"
        assert by_summary[("consent.withdrawn", reader, NEWS)]["data"]["source"] == "one-click"
        assert by_summary[("suppression.added", bad, None)]["data"]["detail"]

        log = gate.log_path.read_text()
        assert receiver.url in log and "503" in log, "the failures are not logged with the URL and status"
        assert SECRET not in log
    finally:
        receiver.stop()


def test_erasure_is_announced_without_the_address(launch, upstream):
    """`contact forget` sends `contact.forgotten`, which does not carry the address;
    the person's earlier events not yet sent are erased with them and never sent."""
    receiver = Receiver()
    receiver.decide = lambda payload: 200
    receiver.start()
    gate = launch(upstream.port, webhook=[{"url": receiver.url, "secret": SECRET}])
    try:
        token = unique("forget")
        kept, gone = f"kept.{token}@example.net", f"gone.{token}@example.net"
        gate.cli_ok("consent", "grant", kept, NEWS)
        receiver.wait_for(lambda rs: any(r.acknowledged for r in rs), "the first event")

        receiver.stop()
        gate.cli_ok("consent", "grant", gone, NEWS)
        gate.cli_ok("contact", "forget", gone)
        receiver.start()

        receiver.wait_for(
            lambda rs: any(r.acknowledged and r.payload["type"] == "contact.forgotten" for r in rs),
            "contact.forgotten",
        )
        time.sleep(QUIET)
        requests = receiver.snapshot()
        for request in requests:
            check_request(request)
            assert gone.encode() not in request.body, request.body
        check_acknowledged_once_in_order(requests)
        assert [summary(r.payload) for r in requests if r.acknowledged] == [
            ("consent.granted", kept, NEWS),
            ("contact.forgotten", None, None),
        ]
    finally:
        receiver.stop()


def test_a_url_started_now_gets_only_later_changes(launch, upstream):
    """Two receivers are added to a gateway that already holds consent changes: the
    one with `start = "now"` gets only the changes made after that, also across a
    restart with a change made while optgate was down; the default one gets the
    history first."""
    history, fresh = Receiver(), Receiver()
    for receiver in (history, fresh):
        receiver.decide = lambda payload: 200
        receiver.start()
    gate = launch(upstream.port)
    try:
        token = unique("start")
        old, new, later = (f"{name}.{token}@example.net" for name in ("old", "new", "later"))
        gate.cli_ok("consent", "grant", old, NEWS)
        gate.cli_ok("consent", "withdraw", old, NEWS)
        gate.stop()
        gate.config["webhook"] = [
            {"url": history.url, "secret": SECRET},
            {"url": fresh.url, "secret": SECRET, "start": "now"},
        ]
        log_before = len(gate.log_path.read_text())
        gate.start()
        wait_until(
            lambda: any(
                "webhook worker started" in line and fresh.url in line
                for line in gate.log_path.read_text()[log_before:].splitlines()
            ),
            "the start=now worker in its place",
            timeout=10,
        )
        gate.cli_ok("consent", "grant", new, NEWS)
        fresh.wait_for(lambda rs: any(r.acknowledged for r in rs), "the change made after")
        gate.stop()
        gate.cli_ok("consent", "grant", later, OFFERS)
        gate.start()
        fresh.wait_for(lambda rs: sum(r.acknowledged for r in rs) >= 2, "the change made while down")
        history.wait_for(lambda rs: sum(r.acknowledged for r in rs) >= 4, "every change")
        time.sleep(QUIET)
        for receiver in (history, fresh):
            for request in receiver.snapshot():
                check_request(request)
            check_acknowledged_once_in_order(receiver.snapshot())
        assert [summary(p) for p in fresh.acknowledged()] == [
            ("consent.granted", new, NEWS),
            ("consent.granted", later, OFFERS),
        ]
        assert [summary(p) for p in history.acknowledged()] == [
            ("consent.granted", old, NEWS),
            ("consent.withdrawn", old, NEWS),
            ("consent.granted", new, NEWS),
            ("consent.granted", later, OFFERS),
        ]
    finally:
        history.stop()
        fresh.stop()
