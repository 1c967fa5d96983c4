"""Consent people manage themselves, end to end through the real binary: the
preference centre in headless Chromium (its link taken from a relayed copy), and
double opt-in from the sign-up POST through the confirmation mail at the upstream
to the confirmation in Chromium, with the proof `optgate consent show` then holds."""

import json
import re
import time

import pytest
from selenium.webdriver.common.by import By

from helpers import (
    PURPOSES,
    assert_wire_format,
    consent_history,
    deliver,
    delivered,
    fetch,
    make_message,
    purpose_verdict,
    subscriber,
    text_parts,
    unique,
)

# The Chromium fixture and page helpers of the unsubscribe-page tests.
from test_browser import browser, heading, press, screenshot  # noqa: F401

NEWS, OFFERS, B2B, ORDERS = (PURPOSES[b] for b in ("consent", "soft_opt_in", "legitimate_interest", "transactional"))
# A preference link optgate wrote into a copy; group 1 is the token.
PREFERENCES_LINK = re.compile(r"https?://[^\s<>\"'/]+/p/([A-Za-z0-9_-]+)")
CONFIRM_LINK = re.compile(r"https?://[^\s<>\"'/]+/confirm/([A-Za-z0-9_-]+)")


def consent_config(**double_opt_in) -> dict:
    """Overrides for a gateway whose opt-in/opt-out purposes are public, with double opt-in."""
    return {
        "purpose": [
            {"id": NEWS, "name": "News", "description": "Our monthly news.", "basis": "consent", "public": True},
            {"id": OFFERS, "name": "Offers", "description": "For customers.", "basis": "soft_opt_in", "public": True},
            {"id": B2B, "name": "Actualités pro", "description": "Pour votre métier.", "basis": "legitimate_interest", "public": True, "locale": "fr"},
            {"id": ORDERS, "name": "Orders", "basis": "transactional"},
        ],
        "double_opt_in": {
            "link_validity": "1h",
            "from": "News <news@example.com>",
            "sender": "bounces@example.com",
            "max_per_address_per_day": 2,
            "max_per_ip_per_hour": 1000,
            **double_opt_in,
        },
    }


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port, **consent_config())


def copy_text(copy) -> str:
    """The decoded text of every readable part of a relayed copy."""
    return "\n".join(part.get_content() for part in text_parts(copy.parsed()))


def checkbox(driver, purpose: str):
    return driver.find_element(By.CSS_SELECTOR, f"input[type=checkbox][value='{purpose}']")


def post_form(url: str, fields: str, lang: str = "en"):
    return fetch(
        url,
        "POST",
        fields.encode(),
        {"Content-Type": "application/x-www-form-urlencoded", "Accept-Language": lang, "User-Agent": "e2e-form/1.0"},
    )


def subscribe(gate, body: dict, content_type: str = "application/json"):
    data = json.dumps(body).encode() if content_type == "application/json" else body.encode()
    return fetch(
        f"{gate.http_url}/subscribe",
        "POST",
        data,
        {"Content-Type": content_type, "User-Agent": "signup-backend/2.1", "Origin": "https://shop.example.com"},
    )


def confirmation_mails(upstream, rcpt: str, count: int):
    mails = [m for m in upstream.wait_for(rcpt=rcpt, count=count) if CONFIRM_LINK.search(copy_text(m))]
    assert len(mails) == count, f"{len(mails)} confirmation mails for {rcpt}"
    return mails


# ---- the preference centre ------------------------------------------------------------


def test_untick_one_purpose_in_chromium_and_only_its_mail_stops(gate, upstream, browser):  # noqa: F811
    """The copy's %%preferences_url%% opens the preference centre in Chromium with News
    and Actualités pro ticked and Offers (soft opt-in, not a customer) locked; unticking
    News and saving shows "saved", records the withdrawal with its proof, and the next
    News message is suppressed while Actualités pro still flows."""
    rcpt = subscriber(gate, NEWS)
    body = "Hello.\r\nYour preferences: %%preferences_url%%\r\n"
    copy = deliver(gate, upstream, rcpt, make_message(unique("news"), purpose=NEWS, body=body))
    text = copy_text(copy)
    found = PREFERENCES_LINK.search(text)
    assert found, f"no preference link in the copy:\n{text}"
    assert "%%preferences_url%%" not in text
    url = found[0]
    assert url.startswith(f"{gate.http_url}/p/"), url

    driver = browser("en")
    driver.get(url)
    assert heading(driver) == "Your email preferences"
    assert checkbox(driver, NEWS).is_selected() and checkbox(driver, B2B).is_selected()
    assert not checkbox(driver, OFFERS).is_selected() and not checkbox(driver, OFFERS).is_enabled()
    assert driver.find_elements(By.CSS_SELECTOR, f"input[value='{ORDERS}']") == [], "transactional is not listed"
    assert driver.execute_script("return document.scripts.length") == 0
    screenshot(driver, "preferences-en.png")

    checkbox(driver, NEWS).click()
    press(driver, "Save my choices", "Your email preferences")
    assert "Your choices are saved." in driver.find_element(By.CSS_SELECTOR, "[role=status]").text
    assert not checkbox(driver, NEWS).is_selected() and checkbox(driver, B2B).is_selected()
    screenshot(driver, "preferences-saved-en.png")
    driver.get(url)
    assert not checkbox(driver, NEWS).is_selected(), "the saved state, read back"

    shown = gate.cli_ok("consent", "show", rcpt)
    assert purpose_verdict(shown, NEWS) == "no: consent withdrawn"
    assert purpose_verdict(shown, B2B) == "yes"
    last = consent_history(shown)[-1]
    assert (last["action"], last["purpose"], last["source"]) == ("withdraw", NEWS, "preference-centre")
    evidence = last["evidence"]
    assert evidence["ip"] == "127.0.0.1" and "Chrome" in evidence["user_agent"], evidence
    assert evidence["lang"] == "en" and evidence["wording_version"] == "preference-centre/1", evidence

    assert delivered(gate, upstream, rcpt, NEWS) is False
    assert delivered(gate, upstream, rcpt, B2B) is True


def test_unsubscribe_from_everything_stops_all_marketing_but_not_orders(gate, upstream):
    """One button: a withdrawal for "all"; every marketing purpose stops at once (for
    every mailer), order mail still flows, and pressing it again records nothing."""
    rcpt = subscriber(gate, NEWS)
    gate.cli_ok("contact", "set", rcpt, "--customer", "true")
    copy = deliver(gate, upstream, rcpt, make_message(unique("news"), purpose=NEWS))
    url = PREFERENCES_LINK.search(copy_text(copy))[0]

    page = fetch(url)
    assert page.status == 200 and "Unsubscribe from everything" in page.text
    done = post_form(url, "action=unsubscribe_all")
    assert done.status == 200 and "You are unsubscribed from everything" in done.text
    assert post_form(url, "action=unsubscribe_all").status == 200
    history = consent_history(gate.cli_ok("consent", "show", rcpt))
    withdrawals = [e for e in history if e["action"] == "withdraw"]
    assert [(e["purpose"], e["source"]) for e in withdrawals] == [("all", "preference-centre")], history

    for purpose in (NEWS, OFFERS, B2B):
        assert delivered(gate, upstream, rcpt, purpose) is False, purpose
    assert delivered(gate, upstream, rcpt, ORDERS) is True


def test_the_preference_centre_speaks_french_and_refuses_bad_links(gate, upstream):
    rcpt = subscriber(gate, NEWS)
    copy = deliver(gate, upstream, rcpt, make_message(unique("news"), purpose=NEWS))
    url = PREFERENCES_LINK.search(copy_text(copy))[0]
    french = fetch(url, headers={"Accept-Language": "fr-FR,fr;q=0.9"})
    assert french.status == 200 and "Vos préférences de courriels" in french.text
    assert french.headers["Cache-Control"] == "no-store"
    # An unsubscribe link's token is not a preference token, and a forged one is nothing.
    unsubscribe_token = re.search(r"/u/([A-Za-z0-9_-]+)", copy.parsed()["List-Unsubscribe"])[1]
    for token in (unsubscribe_token, "forged"):
        assert fetch(f"{gate.http_url}/p/{token}").status == 404
        assert post_form(f"{gate.http_url}/p/{token}", "action=unsubscribe_all").status == 404
    assert post_form(url, "action=nothing").status == 400
    assert purpose_verdict(gate.cli_ok("consent", "show", rcpt), NEWS).startswith("yes")


# ---- double opt-in ----------------------------------------------------------------------


def test_double_opt_in_from_sign_up_to_confirmation_in_chromium(gate, upstream, browser):  # noqa: F811
    """POST /subscribe → a signed confirmation mail at the upstream (not a marketing copy)
    → its link in Chromium → "Confirm" → the grant, with the sign-up's and the
    confirmation's evidence; before that, News mail to the address is suppressed."""
    rcpt = f"{unique('signup')}@example.net"
    reply = subscribe(gate, {"email": rcpt, "purposes": [NEWS], "source": "footer-form", "wording_version": "footer-v3"})
    assert reply.status == 202, reply
    assert json.loads(reply.text) == {"status": "pending"}

    [mail] = confirmation_mails(upstream, rcpt, 1)
    assert mail.mail_from == "bounces@example.com"
    assert mail.rcpt_tos == [rcpt]
    assert_wire_format(mail.data)
    message = mail.parsed()
    assert message["From"] == "News <news@example.com>" and message["To"] == rcpt
    assert message["Message-ID"] and message["Date"] and message["DKIM-Signature"]
    assert message.get_content_type() == "multipart/alternative"
    assert message["List-Unsubscribe"] is None, "a confirmation is not marketing"
    text = copy_text(mail)
    assert "News" in text and "Our monthly news." in text
    link = CONFIRM_LINK.search(text)
    assert link and link[0].startswith(f"{gate.http_url}/confirm/"), text

    assert purpose_verdict(gate.cli_ok("consent", "show", rcpt), NEWS) == "no: no consent"
    assert delivered(gate, upstream, rcpt, NEWS) is False, "an unconfirmed sign-up allows nothing"

    driver = browser("en")
    driver.get(link[0])
    assert heading(driver) == "Confirm your subscription"
    assert "News" in driver.find_element(By.TAG_NAME, "main").text
    assert purpose_verdict(gate.cli_ok("consent", "show", rcpt), NEWS) == "no: no consent", "GET confirms nothing"
    screenshot(driver, "confirm-en.png")
    press(driver, "Confirm", "Subscription confirmed")
    screenshot(driver, "confirmed-en.png")

    shown = gate.cli_ok("consent", "show", rcpt)
    assert purpose_verdict(shown, NEWS).startswith("yes (consent event")
    [grant] = [e for e in consent_history(shown) if e["action"] == "grant"]
    assert (grant["purpose"], grant["source"]) == (NEWS, "footer-form")
    evidence = grant["evidence"]
    assert evidence["wording_version"] == "footer-v3"
    signup, confirmation = evidence["signup"], evidence["confirmation"]
    assert signup["ip"] == "127.0.0.1" and signup["user_agent"] == "signup-backend/2.1", signup
    assert signup["origin"] == "https://shop.example.com" and signup["at"], signup
    assert confirmation["ip"] == "127.0.0.1" and "Chrome" in confirmation["user_agent"], confirmation
    assert confirmation["at"] >= signup["at"] and confirmation["wording_version"], confirmation

    assert delivered(gate, upstream, rcpt, NEWS) is True
    # The link again: a clear page, nothing new.
    driver.get(link[0])
    assert heading(driver) == "Already confirmed"
    assert len([e for e in consent_history(gate.cli_ok("consent", "show", rcpt)) if e["action"] == "grant"]) == 1


def test_a_form_sign_up_in_french_and_the_per_address_limit(gate, upstream):
    """A form POST gets a page and the mail, both in the purpose's language (French); a
    third sign-up in a day gets the same answer but no mail, and a log line."""
    rcpt = f"{unique('form')}@example.net"
    fields = f"email={rcpt.replace('@', '%40')}&purposes={B2B}&wording_version=v1"
    first = subscribe(gate, fields, "application/x-www-form-urlencoded")
    assert first.status == 200 and "Consultez votre messagerie" in first.text, first
    for _ in range(2):
        again = subscribe(gate, {"email": rcpt, "purposes": f"{B2B},{NEWS}"})
        assert again.status == 202 and json.loads(again.text) == {"status": "pending"}
    mails = confirmation_mails(upstream, rcpt, 2)
    time.sleep(0.5)
    assert len(confirmation_mails(upstream, rcpt, 2)) == 2, "the third sign-up sent nothing"
    assert "over the per-address daily limit" in gate.log_tail(200)
    assert all(m.mail_from == "bounces@example.com" for m in mails)
    assert mails[0].parsed()["Subject"] == "Merci de confirmer votre inscription"
    assert "Actualités pro" in copy_text(mails[0])


def test_bad_sign_ups_are_refused_naming_the_field(gate, upstream):
    for body, field in [
        ({"email": "nope", "purposes": [NEWS]}, "email"),
        ({"email": "a@example.net", "purposes": ["vip"]}, "purposes"),
        ({"email": "a@example.net", "purposes": [ORDERS]}, "purposes"),
        ({"email": "a@example.net"}, "purposes"),
    ]:
        reply = subscribe(gate, body)
        assert reply.status == 400, (body, reply)
        assert json.loads(reply.text)["field"] == field, reply.text
    reply = subscribe(gate, "email=a%40example.net&purposes=vip", "application/x-www-form-urlencoded")
    assert reply.status == 400 and "vip" in reply.text and "Sign-up not accepted" in reply.text
    assert fetch(f"{gate.http_url}/confirm/forged").status == 404


def test_an_expired_confirmation_link_gets_a_clear_page(launch, upstream):
    gate = launch(upstream.port, **consent_config(link_validity="1s"))
    rcpt = f"{unique('late')}@example.net"
    assert subscribe(gate, {"email": rcpt, "purposes": [NEWS]}).status == 202
    [mail] = confirmation_mails(upstream, rcpt, 1)
    link = CONFIRM_LINK.search(copy_text(mail))[0]
    time.sleep(2.1)
    page = fetch(link)
    assert page.status == 410 and "Link expired" in page.text
    assert post_form(link, "action=confirm").status == 410
    assert purpose_verdict(gate.cli_ok("consent", "show", rcpt), NEWS) == "no: no consent"
