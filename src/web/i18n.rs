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
    /// The link from the unsubscribe pages to the preference centre.
    pub manage_preferences: &'static str,
    // The preference centre.
    pub prefs_heading: &'static str,
    pub prefs_lead: &'static str,
    pub prefs_save: &'static str,
    pub prefs_saved: &'static str,
    pub prefs_none: &'static str,
    pub prefs_customers_only: &'static str,
    pub prefs_undeliverable: &'static str,
    pub prefs_all_lead: &'static str,
    pub prefs_all_button: &'static str,
    pub prefs_all_done: &'static str,
    pub prefs_note: &'static str,
    // Double opt-in: the answer to a sign-up form, the confirmation page and its outcomes.
    pub signup_pending_heading: &'static str,
    pub signup_pending_body: &'static str,
    pub signup_refused_heading: &'static str,
    pub signup_refused_body: &'static str,
    pub confirm_heading: &'static str,
    pub confirm_lead: &'static str,
    pub confirm_button: &'static str,
    pub confirm_note: &'static str,
    pub confirmed_heading: &'static str,
    pub confirmed_lead: &'static str,
    pub already_confirmed_heading: &'static str,
    pub already_confirmed_body: &'static str,
    pub expired_heading: &'static str,
    pub expired_body: &'static str,
    // The confirmation mail.
    pub mail_subject: &'static str,
    pub mail_lead: &'static str,
    pub mail_action: &'static str,
    pub mail_button: &'static str,
    pub mail_valid_until: &'static str,
    pub mail_ignore: &'static str,
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
    manage_preferences: "Manage all your email preferences",
    prefs_heading: "Your email preferences",
    prefs_lead: "Tick the emails you want to receive, untick those you no longer want, then save.",
    prefs_save: "Save my choices",
    prefs_saved: "Your choices are saved.",
    prefs_none: "There are no emails to choose from here.",
    prefs_customers_only: "Only for customers.",
    prefs_undeliverable: "Mail to this address could not be delivered, so none is sent.",
    prefs_all_lead: "Or stop all our marketing emails at once:",
    prefs_all_button: "Unsubscribe from everything",
    prefs_all_done: "You are unsubscribed from everything: you will no longer receive our marketing emails.",
    prefs_note: "Emails you need, such as order confirmations, are not affected.",
    signup_pending_heading: "Check your mailbox",
    signup_pending_body: "We have sent a message to the address you gave. Open the link in it to confirm your subscription: nothing is sent to you before that.",
    signup_refused_heading: "Sign-up not accepted",
    signup_refused_body: "The form could not be accepted:",
    confirm_heading: "Confirm your subscription",
    confirm_lead: "Press the button to confirm that you want to receive these emails:",
    confirm_button: "Confirm",
    confirm_note: "You can unsubscribe at any time with the link in every email.",
    confirmed_heading: "Subscription confirmed",
    confirmed_lead: "Thank you. You will receive these emails:",
    already_confirmed_heading: "Already confirmed",
    already_confirmed_body: "This subscription was already confirmed. There is nothing more to do.",
    expired_heading: "Link expired",
    expired_body: "This confirmation link has expired. Please sign up again to get a new one.",
    mail_subject: "Please confirm your subscription",
    mail_lead: "Someone, hopefully you, asked to receive these emails at this address:",
    mail_action: "To confirm, open this link and press the button on the page:",
    mail_button: "Confirm my subscription",
    mail_valid_until: "The link works until",
    mail_ignore: "If you did not ask for this, ignore this message: you will not be subscribed.",
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
    manage_preferences: "Gérer toutes vos préférences de courriels",
    prefs_heading: "Vos préférences de courriels",
    prefs_lead: "Cochez les courriels que vous souhaitez recevoir, décochez ceux que vous ne voulez plus, puis enregistrez.",
    prefs_save: "Enregistrer mes choix",
    prefs_saved: "Vos choix sont enregistrés.",
    prefs_none: "Il n’y a aucun courriel à choisir ici.",
    prefs_customers_only: "Réservé aux clients.",
    prefs_undeliverable: "Les courriels à cette adresse n’ont pas pu être distribués : aucun n’est envoyé.",
    prefs_all_lead: "Ou arrêtez d’un coup tous nos courriels marketing :",
    prefs_all_button: "Me désinscrire de tout",
    prefs_all_done: "Vous êtes désinscrit(e) de tout : vous ne recevrez plus nos courriels marketing.",
    prefs_note: "Les courriels dont vous avez besoin, comme les confirmations de commande, ne sont pas concernés.",
    signup_pending_heading: "Consultez votre messagerie",
    signup_pending_body: "Nous avons envoyé un message à l’adresse indiquée. Ouvrez le lien qu’il contient pour confirmer votre inscription : rien ne vous est envoyé avant.",
    signup_refused_heading: "Inscription non acceptée",
    signup_refused_body: "Le formulaire n’a pas pu être accepté :",
    confirm_heading: "Confirmez votre inscription",
    confirm_lead: "Appuyez sur le bouton pour confirmer que vous souhaitez recevoir ces courriels :",
    confirm_button: "Confirmer",
    confirm_note: "Vous pouvez vous désinscrire à tout moment avec le lien présent dans chaque courriel.",
    confirmed_heading: "Inscription confirmée",
    confirmed_lead: "Merci. Vous recevrez ces courriels :",
    already_confirmed_heading: "Déjà confirmée",
    already_confirmed_body: "Cette inscription a déjà été confirmée. Vous n’avez rien d’autre à faire.",
    expired_heading: "Lien expiré",
    expired_body: "Ce lien de confirmation a expiré. Merci de vous inscrire à nouveau pour en recevoir un nouveau.",
    mail_subject: "Merci de confirmer votre inscription",
    mail_lead: "Quelqu’un, vous sans doute, a demandé à recevoir ces courriels à cette adresse :",
    mail_action: "Pour confirmer, ouvrez ce lien et appuyez sur le bouton de la page :",
    mail_button: "Confirmer mon inscription",
    mail_valid_until: "Le lien est valable jusqu’au",
    mail_ignore: "Si vous n’êtes pas à l’origine de cette demande, ignorez ce message : vous ne serez pas inscrit(e).",
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
