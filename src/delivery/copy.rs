//! One recipient's copy, made just before relay: the message's rewrite template
//! (prepared once per message), this recipient's signed links, and the DKIM signature.
//!
//! Marketing mail gets List-Unsubscribe headers and a body link; transactional mail
//! and our own bounce reports get nothing but the removal of X-Optgate-* headers.
//! Every copy is signed. The work is CPU: the recipient's contact number comes with
//! the delivery (it is read from the store only if their contact row has vanished).
//! Callers run it in place for a small message, on the blocking pool for a large one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::address::Address;
use crate::config::Config;
use crate::dkim::KeyRing;
use crate::policy::Basis;
use crate::rewrite::{self, BodyLink, CompiledFooter, Footer, Links, Prepared};
use crate::store::{QueuedMessage, Store, StoreError};
use crate::token::{Claims, TokenKeys, TokenKind, purpose_tag};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot name the recipient in the unsubscribe link: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dkim(#[from] crate::dkim::DkimError),
}

/// What is the same for every recipient of one message.
pub enum Template {
    /// Transactional purposes, and optgate's own bounce reports.
    AsIs,
    Marketing {
        purpose_tag: u32,
        prepared: Box<Prepared>,
    },
}

/// A finished copy, and what the rewrite did worth keeping in the delivery event.
pub struct Copy {
    /// The DKIM-Signature fields, which go first. Kept apart from the message: joining
    /// them would copy the whole message once more, per recipient.
    signature: Vec<u8>,
    message: Vec<u8>,
    pub notes: String,
}

impl Copy {
    /// The copy as the upstream gets it: these parts, one after the other.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.signature, &self.message]
    }
}

pub struct CopyMaker {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    tokens: Arc<TokenKeys>,
    dkim: Arc<KeyRing>,
    /// Each marketing purpose's footer and its tag, ready: made once, not per message.
    purposes: HashMap<String, (Arc<CompiledFooter>, u32)>,
    /// Some purpose is public, so the preference centre has something to offer.
    preference_centre: bool,
}

impl CopyMaker {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        tokens: Arc<TokenKeys>,
        dkim: Arc<KeyRing>,
    ) -> CopyMaker {
        let purposes = config
            .purposes
            .iter()
            .filter(|p| p.basis != Basis::Transactional)
            .map(|purpose| {
                let default = Footer::default_for(&purpose.locale, &purpose.name);
                let footer = Footer {
                    text: purpose.footer_text.clone().unwrap_or(default.text),
                    html: purpose.footer_html.clone().unwrap_or(default.html),
                };
                let ready = (
                    Arc::new(CompiledFooter::new(&footer)),
                    purpose_tag(&purpose.id),
                );
                (purpose.id.clone(), ready)
            })
            .collect();
        CopyMaker {
            preference_centre: config.purposes.iter().any(|p| p.public),
            config,
            store,
            tokens,
            dkim,
            purposes,
        }
    }

    /// Parses the message once for all its recipients.
    pub fn template(&self, message: &QueuedMessage) -> Template {
        let Some((footer, purpose_tag)) = self.purposes.get(&message.purpose) else {
            // Transactional, our own "dsn", or a purpose removed from the config since
            // the message was queued: no link we could honour, so none.
            return Template::AsIs;
        };
        Template::Marketing {
            purpose_tag: *purpose_tag,
            prepared: Box::new(Prepared::new(
                message.body.clone(),
                footer.clone(),
                &self.config.smtp.hostname,
            )),
        }
    }

    /// The signed copy for `recipient`, whose contact number is looked up when the
    /// queue did not give it.
    pub fn make(
        &self,
        template: &Template,
        message: &QueuedMessage,
        recipient: &str,
        contact: Option<i64>,
    ) -> Result<Copy, CopyError> {
        let (unsigned, notes) = match template {
            Template::AsIs => (rewrite::transactional(&message.body), String::new()),
            Template::Marketing {
                purpose_tag,
                prepared,
            } => {
                let contact = match contact {
                    Some(id) => id,
                    None => self.store.contact_id(
                        &Address::parse(recipient)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    )?,
                };
                let subject = u64::try_from(contact)
                    .map_err(|_| StoreError::Corrupt(format!("contact id {contact}")))?;
                let token = self.tokens.issue(Claims {
                    kind: TokenKind::Unsubscribe,
                    subject,
                    scope: *purpose_tag,
                });
                let unsubscribe = format!("{}/u/{token}", self.config.http.public_url);
                // The preference centre, when it has a purpose to offer; without one the
                // preferences placeholder falls back to the unsubscribe link.
                let preferences = self.preference_centre.then(|| {
                    let token = self.tokens.issue(Claims {
                        kind: TokenKind::Preferences,
                        subject,
                        scope: 0,
                    });
                    format!("{}/p/{token}", self.config.http.public_url)
                });
                let mailto = self
                    .config
                    .unsubscribe
                    .mailto
                    .as_ref()
                    .map(|m| format!("mailto:{m}?subject=unsubscribe%20{token}"));
                let rendered = prepared.render(&Links {
                    unsubscribe: &unsubscribe,
                    preferences: preferences.as_deref(),
                    mailto: mailto.as_deref(),
                });
                (rendered.bytes, notes(prepared, &rendered.body_link))
            }
        };
        Ok(Copy {
            signature: self.dkim.signature_fields(&unsigned)?,
            message: unsigned,
            notes,
        })
    }
}

/// "body link: footer; replaced the mailer's List-Unsubscribe: <…>"
fn notes(prepared: &Prepared, body_link: &BodyLink) -> String {
    let link = match body_link {
        BodyLink::Placeholder => "body link: at the placeholder",
        BodyLink::Footer => "body link: footer",
        BodyLink::SkippedSigned => "body link: skipped (signed or encrypted message)",
        BodyLink::NoTextPart => "body link: none (no text part)",
    };
    match prepared.replaced_list_unsubscribe() {
        Some(old) => format!("{link}; replaced the mailer's List-Unsubscribe: {old}"),
        None => link.to_string(),
    }
}
