//! The languages the pages speak (English, French), the choice among them from
//! Accept-Language, and every sentence a recipient can read.

/// A language optgate's pages are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Fr,
}

impl Lang {
    /// The language a tag names ("fr", "fr-CA", "fr_FR", "EN"), by its primary subtag.
    pub fn from_tag(tag: &str) -> Option<Lang> {
        let primary = tag.trim().split(['-', '_']).next().unwrap_or_default();
        if primary.eq_ignore_ascii_case("en") {
            Some(Lang::En)
        } else if primary.eq_ignore_ascii_case("fr") {
            Some(Lang::Fr)
        } else {
            None
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Fr => "fr",
        }
    }

    pub fn texts(self) -> &'static Texts {
        match self {
            Lang::En => &EN,
            Lang::Fr => &FR,
        }
    }
}

/// A header can be long and hostile; a browser sends a handful of entries.
const MAX_ENTRIES: usize = 32;

/// Picks the page language: the best-rated language the reader accepts that we have
/// (q-values honoured, the first listed winning a tie); else `fallback` (the
/// purpose's locale) if we have it; else English.
pub fn negotiate(accept_language: Option<&str>, fallback: &str) -> Lang {
    let default = Lang::from_tag(fallback).unwrap_or(Lang::En);
    let mut best: Option<(f32, Lang)> = None;
    for entry in accept_language
        .unwrap_or_default()
        .split(',')
        .take(MAX_ENTRIES)
    {
        let mut parts = entry.split(';');
        let tag = parts.next().unwrap_or_default().trim();
        let Some(q) = quality(parts) else { continue };
        let lang = if tag == "*" {
            Some(default)
        } else {
            Lang::from_tag(tag)
        };
        if let Some(lang) = lang
            && q > 0.0
            && best.is_none_or(|(bq, _)| q > bq)
        {
            best = Some((q, lang));
        }
    }
    best.map_or(default, |(_, lang)| lang)
}

/// The entry's `q` parameter (1 when absent); None when it is not a number in 0..=1,
/// so that a malformed entry is ignored rather than trusted.
fn quality<'a>(params: impl Iterator<Item = &'a str>) -> Option<f32> {
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("q") {
            return value
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q));
        }
    }
    Some(1.0)
}

/// Every sentence of the pages, in one language. Kept together so that a translation
/// is one block to review, and so that the evidence can quote what was shown.
pub struct Texts {
    pub lang: &'static str,
    // The unsubscribe page (GET).
    pub unsubscribe_heading: &'static str,
    pub unsubscribe_lead: &'static str,
    pub address_label: &'static str,
    pub unsubscribe_button: &'static str,
    pub unsubscribe_note: &'static str,
    // After the page's button.
    pub unsubscribed_heading: &'static str,
    pub unsubscribed_lead: &'static str,
    pub undo_lead: &'static str,
    pub undo_button: &'static str,
    // After the undo button.
    pub resubscribed_heading: &'static str,
    pub resubscribed_lead: &'static str,
    // After a one-click POST (mail clients; rarely seen by a person).
    pub one_click_body: &'static str,
    // Problems.
    pub invalid_heading: &'static str,
    pub invalid_body: &'static str,
    pub bad_request_heading: &'static str,
    pub bad_request_body: &'static str,
    pub too_large_heading: &'static str,
    pub too_large_body: &'static str,
    pub too_many_heading: &'static str,
    pub too_many_body: &'static str,
    pub timeout_heading: &'static str,
    pub timeout_body: &'static str,
    pub error_heading: &'static str,
    pub error_body: &'static str,
}

pub static EN: Texts = Texts {
    lang: "en",
    unsubscribe_heading: "Unsubscribe",
    unsubscribe_lead: "Do you want to stop receiving these emails?",
    address_label: "Address:",
    unsubscribe_button: "Unsubscribe",
    unsubscribe_note: "Only these emails are affected. Nothing changes until you press the button.",
    unsubscribed_heading: "You are unsubscribed",
    unsubscribed_lead: "You will no longer receive these emails:",
    undo_lead: "Unsubscribed by mistake?",
    undo_button: "Subscribe again",
    resubscribed_heading: "You are subscribed again",
    resubscribed_lead: "You will receive these emails again:",
    one_click_body: "You will no longer receive these emails:",
    invalid_heading: "Link not valid",
    invalid_body: "This link is not valid. It may be incomplete: copy the whole link from the email and try again.",
    bad_request_heading: "Request not understood",
    bad_request_body: "The form was not recognised. Open the link in the email again and use its button.",
    too_large_heading: "Request too large",
    too_large_body: "The form sent was too large. Open the link in the email again and use its button.",
    too_many_heading: "Too many requests",
    too_many_body: "Please wait a minute, then try again.",
    timeout_heading: "Request too slow",
    timeout_body: "The request took too long. Please try again.",
    error_heading: "Something went wrong",
    error_body: "Your request could not be completed. Please try again in a few minutes.",
};

pub static FR: Texts = Texts {
    lang: "fr",
    unsubscribe_heading: "Se désinscrire",
    unsubscribe_lead: "Vous ne souhaitez plus recevoir ces courriels ?",
    address_label: "Adresse :",
    unsubscribe_button: "Se désinscrire",
    unsubscribe_note: "Seuls ces courriels sont concernés. Rien ne change tant que vous n’appuyez pas sur le bouton.",
    unsubscribed_heading: "Vous êtes désinscrit(e)",
    unsubscribed_lead: "Vous ne recevrez plus ces courriels :",
    undo_lead: "Désinscription par erreur ?",
    undo_button: "Me réabonner",
    resubscribed_heading: "Vous êtes de nouveau abonné(e)",
    resubscribed_lead: "Vous recevrez de nouveau ces courriels :",
    one_click_body: "Vous ne recevrez plus ces courriels :",
    invalid_heading: "Lien non valide",
    invalid_body: "Ce lien n’est pas valide. Il est peut-être incomplet : copiez le lien entier depuis le courriel et réessayez.",
    bad_request_heading: "Requête non comprise",
    bad_request_body: "Le formulaire n’a pas été reconnu. Rouvrez le lien du courriel et utilisez son bouton.",
    too_large_heading: "Requête trop volumineuse",
    too_large_body: "Le formulaire envoyé est trop volumineux. Rouvrez le lien du courriel et utilisez son bouton.",
    too_many_heading: "Trop de requêtes",
    too_many_body: "Merci de patienter une minute, puis de réessayer.",
    timeout_heading: "Requête trop lente",
    timeout_body: "La requête a pris trop de temps. Merci de réessayer.",
    error_heading: "Une erreur s’est produite",
    error_body: "Votre demande n’a pas pu aboutir. Merci de réessayer dans quelques minutes.",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_values_decide_and_the_purpose_locale_is_the_fallback() {
        assert_eq!(negotiate(Some("fr-FR,fr;q=0.9,en;q=0.8"), "en"), Lang::Fr);
        assert_eq!(negotiate(Some("en;q=0.5, fr;q=0.9"), "en"), Lang::Fr);
        assert_eq!(negotiate(Some("fr;q=0.5, en"), "fr"), Lang::En);
        assert_eq!(
            negotiate(Some("en, fr"), "fr"),
            Lang::En,
            "first wins a tie"
        );
        assert_eq!(negotiate(Some("de, it;q=0.8"), "fr"), Lang::Fr);
        assert_eq!(negotiate(Some("de, *;q=0.1"), "fr"), Lang::Fr);
        assert_eq!(negotiate(None, "fr"), Lang::Fr);
        assert_eq!(negotiate(None, "de"), Lang::En);
        assert_eq!(negotiate(Some(""), "xx"), Lang::En);
    }

    #[test]
    fn refused_and_malformed_entries_are_ignored() {
        assert_eq!(negotiate(Some("fr;q=0, en;q=0.1"), "fr"), Lang::En);
        assert_eq!(negotiate(Some("fr;q=2, en;q=0.1"), "fr"), Lang::En);
        assert_eq!(negotiate(Some("fr;q=abc"), "en"), Lang::En);
        assert_eq!(negotiate(Some(";;;,,,=,FR-ca"), "en"), Lang::Fr);
        assert_eq!(negotiate(Some("fr_FR"), "en"), Lang::Fr);
    }
}
