//! DATA and BDAT, and the end of data: the message's purpose, one consent decision
//! per recipient, the durable hand-over to the spool, and the reply that says so.

use std::io;

use smtp_proto::request::receiver::{BdatReceiver, DummyDataReceiver};

use super::message::{self, DotReader, Trace};
use super::reply::Reply;
use super::session::{Chunks, Filled, Flow, Next, Session, Transaction, Wait};
use crate::clock;
use crate::policy::{Decision, PurposeRequest, SuppressReason, resolve_purpose};
use crate::rewrite::header_value;
use crate::spool;
use crate::store::{NewMessage, QueuedMessage, RecipientDecision};

/// What the end of data did, for the reply and the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Outcome {
    pub accepted: usize,
    /// Suppressed recipients per reason, most frequent first.
    pub suppressed: Vec<(SuppressReason, usize)>,
}

impl Outcome {
    pub fn of(decisions: &[Decision]) -> Outcome {
        let mut counts: Vec<(SuppressReason, usize)> = Vec::new();
        let mut accepted = 0;
        for d in decisions {
            match d {
                Decision::Allow { .. } => accepted += 1,
                Decision::Suppress(reason) => match counts.iter_mut().find(|(r, _)| r == reason) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((*reason, 1)),
                },
            }
        }
        counts.sort_by(|(ra, a), (rb, b)| b.cmp(a).then(ra.cmp(rb)));
        Outcome {
            accepted,
            suppressed: counts,
        }
    }

    pub fn suppressed_total(&self) -> usize {
        self.suppressed.iter().map(|(_, n)| n).sum()
    }

    /// `2 accepted, 1 suppressed (no consent)`, or with several reasons
    /// `0 accepted, 3 suppressed (2 no consent, 1 consent withdrawn)`.
    pub fn counts(&self) -> String {
        let mut s = format!(
            "{} accepted, {} suppressed",
            self.accepted,
            self.suppressed_total()
        );
        match self.suppressed.as_slice() {
            [] => {}
            [(reason, _)] => s.push_str(&format!(" ({})", reason.as_str())),
            several => {
                let parts: Vec<String> = several
                    .iter()
                    .map(|(r, n)| format!("{n} {}", r.as_str()))
                    .collect();
                s.push_str(&format!(" ({})", parts.join(", ")));
            }
        }
        s
    }

    /// Always 250: the message was handled as the mailer asked; suppression is a
    /// decision, not a failure, and a 5xx would make mailers retry or bounce it.
    pub fn reply(&self, queue_id: &str) -> Reply {
        if self.accepted > 0 {
            Reply::new(
                250,
                "2.0.0",
                format!("Queued as {queue_id}: {}", self.counts()),
            )
        } else {
            Reply::new(250, "2.0.0", format!("Not queued: {}", self.counts()))
        }
    }
}

fn too_big(max: usize) -> Reply {
    Reply::new(552, "5.3.4", format!("Message too big (max {max} bytes)"))
}

impl Session {
    /// Why the current state allows no message data, if it does not.
    fn data_refusal(&self, bdat: bool) -> Option<Reply> {
        let Some(tx) = &self.tx else {
            return Some(Reply::new(503, "5.5.1", "Need MAIL command"));
        };
        if tx.recipients.is_empty() {
            return Some(Reply::new(503, "5.5.1", "Need RCPT command"));
        }
        if !bdat && tx.chunks.is_some() {
            return Some(Reply::new(503, "5.5.1", "DATA not allowed after BDAT"));
        }
        None
    }

    pub(super) async fn data(&mut self) -> io::Result<Flow> {
        if let Some(refusal) = self.data_refusal(false) {
            self.send(refusal);
            return Ok(Flow::Continue);
        }
        self.send(Reply::bare(354, "Start mail input; end with <CRLF>.<CRLF>"));
        let max = self.inbound.config.smtp.max_message_size;
        let mut reader = DotReader::new(max);
        let decoded = loop {
            if let Some(decoded) = reader.feed(self.input.message()) {
                break decoded;
            }
            self.input.expect_message();
            if let Some(flow) = self.fill_data().await? {
                // The buffer holds the message so far, which is not input.
                self.input.clear();
                return Ok(flow);
            }
        };
        let Some(tx) = self.tx.take() else {
            return Ok(Flow::Continue);
        };
        let reply = match decoded {
            Ok(body) => self.end_of_data(tx, body).await,
            Err(size) => {
                tracing::warn!(peer = %self.peer.ip(), size, max, "message too big");
                too_big(max)
            }
        };
        self.send(reply);
        Ok(Flow::Continue)
    }

    /// One BDAT chunk (RFC 3030). Its bytes are always read, even when it is refused,
    /// so that they are never taken for commands.
    pub(super) async fn bdat(&mut self, size: usize, last: bool) -> io::Result<Flow> {
        let max = self.inbound.config.smtp.max_message_size;
        let refusal = self.data_refusal(true);
        // The body so far, taken out to be read into; None means read past the chunk.
        let mut body = match (&refusal, self.tx.as_mut()) {
            (None, Some(tx)) => {
                let chunks = tx.chunks.get_or_insert_with(Chunks::default);
                chunks.size = chunks.size.saturating_add(size);
                if chunks.size > max {
                    chunks.body = Vec::new();
                    None
                } else {
                    Some(std::mem::take(&mut chunks.body))
                }
            }
            _ => None,
        };
        if let Some(flow) = self.read_chunk(size, body.as_mut()).await? {
            return Ok(flow);
        }
        if let Some(refusal) = refusal {
            self.send(refusal);
            return Ok(Flow::Continue);
        }
        let Some(body) = body else {
            // Every chunk from the one that overflows to LAST gets the same answer.
            if last {
                tracing::warn!(peer = %self.peer.ip(), max, "message too big");
                self.tx = None;
            }
            self.send(too_big(max));
            return Ok(Flow::Continue);
        };
        if !last {
            if let Some(chunks) = self.tx.as_mut().and_then(|tx| tx.chunks.as_mut()) {
                chunks.body = body;
            }
            self.send(Reply::new(250, "2.0.0", format!("{size} octets received")));
            return Ok(Flow::Continue);
        }
        let Some(tx) = self.tx.take() else {
            return Ok(Flow::Continue);
        };
        let reply = self.end_of_data(tx, body).await;
        self.send(reply);
        Ok(Flow::Continue)
    }

    /// Reads `size` bytes of chunk into `body`, or past them if `body` is None.
    async fn read_chunk(
        &mut self,
        size: usize,
        mut body: Option<&mut Vec<u8>>,
    ) -> io::Result<Option<Flow>> {
        let mut keeper = BdatReceiver::new(size, true);
        let mut skipper = DummyDataReceiver::new_bdat(size);
        loop {
            let mut bytes = self.input.bytes().iter();
            let done = match body.as_deref_mut() {
                Some(body) => keeper.ingest(&mut bytes, body),
                None => skipper.ingest(&mut bytes),
            };
            let used = self.input.bytes().len() - bytes.as_slice().len();
            self.input.consume(used);
            if done {
                return Ok(None);
            }
            if let Some(flow) = self.fill_data().await? {
                return Ok(Some(flow));
            }
        }
    }

    /// Reads more message data; `Some` if the connection ended instead.
    async fn fill_data(&mut self) -> io::Result<Option<Flow>> {
        Ok(match self.fill(Wait::Data).await? {
            Filled::More => None,
            Filled::Idle => Some(self.hang_up(Next::Idle)),
            Filled::Closed | Filled::Shutdown => {
                tracing::debug!(peer = %self.peer.ip(), "connection closed during message data");
                Some(Flow::Close)
            }
        })
    }

    /// The message is complete: normalise it, name its purpose, decide for every
    /// recipient, queue it durably, and say what happened.
    async fn end_of_data(&self, tx: Transaction, raw: Vec<u8>) -> Reply {
        let config = &self.inbound.config;
        let ip = self.peer.ip().to_canonical();
        let message::Normalized {
            message: mut body,
            longest_line,
        } = message::normalize_line_endings(raw);
        let max_line = config.smtp.max_line_length;
        if longest_line > max_line {
            return Reply::new(
                554,
                "5.6.0",
                format!("Message has a line longer than {max_line} octets"),
            );
        }

        let account = self
            .account
            .as_deref()
            .and_then(|user| config.smtp.accounts.iter().find(|a| a.username == user));
        let header = header_value(&body, "X-Optgate-Purpose");
        let purpose = match resolve_purpose(
            config,
            &PurposeRequest {
                header: header.as_deref(),
                account,
            },
        ) {
            Ok(p) => p,
            Err(e) => return Reply::new(550, "5.7.1", e),
        };

        let now = clock::now();
        let decisions = match self
            .inbound
            .policy
            .decide_all(purpose, &tx.recipients, now)
            .await
        {
            Ok(d) if d.len() == tx.recipients.len() => d,
            Ok(_) => {
                tracing::error!(peer = %ip, "policy gave the wrong number of decisions");
                return Reply::new(
                    451,
                    "4.3.0",
                    "Temporary failure checking consent, try again later",
                );
            }
            Err(e) => {
                tracing::error!(peer = %ip, error = %e, "consent check failed; the mailer is told to retry");
                return Reply::new(
                    451,
                    "4.3.0",
                    "Temporary failure checking consent, try again later",
                );
            }
        };

        let id = spool::new_queue_id();
        let helo = self.helo.as_ref();
        let received = message::received_header(&Trace {
            helo: helo.map(|h| h.name.as_str()).unwrap_or_default(),
            ip,
            hostname: &config.smtp.hostname,
            protocol: message::protocol(
                helo.is_some_and(|h| h.extended),
                self.stream.is_tls(),
                self.account.is_some(),
            ),
            queue_id: &id,
            recipient: match tx.recipients.as_slice() {
                [only] => Some(only.as_str()),
                _ => None,
            },
            date: &clock::rfc5322(now),
        });
        // The header goes in front where the body lies: one move within its buffer
        // rather than a second buffer the size of the message. The buffer grew by
        // doubling as the message was read; what is queued keeps only the message
        // (realloc shrinks in place).
        body.splice(0..0, received.bytes());
        body.shrink_to_fit();

        let outcome = Outcome::of(&decisions);
        let origin = match &self.account {
            Some(user) => format!("{user}@{ip}"),
            None => ip.to_string(),
        };
        let recipients = tx
            .recipients
            .into_iter()
            .zip(&decisions)
            .map(|(address, d)| RecipientDecision {
                address,
                allowed: d.is_allowed(),
                reason: d.reason(),
            })
            .collect();
        let message = NewMessage {
            message: QueuedMessage {
                id: id.clone(),
                sender: tx.sender,
                purpose: purpose.id.clone(),
                received_at: now,
                body: std::sync::Arc::new(body),
            },
            recipients,
            origin,
        };
        if let Err(e) = self.inbound.spool.accept(message).await {
            tracing::error!(peer = %ip, queue_id = %id, error = %e, "could not queue the message; the mailer is told to retry");
            return Reply::new(451, "4.3.0", "Could not queue the message, try again later");
        }
        tracing::info!(
            queue_id = %id,
            peer = %ip,
            purpose = %purpose.id,
            accepted = outcome.accepted,
            suppressed = outcome.suppressed_total(),
            "message {}",
            if outcome.accepted > 0 { "queued" } else { "not queued: every recipient suppressed" }
        );
        outcome.reply(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Basis;

    fn allow() -> Decision {
        Decision::Allow {
            basis: Basis::Consent,
            record: Some(1),
        }
    }
    use SuppressReason::*;

    #[test]
    fn the_reply_counts_what_happened() {
        let mixed = Outcome::of(&[allow(), Decision::Suppress(NoConsent), allow()]);
        assert_eq!(
            mixed.reply("Q1").text(),
            "250 2.0.0 Queued as Q1: 2 accepted, 1 suppressed (no consent)"
        );

        let several = Outcome::of(&[
            Decision::Suppress(ConsentWithdrawn),
            Decision::Suppress(NoConsent),
            Decision::Suppress(NoConsent),
            allow(),
        ]);
        assert_eq!(
            several.reply("Q2").text(),
            "250 2.0.0 Queued as Q2: 1 accepted, 3 suppressed (2 no consent, 1 consent withdrawn)"
        );

        let none = Outcome::of(&[Decision::Suppress(NoConsent), Decision::Suppress(NoConsent)]);
        assert_eq!(
            none.reply("Q3").text(),
            "250 2.0.0 Not queued: 0 accepted, 2 suppressed (no consent)"
        );

        let all = Outcome::of(&[allow(), allow()]);
        assert_eq!(
            all.reply("Q4").text(),
            "250 2.0.0 Queued as Q4: 2 accepted, 0 suppressed"
        );
    }

    #[test]
    fn equal_counts_keep_a_stable_order() {
        let o = Outcome::of(&[Decision::Suppress(Objected), Decision::Suppress(NoConsent)]);
        assert_eq!(
            o.counts(),
            "0 accepted, 2 suppressed (1 no consent, 1 objected)"
        );
    }
}
