"""The copy each recipient gets, read back by an independent parser (Python's `email`,
policy.default) part by part: the List-Unsubscribe fields, the link in the body (at
the mailer's placeholder, else in a footer), MIME kept valid, attachments and signed
bodies untouched, transactional mail left alone. Every copy must also pass DKIM
(dkimpy) with the key `serve` generated for example.com, since none is configured."""

import base64
import email
import email.policy
import html
import os
import re
from pathlib import Path

import pytest

from helpers import (
    PURPOSES,
    UNSUBSCRIBE_LINK,
    assert_wire_format,
    deliver,
    dkim_verify,
    generated_dkim_record,
    make_message,
    one_click_url,
    purpose_tables,
    subscriber,
    text_parts,
    unique,
)

# `../shared` beside the checkout, as the Rust tests and the benchmark read it.
NEWSLETTER = Path(__file__).resolve().parents[3] / "shared/fixtures/newsletter.eml"
PLACEHOLDER = "%%unsubscribe_url%%"

# A French purpose (default French footer) and one with its own footer templates.
LETTRE = {"id": "lettre", "name": "La lettre d'Élégance", "basis": "consent", "locale": "fr"}
PROMO = {
    "id": "promo",
    "name": "Promo",
    "basis": "consent",
    "footer_text": "No more promos? {unsubscribe_url}",
    "footer_html": '<p class="bye">No more promos? <a href="{unsubscribe_url}">Stop them</a></p>',
}
ENGLISH_FOOTER = 'You are receiving "News" from us.'
FRENCH_UNSUBSCRIBE = "Se désinscrire en un clic"


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port, purpose=purpose_tables(LETTRE, PROMO))


def crlf(text: str) -> bytes:
    """A message written with \\n in this file, as it goes on the wire (CRLF, UTF-8)."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def headers(subject: str, purpose: str, content_type: str, *extra: str) -> str:
    """The top of a test message."""
    return "\n".join(
        [
            "From: Shop <shop@example.com>",
            "To: Reader <reader@example.net>",
            f"Subject: {subject}",
            f"Message-ID: <{subject}@example.com>",
            "Date: Mon, 02 Mar 2026 10:00:00 +0000",
            "MIME-Version: 1.0",
            f"X-Optgate-Purpose: {purpose}",
            f"Content-Type: {content_type}",
            *extra,
        ]
    ) + "\n\n"


def check_copy(gate, copy, sent: bytes, may_change: tuple[str, ...] = ()):
    """What every marketing copy must be: well-formed on the wire, the one-click
    fields, every other header field of the mailer kept as it was (but `may_change`),
    a DKIM signature that verifies. Returns the parsed copy and its unsubscribe URL."""
    assert_wire_format(copy.data)
    url = one_click_url(copy, gate)
    assert_headers_kept(sent, copy.data, may_change)
    tags = dkim_verify(copy.data, dict([generated_dkim_record(gate, "example.com")]))
    assert [t["d"] for t in tags] == ["example.com"]
    return copy.parsed(), url


def raw_fields(data: bytes) -> list[bytes]:
    """The header fields of a message as written (folded lines kept together)."""
    header = data.split(b"\r\n\r\n", 1)[0]
    return re.findall(rb"[^\r\n]+(?:\r\n[ \t][^\r\n]*)*", header)


def assert_headers_kept(sent: bytes, relayed: bytes, may_change: tuple[str, ...] = ()):
    """Every field the mailer set, but List-Unsubscribe*, X-Optgate-* and `may_change`, is in the copy byte for byte."""
    kept = raw_fields(relayed)
    for field in raw_fields(sent):
        name = field.split(b":", 1)[0].strip().lower().decode()
        if name.startswith(("list-unsubscribe", "x-optgate-")) or name in may_change:
            continue
        assert field in kept, f"header field changed or lost: {field!r}"


def text(part) -> str:
    """A text part's decoded content, line ends as \\n (the parser keeps CRLF of unencoded parts)."""
    return part.get_content().replace("\r\n", "\n")


def links(content: str) -> list[str]:
    """The tokens of the unsubscribe links in a text."""
    return UNSUBSCRIBE_LINK.findall(content)


def email_parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def token(url: str) -> str:
    return url.rsplit("/", 1)[1]


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def encoded_lines(part) -> list[str]:
    """The lines of a part's body as encoded in the message."""
    return part.get_payload(decode=False).splitlines()


def footed(original: str, new: str) -> str:
    """The footer added after the end of a text/plain part (the original must be kept before it)."""
    assert new.startswith(original), f"the original text is not kept at the start:\n{new[:400]!r}"
    return new[len(original):]


def footed_html(original: str, new: str) -> str:
    """The footer added before an HTML part's last </body> (all else must be kept around it)."""
    before, after = original.rsplit("</body>", 1)
    assert new.startswith(before), "the HTML before </body> changed"
    assert new.endswith("</body>" + after), f"the HTML from </body> on changed: {new[-200:]!r}"
    return new[len(before) : len(new) - len("</body>" + after)]


# ---- the messages ----------------------------------------------------------------------


def test_plain_text_gets_headers_and_a_footer_link(gate, upstream):
    """A plain-text newsletter arrives with one List-Unsubscribe, one List-Unsubscribe-Post, and the text followed by a footer with the link."""
    rcpt = subscriber(gate)
    sent = make_message(unique("plain"), purpose=PURPOSES["consent"], body="Hello from the shop.\r\nSee you soon.\r\n")

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    footer = footed("Hello from the shop.\nSee you soon.\n", text(message))
    assert ENGLISH_FOOTER in footer
    assert links(footer) == [token(url)]
    assert url in footer


def test_french_quoted_printable_newsletter(gate, upstream):
    """The real French newsletter (multipart/alternative, QP, the mailer's own List-Unsubscribe): the mailer's List-Unsubscribe is replaced, each part keeps its accented text, stays QP with short lines, and ends with a French footer holding the link once."""
    rcpt = subscriber(gate, LETTRE["id"])
    sent = NEWSLETTER.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    sent = sent.replace(b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nX-Optgate-Purpose: lettre\r\n", 1)
    original = email_parse(sent)
    assert "8f14e45f" in original["List-Unsubscribe"]  # the mailer's own, to be replaced

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    assert "8f14e45f" not in str(message["List-Unsubscribe"]) and "mailto:" not in str(message["List-Unsubscribe"])
    assert message["Subject"] == original["Subject"] and "Rentrée" in message["Subject"]
    assert message.get_content_type() == "multipart/alternative"
    old_plain, old_html = text_parts(original)
    new_plain, new_html = text_parts(message)
    for part in (new_plain, new_html):
        assert part["Content-Transfer-Encoding"].lower() == "quoted-printable"
        assert part.get_content_charset() == "utf-8"
        longest = max(len(line) for line in encoded_lines(part))
        assert longest <= 76, f"a quoted-printable line of {longest} characters in {part.get_content_type()}"

    plain_footer = footed(text(old_plain), text(new_plain))
    assert "Élégance" in text(new_plain) and "LA LETTRE DE LA BOUTIQUE ÉLÉGANCE" in text(new_plain)
    assert FRENCH_UNSUBSCRIBE in plain_footer and "La lettre d'Élégance" in plain_footer
    assert links(text(new_plain)) == [token(url)] and url in plain_footer

    html_footer = footed_html(text(old_html), text(new_html))
    assert links(text(new_html)) == [token(url)] and f'href="{url}"' in html_footer
    assert FRENCH_UNSUBSCRIBE in html.unescape(html_footer)


def test_base64_html(gate, upstream):
    """A base64 HTML message stays base64 (lines of 76), decodes to the same HTML with the footer link just before </body>."""
    rcpt = subscriber(gate)
    page = "<!doctype html>\n<html><body>\n<h1>Bonjour Amélie</h1>\n<p>Nos nouveautés d'été : -20 %.</p>\n</body></html>\n"
    encoded = base64.encodebytes(page.encode()).decode()
    subject = unique("b64html")
    sent = crlf(headers(subject, "news", 'text/html; charset="utf-8"', "Content-Transfer-Encoding: base64") + encoded)

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    assert message.get_content_type() == "text/html"
    assert message["Content-Transfer-Encoding"].lower() == "base64"
    lines = encoded_lines(message)
    assert all(len(line) <= 76 for line in lines), max(map(len, lines))
    footer = footed_html(page, text(message))
    assert links(text(message)) == [token(url)] and f'href="{url}"' in footer


def test_mixed_with_a_pdf_attachment(gate, upstream):
    """A message with a PDF (and a .txt) attachment: the text gets the footer link, both attachments arrive byte for byte, the PDF decodes to the same bytes."""
    rcpt = subscriber(gate)
    pdf = b"%PDF-1.4\n" + os.urandom(24_000) + b"\n%%EOF\n"
    pdf_part = (
        'Content-Type: application/pdf; name="catalogue.pdf"\n'
        'Content-Disposition: attachment; filename="catalogue.pdf"\n'
        "Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(pdf).decode()
    )
    notes_part = (
        'Content-Type: text/plain; charset="utf-8"; name="notes.txt"\n'
        'Content-Disposition: attachment; filename="notes.txt"\n\n'
        "Keep this file as it is.\n"
    )
    subject = unique("mixed")
    sent = crlf(
        headers(subject, "news", 'multipart/mixed; boundary="mix-boundary"')
        + "This is a multi-part message in MIME format.\n"
        + "--mix-boundary\n"
        + 'Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: 8bit\n\n'
        + "Votre catalogue d'été est joint. Bonne lecture !\n"
        + "--mix-boundary\n"
        + notes_part
        + "--mix-boundary\n"
        + pdf_part
        + "--mix-boundary--\n"
    )

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    [body] = text_parts(message)
    [original_body] = text_parts(email_parse(sent))
    assert "Votre catalogue d'été" in text(original_body)
    footer = footed(text(original_body), text(body))
    assert links(text(body)) == [token(url)] and url in footer
    attachments = {p.get_filename(): p for p in message.iter_attachments()}
    assert set(attachments) == {"catalogue.pdf", "notes.txt"}
    assert attachments["catalogue.pdf"].get_content() == pdf
    assert text(attachments["notes.txt"]) == "Keep this file as it is."
    for part in (pdf_part, notes_part):
        assert crlf(part) in copy.data, "an attachment changed on the way"


def test_placeholder_split_by_qp_soft_breaks(gate, upstream):
    """The mailer's %%unsubscribe_url%%, cut by quoted-printable soft line breaks in both the text and HTML parts, becomes the link right there, and no footer is added."""
    rcpt = subscriber(gate)
    plain_qp = "Bonjour Am=C3=A9lie,\nPour ne plus recevoir nos offres : %%unsubscr=\nibe_url%%\nMerci.\n"
    html_qp = '<html><body><p>Offres d\'=C3=A9t=C3=A9</p>\n<p><a href=3D"%%unsubscribe=\n_url%%">Se d=C3=A9sinscrire</a></p>\n</body></html>\n'
    part = 'Content-Type: text/{}; charset="utf-8"\nContent-Transfer-Encoding: quoted-printable\n\n'
    subject = unique("placeholder")
    sent = crlf(
        headers(subject, "news", 'multipart/alternative; boundary="alt"')
        + "--alt\n" + part.format("plain") + plain_qp
        + "--alt\n" + part.format("html") + html_qp
        + "--alt--\n"
    )
    original_plain, original_html = text_parts(email_parse(sent))
    expected_plain, expected_html = text(original_plain), text(original_html)
    assert "Amélie,\nPour ne plus recevoir nos offres : %%unsubscribe_url%%\nMerci." in expected_plain
    assert '<p><a href="%%unsubscribe_url%%">Se désinscrire</a></p>' in expected_html

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    new_plain, new_html = text_parts(message)
    assert text(new_plain) == expected_plain.replace(PLACEHOLDER, url)
    assert text(new_html) == expected_html.replace(PLACEHOLDER, url)
    assert b"%%" not in copy.data and b"%%unsubscr" not in copy.data
    assert "You are receiving" not in message.as_string()


def test_placeholders_split_by_base64_lines(gate, upstream):
    """%%unsubscribe_url%% and %%preferences_url%% across base64 line breaks become optgate links, with no footer."""
    rcpt = subscriber(gate)
    # 57 bytes make one 76-character base64 line: each placeholder straddles a break.
    written = "x" * 50 + " %%unsubscribe_url%%\n" + "y" * 30 + " %%preferences_url%%\nBye.\n"
    subject = unique("b64placeholder")
    sent = crlf(
        headers(subject, "news", 'text/plain; charset="utf-8"', "Content-Transfer-Encoding: base64")
        + base64.encodebytes(written.encode()).decode()
    )
    assert b"%%" not in sent

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    content = text(message)
    assert "%%" not in content and "You are receiving" not in content
    assert content.startswith("x" * 50 + f" {url}\n" + "y" * 30 + " "), content
    preferences = content.split("\n")[1].rsplit(" ", 1)[1]
    assert preferences.startswith(f"{gate.http_url}/"), f"preferences link: {preferences}"
    assert content.endswith("\nBye.\n")


def test_placeholder_on_a_long_7bit_line_makes_the_part_quoted_printable(gate, upstream):
    """A 7-bit line of 980 characters holding the placeholder would pass 998 octets with the link: the part becomes quoted-printable and reads the same."""
    rcpt = subscriber(gate)
    line = "a" * 960 + " " + PLACEHOLDER
    subject = unique("longline")
    sent = crlf(headers(subject, "news", 'text/plain; charset="us-ascii"', "Content-Transfer-Encoding: 7bit") + line + "\nEnd.\n")

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent, may_change=("content-transfer-encoding",))
    assert message["Content-Transfer-Encoding"].lower() == "quoted-printable"
    assert text(message) == line.replace(PLACEHOLDER, url) + "\nEnd.\n"


@pytest.mark.parametrize(
    "kind",
    [
        "multipart/signed",
        "application/pkcs7-mime",
    ],
)
def test_signed_or_encrypted_body_is_untouched(gate, upstream, kind):
    """A PGP-signed or S/MIME-encrypted message gets the List-* headers but not a byte of its body changed, and no footer."""
    rcpt = subscriber(gate)
    subject = unique("signed")
    if kind == "multipart/signed":
        content_type = 'multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature"; boundary="sig"'
        body = (
            "--sig\n"
            'Content-Type: text/plain; charset="utf-8"\n\n'
            "Signed offer: -10 % this week.\n"
            "--sig\n"
            'Content-Type: application/pgp-signature; name="signature.asc"\n\n'
            "-----BEGIN PGP SIGNATURE-----\n\n"
            "iHUEARYIAB0WIQTk3c5aTe5oR2nq0Xk1n0Xo9Lxv8gUCZ0sFAAAKCRA1n0Xo9Lxv\n"
            "-----END PGP SIGNATURE-----\n"
            "--sig--\n"
        )
    else:
        content_type = 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'
        body = base64.encodebytes(os.urandom(600)).decode()
    extra = [] if kind == "multipart/signed" else ["Content-Transfer-Encoding: base64"]
    sent = crlf(headers(subject, "news", content_type, *extra) + body)

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    assert body_of(copy.data) == body_of(sent)
    assert url.encode() not in body_of(copy.data)


def test_custom_footer_templates(gate, upstream):
    """A purpose with its own footer_text and footer_html gets those, with the link filled in."""
    rcpt = subscriber(gate, PROMO["id"])
    part = 'Content-Type: text/{}; charset="utf-8"\n\n'
    subject = unique("custom")
    sent = crlf(
        headers(subject, "promo", 'multipart/alternative; boundary="alt"')
        + "--alt\n" + part.format("plain") + "Big sale.\n"
        + "--alt\n" + part.format("html") + "<html><body><p>Big sale.</p></body></html>\n"
        + "--alt--\n"
    )

    copy = deliver(gate, upstream, rcpt, sent)

    message, url = check_copy(gate, copy, sent)
    plain, page = text_parts(message)
    original_plain, original_page = text_parts(email_parse(sent))
    assert footed(text(original_plain), text(plain)).strip() == f"No more promos? {url}"
    footer = footed_html(text(original_page), text(page))
    assert f'<p class="bye">No more promos? <a href="{url}">Stop them</a></p>' in footer
    assert "You are receiving" not in message.as_string()


def test_missing_date_and_message_id_are_added(gate, upstream):
    """A message without Date or Message-ID arrives with exactly one of each."""
    rcpt = subscriber(gate)
    subject = unique("nodate")
    sent = b"\r\n".join(
        line for line in make_message(subject, purpose="news").split(b"\r\n") if not line.startswith((b"Date:", b"Message-ID:"))
    )

    copy = deliver(gate, upstream, rcpt, sent)

    message, _ = check_copy(gate, copy, sent)
    assert len(message.get_all("Date", [])) == 1 and message["Date"].datetime is not None
    [message_id] = message.get_all("Message-ID", [])
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", str(message_id).strip()), message_id


def test_each_recipient_gets_their_own_link(gate, upstream):
    """Two subscribers of one message get different links, none naming their address."""
    first, second = subscriber(gate), subscriber(gate)
    subject = unique("two")
    sent = make_message(subject, purpose="news")

    reply_first = deliver(gate, upstream, first, sent)
    reply_second = deliver(gate, upstream, second, sent)

    urls = [check_copy(gate, copy, sent)[1] for copy in (reply_first, reply_second)]
    assert urls[0] != urls[1]
    for rcpt, url in zip((first, second), urls):
        assert rcpt.split("@")[0] not in url
        decoded = base64.urlsafe_b64decode(token(url) + "=" * (-len(token(url)) % 4))
        assert rcpt.encode() not in decoded and rcpt.split("@")[0].encode() not in decoded


def test_transactional_mail_gets_no_link(gate, upstream):
    """An order confirmation arrives with no List-Unsubscribe, no footer, its body byte for byte, still DKIM-signed."""
    rcpt = f"{unique('buyer')}@example.net"
    sent = make_message(unique("order"), purpose=PURPOSES["transactional"], body="Your order #42 has shipped.\r\n")

    copy = deliver(gate, upstream, rcpt, sent)

    assert_wire_format(copy.data)
    message = copy.parsed()
    assert message["List-Unsubscribe"] is None and message["List-Unsubscribe-Post"] is None
    assert body_of(copy.data) == body_of(sent)
    assert b"/u/" not in copy.data
    assert_headers_kept(sent, copy.data)
    dkim_verify(copy.data, dict([generated_dkim_record(gate, "example.com")]))


def test_mailto_comes_second_when_configured(launch, upstream):
    """With unsubscribe.mailto set, List-Unsubscribe offers the web link first, then a mailto: naming the same token."""
    gate = launch(upstream.port, unsubscribe={"mailto": "unsubscribe@example.com"})
    rcpt = subscriber(gate)

    copy = deliver(gate, upstream, rcpt, make_message(unique("mailto"), purpose="news"))

    assert_wire_format(copy.data)
    [field] = copy.parsed().get_all("List-Unsubscribe")
    found = re.fullmatch(rf"<{re.escape(gate.http_url)}/u/([A-Za-z0-9_-]+)>,\s*<mailto:unsubscribe@example\.com\?([^>]*)>", str(field).strip())
    assert found, f"List-Unsubscribe: {field}"
    assert found[1] in found[2], "the mailto does not carry the token"
    assert copy.parsed().get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert links(text(copy.parsed())) == [found[1]]
