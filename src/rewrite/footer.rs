//! The unsubscribe footer added to a message body that has no placeholder: the
//! per-purpose templates, the English and French defaults, and their compiled form.

use std::fmt::Write as _;

/// A footer template pair. `{unsubscribe_url}` and `{preferences_url}` are filled per
/// copy; a line of a template that mentions `{preferences_url}` is left out when there
/// is no preference link, so one template serves with and without a preference centre.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// For text/plain parts; the URLs go in as they are.
    pub text: String,
    /// For text/html parts; the URLs go in HTML-escaped. It should stay small, styled
    /// inline and load nothing from outside: it is read in mail clients.
    pub html: String,
}

const HTML_OPEN: &str = "<div style=\"margin:24px auto 0;padding:12px 16px;max-width:600px;border-top:1px solid #dddddd;font-family:Arial,Helvetica,sans-serif;font-size:12px;line-height:18px;color:#666666;text-align:center\">";
const LINK_STYLE: &str = "color:#666666;text-decoration:underline";

impl Footer {
    /// The footer used when a purpose configures none: English unless the locale is
    /// French (`fr`, `fr-CA`, `fr_FR`…), because those are the two we have wording for.
    pub fn default_for(locale: &str, purpose_name: &str) -> Footer {
        let purpose: String = purpose_name
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let purpose = purpose.trim();
        let french = locale
            .split(['-', '_'])
            .next()
            .is_some_and(|l| l.eq_ignore_ascii_case("fr"));
        let (why, unsubscribe, preferences) = if french {
            (
                format!("Vous recevez \u{ab}\u{a0}{purpose}\u{a0}\u{bb} de notre part."),
                "Se d\u{e9}sinscrire en un clic",
                "G\u{e9}rer vos pr\u{e9}f\u{e9}rences",
            )
        } else {
            (
                format!("You are receiving \"{purpose}\" from us."),
                "Unsubscribe in one click",
                "Manage your preferences",
            )
        };
        let colon = if french { "\u{a0}:" } else { ":" };
        let text = format!(
            "{why}\n{unsubscribe}{colon} {{unsubscribe_url}}\n{preferences}{colon} {{preferences_url}}\n"
        );
        let mut html = String::with_capacity(700);
        html.push_str(HTML_OPEN);
        html.push('\n');
        let _ = writeln!(
            html,
            "<p style=\"margin:0 0 4px\">{}</p>",
            html_escape_text(&why)
        );
        let _ = writeln!(
            html,
            "<p style=\"margin:0\"><a href=\"{{unsubscribe_url}}\" style=\"{LINK_STYLE}\">{unsubscribe}</a></p>"
        );
        let _ = writeln!(
            html,
            "<p style=\"margin:4px 0 0\"><a href=\"{{preferences_url}}\" style=\"{LINK_STYLE}\">{preferences}</a></p>"
        );
        html.push_str("</div>\n");
        Footer { text, html }
    }
}

/// One piece of a compiled footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Lit(String),
    Unsubscribe,
    Preferences,
}

/// The footer ready to be filled: split once per purpose (the caller keeps it), not
/// per message or per copy. Index 0 is for copies without a preference link, 1 for
/// copies with one.
#[derive(Debug, Clone, Default)]
pub struct CompiledFooter {
    pub(super) text: [Vec<Piece>; 2],
    pub(super) html: [Vec<Piece>; 2],
}

impl CompiledFooter {
    pub fn new(footer: &Footer) -> CompiledFooter {
        CompiledFooter {
            text: [
                compile(&footer.text, false, false),
                compile(&footer.text, true, false),
            ],
            // Non-ASCII in the HTML footer becomes character references, so it reads
            // the same whatever charset the part it lands in declares.
            html: [
                compile(&footer.html, false, true),
                compile(&footer.html, true, true),
            ],
        }
    }

    /// Whether any literal of the footers is outside ASCII (the URLs never are: the
    /// renderer percent-encodes them).
    pub(super) fn text_is_ascii(&self) -> bool {
        self.text
            .iter()
            .flatten()
            .all(|p| !matches!(p, Piece::Lit(s) if !s.is_ascii()))
    }
}

/// Splits a template into literals and URL slots, with CRLF line breaks, no blank
/// lines at either end and no trailing line break (the caller adds the separators).
fn compile(template: &str, with_preferences: bool, html: bool) -> Vec<Piece> {
    let lines: Vec<&str> = template
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| with_preferences || !l.contains("{preferences_url}"))
        .collect();
    let first = lines.iter().position(|l| !l.trim().is_empty());
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    let joined = match (first, last) {
        (Some(f), Some(l)) => lines[f..=l].join("\r\n"),
        _ => String::new(),
    };
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = joined.as_str();
    while let Some(open) = rest.find('{') {
        let (before, from_brace) = rest.split_at(open);
        push_lit(&mut lit, before, html);
        if let Some(after) = from_brace.strip_prefix("{unsubscribe_url}") {
            flush(&mut pieces, &mut lit);
            pieces.push(Piece::Unsubscribe);
            rest = after;
        } else if let Some(after) = from_brace.strip_prefix("{preferences_url}") {
            flush(&mut pieces, &mut lit);
            pieces.push(Piece::Preferences);
            rest = after;
        } else {
            lit.push('{');
            rest = &from_brace[1..];
        }
    }
    push_lit(&mut lit, rest, html);
    flush(&mut pieces, &mut lit);
    // A template without the link would send mail nobody can leave: the link is
    // added on a line of its own.
    if !pieces.contains(&Piece::Unsubscribe) {
        let (open, close) = if html {
            ("<p><a href=\"", "\">Unsubscribe</a></p>")
        } else {
            ("", "")
        };
        let sep = if pieces.is_empty() { "" } else { "\r\n" };
        pieces.push(Piece::Lit(format!("{sep}{open}")));
        pieces.push(Piece::Unsubscribe);
        pieces.push(Piece::Lit(close.to_owned()));
        pieces.retain(|p| *p != Piece::Lit(String::new()));
    }
    pieces
}

fn push_lit(lit: &mut String, s: &str, html: bool) {
    if html {
        for c in s.chars() {
            if c.is_ascii() {
                lit.push(c);
            } else {
                let _ = write!(lit, "&#{};", u32::from(c));
            }
        }
    } else {
        lit.push_str(s);
    }
}

fn flush(pieces: &mut Vec<Piece>, lit: &mut String) {
    if !lit.is_empty() {
        pieces.push(Piece::Lit(std::mem::take(lit)));
    }
}

/// Escapes text (and attribute values) for HTML.
pub(super) fn html_escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}
