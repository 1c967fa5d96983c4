"""The unsubscribe endpoint seen from outside: the real curl doing RFC 8058 one-click
POSTs as Gmail and Yahoo do, a link scanner fetching the page, forged and truncated
links, and what each does (or must not do) to the consent history and to the next
message. The links come from real copies relayed to the recording upstream."""

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import (
    ONE_CLICK,
    PURPOSES,
    WAIT,
    consent_history,
    delivered,
    fetch,
    metric,
    purpose_tables,
    purpose_verdict,
    subscribe_and_mail,
)

NEWS = PURPOSES["consent"]
# A second opt-in purpose, to show that a link only ever concerns its own purpose.
EVENTS = {"id": "events", "name": "Events", "description": "Invitations to our shows.", "basis": "consent"}


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    if not shutil.which("curl"):
        pytest.fail("curl is not installed (tests/run installs it)")
    return launch_shared(upstream.port, purpose=purpose_tables(EVENTS))


@dataclass
class Curl:
    status: int
    redirect_url: str
    headers: str
    body: str


def curl(*args: str) -> Curl:
    """Runs the real curl: `curl -s -o BODY -D HEADERS -w '%{http_code} %{redirect_url}' ARGS…`."""
    with tempfile.TemporaryDirectory() as folder:
        body, headers = Path(folder) / "body", Path(folder) / "headers"
        done = subprocess.run(
            ["curl", "-s", "-S", "--max-time", str(WAIT), "-o", str(body), "-D", str(headers)]
            + ["-w", "%{http_code} %{redirect_url}", *args],
            capture_output=True,
            text=True,
            timeout=WAIT + 5,
        )
        assert done.returncode == 0, f"curl {' '.join(args)}: {done.stderr}"
        status, _, redirect = done.stdout.partition(" ")
        return Curl(int(status), redirect.strip(), headers.read_text(), body.read_text())


def history(gate, rcpt: str) -> list[dict]:
    return consent_history(gate.cli_ok("consent", "show", rcpt))


@pytest.mark.parametrize("form", ["-d", "-F"], ids=["urlencoded", "multipart"])
def test_one_click_post_unsubscribes_from_that_purpose_only(gate, upstream, form):
    """A mail client's one-click POST (curl, urlencoded or multipart) gets 200 and no redirect; `consent show` proves it (one-click, IP, user agent); the next newsletter to that person is suppressed while another purpose and another subscriber still get theirs."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS, EVENTS["id"])
    other, _ = subscribe_and_mail(gate, upstream, NEWS)
    before = metric(gate, 'optgate_web_unsubscribes_total{method="one-click"}')

    answer = curl("-X", "POST", form, ONE_CLICK, urls[NEWS])

    assert answer.status == 200, answer
    assert answer.redirect_url == "" and not re.search(r"(?im)^location:", answer.headers), answer.headers
    assert re.search(r"(?im)^content-type: text/html", answer.headers), answer.headers
    assert "unsubscribed" in answer.body.lower(), answer.body
    shown = gate.cli_ok("consent", "show", rcpt)
    assert purpose_verdict(shown, NEWS) == "no: consent withdrawn"
    assert purpose_verdict(shown, EVENTS["id"]).startswith("yes")
    last = consent_history(shown)[-1]
    assert (last["action"], last["purpose"], last["source"]) == ("withdraw", NEWS, "one-click"), last
    assert last["evidence"]["ip"] == "127.0.0.1"
    assert last["evidence"]["user_agent"].startswith("curl/"), last
    assert metric(gate, 'optgate_web_unsubscribes_total{method="one-click"}') == before + 1

    assert delivered(gate, upstream, rcpt, NEWS) is False
    assert delivered(gate, upstream, rcpt, EVENTS["id"]) is True
    assert delivered(gate, upstream, other, NEWS) is True


def test_a_repeated_one_click_is_200_and_records_nothing_new(gate, upstream):
    """Mail providers resend one-click POSTs: the second one also gets 200, and the history keeps a single withdrawal."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS)

    first = curl("-X", "POST", "-d", ONE_CLICK, urls[NEWS])
    events = history(gate, rcpt)
    second = curl("-X", "POST", "-F", ONE_CLICK, urls[NEWS])

    assert (first.status, second.status) == (200, 200)
    assert history(gate, rcpt) == events
    assert [e["action"] for e in events] == ["grant", "withdraw"]


def test_a_post_without_the_one_click_body_changes_nothing(gate, upstream):
    """A POST whose body is empty or not `List-Unsubscribe=One-Click` gets 400 and the person stays subscribed."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS)
    events = history(gate, rcpt)

    for body in ("", "List-Unsubscribe=Yes", "unsubscribe=1"):
        answer = curl("-X", "POST", "-d", body, urls[NEWS])
        assert answer.status == 400, (body, answer)
        assert answer.redirect_url == ""

    assert history(gate, rcpt) == events
    assert delivered(gate, upstream, rcpt, NEWS) is True


def test_a_link_scanner_fetching_the_page_20_times_unsubscribes_nobody(gate, upstream):
    """A security scanner GETs (and HEADs) the link 20 times: each answer is the page with its button, and the person is still subscribed."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS)
    events = history(gate, rcpt)
    scanner = {"User-Agent": "Mozilla/5.0 (compatible; LinkScanner/1.0)"}

    for _ in range(20):
        page = fetch(urls[NEWS], headers=scanner)
        assert page.status == 200, page
        assert '<form method="post">' in page.text
    assert fetch(urls[NEWS], method="HEAD", headers=scanner).status == 200

    assert history(gate, rcpt) == events
    assert purpose_verdict(gate.cli_ok("consent", "show", rcpt), NEWS).startswith("yes")
    assert delivered(gate, upstream, rcpt, NEWS) is True


def test_the_page_names_the_purpose_in_the_readers_language(gate, upstream):
    """The GET page names the purpose, shows the address masked, offers an "Unsubscribe" button, loads nothing from outside, and speaks French to a French browser."""
    rcpt, urls = subscribe_and_mail(gate, upstream, EVENTS["id"])

    english = fetch(urls[EVENTS["id"]], headers={"Accept-Language": "en-GB,en;q=0.9"})
    french = fetch(urls[EVENTS["id"]], headers={"Accept-Language": "fr-FR,fr;q=0.9,en;q=0.5"})

    assert english.status == french.status == 200
    assert '<html lang="en">' in english.text and '<html lang="fr">' in french.text
    assert "Unsubscribe</button>" in english.text and "Se désinscrire</button>" in french.text
    for page in (english, french):
        assert EVENTS["name"] in page.text and EVENTS["description"] in page.text
        assert rcpt not in page.text and rcpt.split("@")[1] in page.text, "the address should show masked"
        assert not re.search(r"<(script|img|link|iframe)\b|src=", page.text), "the page loads something"
        assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "no-referrer"
        assert page.headers.get_content_type() == "text/html"

    answer = curl("-X", "POST", "-H", "Accept-Language: fr", "-d", ONE_CLICK, urls[EVENTS["id"]])
    assert answer.status == 200 and "désinscrit" in answer.body, answer.body


def forgeries(token: str) -> dict[str, str]:
    """Tokens a prober might try, from a real one."""
    middle = len(token) // 2
    swapped = "A" if token[middle] != "A" else "B"
    return {
        "one character changed": token[:middle] + swapped + token[middle + 1 :],
        "truncated": token[:-5],
        "one character short": token[:-1],
        "made up": "x" * len(token),
    }


def test_forged_and_truncated_links_get_404_and_are_counted(gate, upstream):
    """A link with one character changed, cut short or made up gets a plain 404 (GET and one-click POST) that names nobody, each attempt shows in /metrics, and the real link still works."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS)
    base, token = urls[NEWS].rsplit("/", 1)
    events = history(gate, rcpt)
    before = metric(gate, "optgate_web_invalid_tokens_total")

    attempts = 0
    for what, forged in forgeries(token).items():
        page = fetch(f"{base}/{forged}")
        posted = curl("-X", "POST", "-d", ONE_CLICK, f"{base}/{forged}")
        attempts += 2
        assert (page.status, posted.status) == (404, 404), what
        for body in (page.text, posted.body):
            assert rcpt not in body and rcpt.split("@")[1] not in body and "News" not in body, what

    assert metric(gate, "optgate_web_invalid_tokens_total") == before + attempts
    assert history(gate, rcpt) == events
    assert fetch(urls[NEWS]).status == 200
    assert delivered(gate, upstream, rcpt, NEWS) is True


def test_a_link_for_one_purpose_cannot_unsubscribe_from_another(gate, upstream):
    """Each copy's link names its own purpose: POSTing the Events link withdraws Events only; the newsletter still flows."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS, EVENTS["id"])
    assert urls[NEWS] != urls[EVENTS["id"]]

    assert curl("-X", "POST", "-d", ONE_CLICK, urls[EVENTS["id"]]).status == 200

    shown = gate.cli_ok("consent", "show", rcpt)
    assert purpose_verdict(shown, EVENTS["id"]) == "no: consent withdrawn"
    assert purpose_verdict(shown, NEWS).startswith("yes")
    assert delivered(gate, upstream, rcpt, EVENTS["id"]) is False
    assert delivered(gate, upstream, rcpt, NEWS) is True


def test_rate_limit_per_ip(launch, upstream):
    """With unsubscribe.rate_limit_per_minute = 5, the 6th request from one IP within the minute gets 429 with Retry-After, and /metrics counts it."""
    gate = launch(upstream.port, unsubscribe={"rate_limit_per_minute": 5})
    _, urls = subscribe_and_mail(gate, upstream, NEWS)

    statuses = [fetch(urls[NEWS]).status for _ in range(5)]
    limited = fetch(urls[NEWS])

    assert statuses == [200] * 5
    assert limited.status == 429, limited
    assert int(limited.headers["Retry-After"]) >= 1
    assert metric(gate, "optgate_web_rate_limited_total") == 1


def test_behind_a_trusted_proxy_the_forwarded_client_is_recorded_and_limited(gate, launch, upstream):
    """Behind a TLS-terminating proxy on the same host (http.trusted_proxies = ["127.0.0.1/32"]), a one-click POST carrying X-Forwarded-For records the client's address, not the proxy's, and the per-IP rate limit counts each client apart; without the setting, the same header is ignored."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS)
    spoofed = curl("-X", "POST", "-d", ONE_CLICK, "-H", "X-Forwarded-For: 198.51.100.7", urls[NEWS])
    assert spoofed.status == 200, spoofed
    assert history(gate, rcpt)[-1]["evidence"]["ip"] == "127.0.0.1", "no proxy is trusted by default"

    proxied = launch(upstream.port, http={"trusted_proxies": ["127.0.0.1/32"]}, unsubscribe={"rate_limit_per_minute": 3})
    rcpt, urls = subscribe_and_mail(proxied, upstream, NEWS)
    # What the client wrote itself, left of its real address, is not believed.
    answer = curl("-X", "POST", "-d", ONE_CLICK, "-H", "X-Forwarded-For: 6.6.6.6, 198.51.100.7", urls[NEWS])
    assert answer.status == 200, answer
    last = history(proxied, rcpt)[-1]
    assert (last["action"], last["source"], last["evidence"]["ip"]) == ("withdraw", "one-click", "198.51.100.7"), last

    def page(client: str) -> int:
        return fetch(urls[NEWS], headers={"X-Forwarded-For": client}).status

    # 198.51.100.7 has made one request of its three; another client has its own three.
    assert [page("198.51.100.7"), page("198.51.100.7"), page("198.51.100.7")] == [200, 200, 429]
    assert page("198.51.100.8") == 200
    assert fetch(urls[NEWS]).status == 200, "the proxy's own requests are another client's"
