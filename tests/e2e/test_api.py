"""The admin API of the real binary, route by route, over HTTP: bearer tokens (401),
field-named errors (400), and that what it records rules what mailers may send.
Also checks that openapi.yaml is a valid OpenAPI document naming every route."""

import http.client
import json
import urllib.parse
from pathlib import Path

import pytest

from helpers import PURPOSES, WAIT, HttpReply, consent_history, delivered, purpose_verdict, subscriber, unique

NEWS, OFFERS, B2B = PURPOSES["consent"], PURPOSES["soft_opt_in"], PURPOSES["legitimate_interest"]
TOKEN = "e2e-api-token-0123456789abcdef"
OTHER_TOKEN = "e2e-second-token-0123456789"
OPENAPI = Path(__file__).resolve().parents[2] / "openapi.yaml"
ROUTES = {
    ("get", "/api/v1/contacts/{email}"),
    ("delete", "/api/v1/contacts/{email}"),
    ("post", "/api/v1/contacts/{email}/consents"),
    ("put", "/api/v1/contacts/{email}/customer"),
    ("get", "/api/v1/events"),
    ("post", "/api/v1/consents/import"),
    ("post", "/subscribe"),
    ("get", "/confirm/{token}"),
    ("post", "/confirm/{token}"),
    ("get", "/p/{token}"),
    ("post", "/p/{token}"),
    ("get", "/metrics"),
}


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port, api={"tokens": [TOKEN, OTHER_TOKEN]})


def fetch(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> HttpReply:
    """helpers.fetch, keeping the query string (the event feed's cursor is one)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return HttpReply(response.status, response.headers, response.read().decode("utf-8", "replace"))
    finally:
        connection.close()


def call(gate, method: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
    """One API request; returns (status, parsed JSON or None, headers)."""
    headers = {"User-Agent": "e2e-crm/1.0"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    reply = fetch(f"{gate.http_url}{path}", method, data, headers)
    parsed = json.loads(reply.text) if reply.text and reply.headers.get_content_type() == "application/json" else None
    return reply.status, parsed, reply.headers


def contact_path(email: str, suffix: str = "") -> str:
    return f"/api/v1/contacts/{urllib.parse.quote(email)}{suffix}"


def purpose_state(contact: dict, purpose: str) -> dict:
    [state] = [p for p in contact["purposes"] if p["id"] == purpose]
    return state


def test_every_route_wants_a_valid_bearer_token(gate):
    address = "nobody@example.net"
    for method, path in [
        ("GET", contact_path(address)),
        ("POST", contact_path(address, "/consents")),
        ("PUT", contact_path(address, "/customer")),
        ("DELETE", contact_path(address)),
        ("GET", "/api/v1/events"),
        ("POST", "/api/v1/consents/import"),
        ("GET", "/api/v1/no-such-route"),
        ("GET", "/metrics"),
    ]:
        for token in (None, "wrong-token-0123456789abcdef", TOKEN[:-1], TOKEN + "x"):
            status, body, headers = call(gate, method, path, token=token)
            assert status == 401, (method, path, token, status)
            assert headers["WWW-Authenticate"] == 'Bearer realm="optgate"'
            assert body["field"] == "authorization", body
    # Another scheme is no bearer token.
    reply = fetch(f"{gate.http_url}/api/v1/events", headers={"Authorization": f"Basic {TOKEN}"})
    assert reply.status == 401
    # Either configured token works; so does /metrics with one.
    assert call(gate, "GET", "/api/v1/events", token=OTHER_TOKEN)[0] == 200
    status, _, headers = call(gate, "GET", "/metrics")
    assert status == 200 and headers.get_content_type() == "text/plain"
    assert "api request without a valid token" in gate.log_tail(200)
    assert TOKEN not in gate.log_path.read_text(), "tokens are never logged"


def test_grant_through_the_api_then_mail_flows_and_the_state_shows_it(gate, upstream):
    rcpt = f"{unique('api')}@example.net"
    status, contact, _ = call(gate, "GET", contact_path(rcpt))
    assert status == 200 and contact["known"] is False and contact["history"] == []
    assert purpose_state(contact, NEWS) | {"record": None} == {
        "id": NEWS,
        "name": "News",
        "basis": "consent",
        "public": False,
        "allowed": False,
        "reason": "suppressed: no consent",
        "record": None,
    }
    assert purpose_state(contact, B2B)["allowed"] is True
    assert delivered(gate, upstream, rcpt, NEWS) is False

    evidence = {"ip": "198.51.100.4", "user_agent": "Mozilla/5.0", "wording_version": "checkout-v7"}
    status, created, _ = call(
        gate,
        "POST",
        contact_path(rcpt, "/consents"),
        {"purpose": NEWS, "action": "grant", "source": "crm-checkout", "evidence": evidence, "at": "2026-01-05T10:00:00Z"},
    )
    assert status == 201, created
    assert created["purpose"] == NEWS and created["action"] == "grant" and created["source"] == "crm-checkout"
    event_id = created["id"]

    status, contact, _ = call(gate, "GET", contact_path(rcpt))
    assert contact["known"] is True
    news = purpose_state(contact, NEWS)
    assert news["allowed"] is True and news["record"] == event_id
    assert news["reason"] == f"allowed: consent (consent event {event_id})"
    [event] = contact["history"]
    assert event["id"] == event_id and event["source"] == "crm-checkout"
    assert event["evidence"]["wording_version"] == "checkout-v7"
    assert event["evidence"]["recorded_via"]["api"] == {"ip": "127.0.0.1", "user_agent": "e2e-crm/1.0"}

    assert delivered(gate, upstream, rcpt, NEWS) is True
    status, contact, _ = call(gate, "GET", contact_path(rcpt))
    decisions = [e for e in contact["events"] if e["kind"] == "decision"]
    assert [d["detail"] for d in decisions][-1].startswith("allowed: consent"), decisions

    # A withdrawal from everything (at = now); the CLI shows the same history.
    status, created, _ = call(gate, "POST", contact_path(rcpt, "/consents"), {"purpose": "*", "action": "withdraw"})
    assert status == 201 and created["purpose"] == "all"
    shown = gate.cli_ok("consent", "show", rcpt)
    assert purpose_verdict(shown, NEWS) == "no: consent withdrawn"
    assert [e["source"] for e in consent_history(shown)] == ["crm-checkout", "api"]
    assert delivered(gate, upstream, rcpt, B2B) is False


def test_bad_requests_get_400_naming_the_field(gate):
    rcpt = f"{unique('bad')}@example.net"
    consents = contact_path(rcpt, "/consents")
    for body, field in [
        ({"action": "grant"}, "purpose"),
        ({"purpose": "vip", "action": "grant"}, "purpose"),
        ({"purpose": "*", "action": "grant"}, "purpose"),
        ({"purpose": NEWS}, "action"),
        ({"purpose": NEWS, "action": "maybe"}, "action"),
        ({"purpose": NEWS, "action": "grant", "at": "last tuesday"}, "at"),
        ({"purpose": NEWS, "action": "grant", "at": "2999-01-01T00:00:00Z"}, "at"),
        ({"purpose": NEWS, "action": "grant", "evidence": "signed"}, "evidence"),
        ({"purpose": NEWS, "action": "grant", "source": ["x"]}, "source"),
        ([NEWS], "body"),
    ]:
        status, error, _ = call(gate, "POST", consents, body)
        assert status == 400, (body, status)
        assert error["field"] == field and error["error"], (body, error)
    status, error, _ = call(gate, "POST", consents, raw=b"{not json")
    assert (status, error["field"]) == (400, "body")
    status, error, _ = call(gate, "POST", contact_path("not-an-address", "/consents"), {"purpose": NEWS, "action": "grant"})
    assert (status, error["field"]) == (400, "email")
    assert call(gate, "GET", contact_path("not-an-address"))[1]["field"] == "email"
    for body in ({}, {"customer": "yes"}):
        status, error, _ = call(gate, "PUT", contact_path(rcpt, "/customer"), body)
        assert (status, error["field"]) == (400, "customer")
    for query, field in [("after=-1", "after"), ("limit=0", "limit"), ("limit=5000", "limit"), ("kind=spam", "kind"), ("since=1", "query")]:
        status, error, _ = call(gate, "GET", f"/api/v1/events?{query}")
        assert (status, error["field"]) == (400, field), query
    status, error, _ = call(gate, "POST", "/api/v1/consents/import", {"rows": []})
    assert (status, error["field"]) == (400, "body")
    status, error, _ = call(gate, "GET", "/api/v1/no-such-route")
    assert status == 404 and error["error"]
    assert call(gate, "GET", contact_path(rcpt))[1]["known"] is False, "nothing recorded"


def test_the_customer_flag_opens_soft_opt_in(gate, upstream):
    rcpt = f"{unique('customer')}@example.net"
    assert delivered(gate, upstream, rcpt, OFFERS) is False
    status, body, _ = call(gate, "PUT", contact_path(rcpt, "/customer"), {"customer": True})
    assert (status, body) == (200, {"email": rcpt, "customer": True})
    contact = call(gate, "GET", contact_path(rcpt))[1]
    assert contact["customer"] is True and purpose_state(contact, OFFERS)["allowed"] is True
    assert delivered(gate, upstream, rcpt, OFFERS) is True
    assert call(gate, "PUT", contact_path(rcpt, "/customer"), {"customer": False})[0] == 200
    assert delivered(gate, upstream, rcpt, OFFERS) is False


def test_the_event_feed_pages_by_cursor_and_filters_by_kind(gate, upstream):
    _, first, _ = call(gate, "GET", "/api/v1/events?limit=1000")
    cursor = first["next"]
    rcpt = subscriber(gate, NEWS)
    assert delivered(gate, upstream, rcpt, NEWS) is True
    call(gate, "POST", contact_path(rcpt, "/consents"), {"purpose": NEWS, "action": "withdraw"})

    _, page, _ = call(gate, "GET", f"/api/v1/events?after={cursor}")
    # Delivery results are recorded a moment after the relay: order only the rest.
    mine = [e for e in page["events"] if e["address"] == rcpt and e["kind"] in ("consent.granted", "decision", "consent.withdrawn")]
    assert [e["kind"] for e in mine] == ["consent.granted", "decision", "consent.withdrawn"], mine
    assert mine[1]["detail"].startswith("allowed: consent") and mine[1]["message_id"], mine[1]
    assert (mine[0]["origin"], mine[2]["origin"]) == ("cli", "api"), mine
    assert all(b["id"] > a["id"] for a, b in zip(page["events"], page["events"][1:])), "oldest first"
    assert page["next"] == page["events"][-1]["id"]

    _, one, _ = call(gate, "GET", f"/api/v1/events?after={cursor}&limit=1")
    assert len(one["events"]) == 1 and one["next"] == one["events"][0]["id"]
    _, filtered, _ = call(gate, "GET", f"/api/v1/events?after={cursor}&kind=consent.granted,consent.withdrawn")
    assert {e["kind"] for e in filtered["events"]} <= {"consent.granted", "consent.withdrawn"}
    assert [e["kind"] for e in filtered["events"] if e["address"] == rcpt] == ["consent.granted", "consent.withdrawn"]
    _, again, _ = call(gate, "GET", f"/api/v1/events?kind=decision&kind=consent.withdrawn&after={cursor}")
    assert {e["kind"] for e in again["events"]} <= {"decision", "consent.withdrawn"}
    _, empty, _ = call(gate, "GET", f"/api/v1/events?after={page['next'] + 1000000}")
    assert empty == {"events": [], "next": page["next"] + 1000000}


def test_bulk_import_writes_the_good_rows_and_names_the_bad(gate, upstream):
    good, other, bad_status = (f"{unique(p)}@example.net" for p in ("imp", "imp2", "imp3"))
    rows = [
        {"email": good, "purpose": NEWS, "status": "granted", "timestamp": "2025-03-01T09:00:00Z", "source": "old-crm", "evidence": {"ip": "203.0.113.9"}},
        {"email": "not-an-address", "purpose": NEWS, "status": "granted", "timestamp": "2025-03-01T09:00:00Z"},
        {"email": other, "purpose": "*", "status": "withdrawn", "timestamp": "2025-03-01T09:00:00Z", "evidence": "{\"letter\": \"2025-02-27\"}"},
        {"email": bad_status, "purpose": NEWS, "status": "yes", "timestamp": "2025-03-01T09:00:00Z"},
        {"email": good, "purpose": NEWS, "status": "granted", "timestamp": "tomorrow"},
        {"email": 12},
    ]
    status, result, _ = call(gate, "POST", "/api/v1/consents/import", rows)
    assert status == 200, result
    assert result["imported"] == 2
    rejected = {r["index"]: r for r in result["rejected"]}
    assert sorted(rejected) == [1, 3, 4, 5], result
    assert rejected[1]["field"] == "email" and rejected[1]["error"].startswith("email:")
    assert rejected[3]["field"] == "status" and rejected[4]["field"] == "timestamp"
    assert delivered(gate, upstream, good, NEWS) is True
    assert delivered(gate, upstream, other, B2B) is False
    history = consent_history(gate.cli_ok("consent", "show", good))
    assert (history[0]["source"], history[0]["evidence"]["ip"]) == ("old-crm", "203.0.113.9")
    assert call(gate, "GET", contact_path(bad_status))[1]["known"] is False
    assert call(gate, "POST", "/api/v1/consents/import", [])[1] == {"imported": 0, "rejected": []}


def test_forget_erases_and_the_person_stays_unmailable(gate, upstream):
    rcpt = subscriber(gate, NEWS)
    assert delivered(gate, upstream, rcpt, NEWS) is True
    status, body, _ = call(gate, "DELETE", contact_path(rcpt))
    assert (status, body) == (204, None)
    contact = call(gate, "GET", contact_path(rcpt))[1]
    assert contact["known"] is False and contact["erased"] is True
    assert contact["history"] == [] and contact["events"] == []
    assert not any(p["allowed"] for p in contact["purposes"])
    assert delivered(gate, upstream, rcpt, NEWS) is False
    assert delivered(gate, upstream, rcpt, B2B) is False
    status, error, _ = call(gate, "POST", contact_path(rcpt, "/consents"), {"purpose": NEWS, "action": "grant"})
    assert (status, error["field"]) == (409, "email")
    assert call(gate, "PUT", contact_path(rcpt, "/customer"), {"customer": True})[0] == 409
    _, result, _ = call(gate, "POST", "/api/v1/consents/import", [{"email": rcpt, "purpose": NEWS, "status": "granted", "timestamp": "2025-03-01T09:00:00Z"}])
    assert result["imported"] == 0 and result["rejected"][0]["index"] == 0
    assert call(gate, "DELETE", contact_path(rcpt))[0] == 204, "again: still 204"
    _, forgotten, _ = call(gate, "GET", "/api/v1/events?kind=contact.forgotten&limit=1000")
    assert forgotten["events"] and all(e["address"] == "" for e in forgotten["events"])
    erasure_lines = [line for line in gate.log_path.read_text().splitlines() if "forgotten" in line]
    assert erasure_lines and not any(rcpt in line for line in erasure_lines), erasure_lines


def test_openapi_yaml_is_valid_and_documents_every_route():
    import yaml
    from openapi_spec_validator import validate

    spec = yaml.safe_load(OPENAPI.read_text())
    assert spec["openapi"].startswith("3.")
    validate(spec)
    documented = {(method, path) for path, item in spec["paths"].items() for method in item if method != "parameters"}
    assert ROUTES <= documented, ROUTES - documented
    api = spec["paths"]["/api/v1/events"]["get"]
    assert {"200", "400", "401"} <= set(api["responses"])
