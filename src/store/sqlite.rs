//! The embedded default backend: one SQLite file in WAL mode, one writer connection
//! and a small pool of read-only ones, so policy lookups never wait behind a commit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Params, Row, Transaction, TransactionBehavior, params,
};

use super::*;
use crate::clock;

/// The schema, one entry per version: `PRAGMA user_version` counts the entries
/// applied, so a later release appends an entry and older files catch up on open.
const MIGRATIONS: &[&str] = &[r"
    -- The id is what unsubscribe and preference tokens carry instead of the address;
    -- INTEGER PRIMARY KEY keeps it stable for the contact's whole life.
    CREATE TABLE contacts (
        id INTEGER PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        customer INTEGER NOT NULL DEFAULT 0 CHECK (customer IN (0, 1)),
        created_at INTEGER NOT NULL
    );

    -- The proof of every consent and withdrawal. Ids order events even within a
    -- second, and AUTOINCREMENT keeps an id from ever being reused.
    CREATE TABLE consent_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        address TEXT NOT NULL REFERENCES contacts (address),
        purpose TEXT NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('grant', 'withdraw')),
        at INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        evidence TEXT NOT NULL
    );
    -- The newest event for (address, purpose) is one seek: max(id) at the end of the range.
    CREATE INDEX consent_history_latest ON consent_history (address, purpose, id);
    -- Proof that can be edited proves nothing: refuse it even to hand-written SQL.
    CREATE TRIGGER consent_history_no_update BEFORE UPDATE ON consent_history
    BEGIN SELECT RAISE(ABORT, 'the consent history is append-only'); END;
    CREATE TRIGGER consent_history_no_delete BEFORE DELETE ON consent_history
    BEGIN SELECT RAISE(ABORT, 'the consent history is append-only'); END;

    -- Independent of contacts: a bounced address we hold nothing else about is still
    -- suppressed, and shows up as such.
    CREATE TABLE suppressions (
        address TEXT PRIMARY KEY NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        at INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- No foreign key to messages: events outlive the messages they are about. `origin`
    -- (who submitted the message) is kept with each decision as part of its proof.
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message_id TEXT,
        address TEXT NOT NULL,
        purpose TEXT,
        detail TEXT NOT NULL,
        origin TEXT
    );
    CREATE INDEX events_address ON events (address, id);

    CREATE TABLE messages (
        id TEXT PRIMARY KEY NOT NULL,
        sender TEXT NOT NULL,
        purpose TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        body BLOB NOT NULL
    );

    CREATE TABLE deliveries (
        message_id TEXT NOT NULL REFERENCES messages (id),
        recipient TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error TEXT,
        PRIMARY KEY (message_id, recipient)
    ) WITHOUT ROWID;
"];

/// Long enough to ride out the other process's commit (the CLI writing while `serve`
/// runs, or the reverse), short enough that a stuck lock surfaces as an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Readers kept open between calls; more are opened under a burst and closed after.
const MAX_IDLE_READERS: usize = 4;

/// The hot path, once per recipient: the scalar subqueries are primary-key seeks and
/// each `max(id)` is one seek into `consent_history_latest`; the constant row makes
/// an unknown address come back as one row of NULLs rather than no row.
const FACTS: &str = "
    SELECT (SELECT customer FROM contacts WHERE address = ?1),
           (SELECT reason FROM suppressions WHERE address = ?1),
           p.id, p.action, p.at, a.id, a.action, a.at
    FROM (SELECT 1)
    LEFT JOIN consent_history AS p
        ON p.id = (SELECT max(id) FROM consent_history WHERE address = ?1 AND purpose = ?2)
    LEFT JOIN consent_history AS a
        ON a.id = (SELECT max(id) FROM consent_history WHERE address = ?1 AND purpose = ?3)";

const UPSERT_SUPPRESSION: &str = "
    INSERT INTO suppressions (address, reason, detail, at) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (address) DO UPDATE
    SET reason = excluded.reason, detail = excluded.detail, at = excluded.at";

const HARD_BOUNCE: &str = "hard bounce";

pub struct SqliteStore {
    path: PathBuf,
    // Declared before the writer so the readers close first, and the writer, closing
    // last, can checkpoint and remove the WAL file.
    readers: Mutex<Vec<Connection>>,
    writer: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, in WAL mode; `fsync` false
    /// relaxes durability for throwaway instances.
    pub fn open(path: &Path, fsync: bool) -> Result<SqliteStore, StoreError> {
        let mut writer = Connection::open(path)?;
        writer.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets readers run beside the writer, and with synchronous = FULL every
        // commit fsyncs the log: the 250 after DATA is then a promise kept.
        let mode: String =
            writer.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Database(format!(
                "{} cannot use write-ahead logging (journal mode stays '{mode}')",
                path.display()
            )));
        }
        writer.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
        writer.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut writer)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(writer),
        })
    }

    /// Runs `f` in one IMMEDIATE transaction: taking the write lock up front means a
    /// second process makes us wait (busy timeout) instead of failing mid-transaction.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .writer
            .lock()
            .map_err(|_| poisoned("writer connection"))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` on a pooled read-only connection, which in WAL mode sees the last
    /// commit without ever waiting for the writer.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self
            .readers
            .lock()
            .map_err(|_| poisoned("reader pool"))?
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.open_reader()?,
        };
        let out = f(&conn);
        // A connection left inside a transaction would pin an old snapshot: drop it.
        if conn.is_autocommit() {
            let mut idle = self.readers.lock().map_err(|_| poisoned("reader pool"))?;
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
        out
    }

    fn open_reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }
}

/// Brings the schema to the newest version. IMMEDIATE so that two processes opening
/// a new file at once do not both try to create it.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(version)
        .ok()
        .filter(|&v| v <= MIGRATIONS.len())
        .ok_or_else(|| {
            StoreError::Database(format!(
                "schema version {version} is unknown to this optgate (it knows up to {}): \
                 was the file written by a newer release?",
                MIGRATIONS.len()
            ))
        })?;
    if applied < MIGRATIONS.len() {
        for sql in &MIGRATIONS[applied..] {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    }
    tx.commit()?;
    Ok(())
}

fn poisoned(what: &str) -> StoreError {
    StoreError::Internal(format!(
        "the {what} is unusable: a thread panicked while holding it"
    ))
}

/// Every row of `sql`, each converted by `f`, which may fail on corrupt data.
fn rows<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    f: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(f(row)?);
    }
    Ok(out)
}

fn action(row: &Row<'_>, idx: usize) -> Result<ConsentAction, StoreError> {
    let value = row.get_ref(idx)?;
    match value.as_str() {
        Ok("grant") => Ok(ConsentAction::Grant),
        Ok("withdraw") => Ok(ConsentAction::Withdraw),
        Ok(other) => Err(StoreError::Corrupt(format!(
            "unknown consent action '{other}'"
        ))),
        Err(_) => Err(StoreError::Corrupt(format!(
            "consent action stored as {}",
            value.data_type()
        ))),
    }
}

/// The (id, action, at) triple starting at column `first`, NULL when there is no event.
fn latest(row: &Row<'_>, first: usize) -> Result<Option<LatestEvent>, StoreError> {
    let Some(id) = row.get::<_, Option<i64>>(first)? else {
        return Ok(None);
    };
    Ok(Some(LatestEvent {
        id,
        action: action(row, first + 1)?,
        at: row.get(first + 2)?,
    }))
}

fn facts(row: &Row<'_>) -> Result<ConsentFacts, StoreError> {
    Ok(ConsentFacts {
        customer: row.get::<_, Option<bool>>(0)?.unwrap_or(false),
        erased: false,
        suppression: row.get(1)?,
        purpose_event: latest(row, 2)?,
        all_event: latest(row, 5)?,
    })
}

fn consent_event(row: &Row<'_>) -> Result<ConsentEvent, StoreError> {
    let id = row.get(0)?;
    let evidence: String = row.get(7)?;
    Ok(ConsentEvent {
        id,
        address: row.get(1)?,
        purpose: row.get(2)?,
        action: action(row, 3)?,
        at: row.get(4)?,
        recorded_at: row.get(5)?,
        source: row.get(6)?,
        evidence: serde_json::from_str(&evidence).map_err(|e| {
            StoreError::Corrupt(format!("consent event {id}: evidence is not JSON: {e}"))
        })?,
    })
}

fn upsert_suppression(
    conn: &Connection,
    address: &str,
    reason: &str,
    detail: &str,
    at: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(UPSERT_SUPPRESSION)?
        .execute(params![address, reason, detail, at])?;
    Ok(())
}

impl Store for SqliteStore {
    fn consent_facts(
        &self,
        addresses: &[Address],
        purpose: &str,
    ) -> Result<Vec<ConsentFacts>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(FACTS)?;
            addresses
                .iter()
                .map(|a| {
                    stmt.query_row(params![a.as_str(), purpose, ALL_PURPOSES], |row| {
                        Ok(facts(row))
                    })?
                })
                .collect()
        })
    }

    fn append_consent(&self, event: &NewConsentEvent) -> Result<i64, StoreError> {
        let evidence = serde_json::to_string(&event.evidence)
            .map_err(|e| StoreError::Internal(format!("cannot serialise the evidence: {e}")))?;
        let now = clock::now();
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO contacts (address, customer, created_at) VALUES (?1, 0, ?2)
                 ON CONFLICT (address) DO NOTHING",
            )?
            .execute(params![event.address.as_str(), now])?;
            let id = tx
                .prepare_cached(
                    "INSERT INTO consent_history
                     (address, purpose, action, at, recorded_at, source, evidence)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                )?
                .query_row(
                    params![
                        event.address.as_str(),
                        event.purpose,
                        event.action.as_str(),
                        event.at,
                        now,
                        event.source,
                        evidence
                    ],
                    |row| row.get(0),
                )?;
            Ok(id)
        })
    }

    fn set_customer(&self, address: &Address, customer: bool) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO contacts (address, customer, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (address) DO UPDATE SET customer = excluded.customer",
            )?
            .execute(params![address.as_str(), customer, clock::now()])?;
            Ok(())
        })
    }

    fn contact(&self, address: &Address) -> Result<Option<ContactRecord>, StoreError> {
        let addr = address.as_str();
        self.read(|conn| {
            // One snapshot for the three reads, so the view never mixes two states.
            let tx = conn.unchecked_transaction()?;
            let customer: Option<bool> = tx
                .prepare_cached("SELECT customer FROM contacts WHERE address = ?1")?
                .query_row([addr], |row| row.get(0))
                .optional()?;
            let suppression = tx
                .prepare_cached("SELECT reason, detail, at FROM suppressions WHERE address = ?1")?
                .query_row([addr], |row| {
                    Ok(Suppression {
                        reason: row.get(0)?,
                        detail: row.get(1)?,
                        at: row.get(2)?,
                    })
                })
                .optional()?;
            let history = rows(
                &tx,
                "SELECT id, address, purpose, action, at, recorded_at, source, evidence
                     FROM consent_history WHERE address = ?1 ORDER BY id",
                [addr],
                consent_event,
            )?;
            tx.commit()?;
            if customer.is_none() && suppression.is_none() && history.is_empty() {
                return Ok(None);
            }
            Ok(Some(ContactRecord {
                address: addr.to_string(),
                customer: customer.unwrap_or(false),
                suppression,
                history,
            }))
        })
    }

    fn suppress(
        &self,
        address: &Address,
        reason: &str,
        detail: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| upsert_suppression(tx, address.as_str(), reason, detail, at))
    }

    fn unsuppress(&self, address: &Address) -> Result<bool, StoreError> {
        self.write(|tx| {
            let removed = tx
                .prepare_cached("DELETE FROM suppressions WHERE address = ?1")?
                .execute([address.as_str()])?;
            Ok(removed > 0)
        })
    }

    fn contact_id(&self, address: &Address) -> Result<i64, StoreError> {
        let known = self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT id FROM contacts WHERE address = ?1")?
                .query_row([address.as_str()], |row| row.get(0))
                .optional()?)
        })?;
        if let Some(id) = known {
            return Ok(id);
        }
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO contacts (address, customer, created_at) VALUES (?1, 0, ?2)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![address.as_str(), clock::now()])?;
            Ok(tx
                .prepare_cached("SELECT id FROM contacts WHERE address = ?1")?
                .query_row([address.as_str()], |row| row.get(0))?)
        })
    }

    fn contact_address(&self, id: i64) -> Result<Option<Address>, StoreError> {
        let stored: Option<String> = self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT address FROM contacts WHERE id = ?1")?
                .query_row([id], |row| row.get(0))
                .optional()?)
        })?;
        stored
            .map(|a| Address::parse(&a).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    fn enqueue(&self, batch: &[NewMessage]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut decision = tx.prepare_cached(
                "INSERT INTO events (at, kind, message_id, address, purpose, detail, origin)
                 VALUES (?1, 'decision', ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut message = tx.prepare_cached(
                "INSERT INTO messages (id, sender, purpose, received_at, body)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            // Everyone mailed becomes a contact, so their copy's token can name them.
            let mut contact = tx.prepare_cached(
                "INSERT INTO contacts (address, customer, created_at) VALUES (?1, 0, ?2)
                 ON CONFLICT DO NOTHING",
            )?;
            // A recipient named twice in the envelope gets one copy, not a failed batch.
            let mut delivery = tx.prepare_cached(
                "INSERT INTO deliveries (message_id, recipient, attempts, next_attempt_at)
                 VALUES (?1, ?2, 0, ?3) ON CONFLICT DO NOTHING",
            )?;
            for new in batch {
                let m = &new.message;
                for r in &new.recipients {
                    decision.execute(params![
                        m.received_at,
                        m.id,
                        r.address.as_str(),
                        m.purpose,
                        r.reason,
                        new.origin
                    ])?;
                }
                if new.recipients.iter().any(|r| r.allowed) {
                    message.execute(params![
                        m.id,
                        m.sender,
                        m.purpose,
                        m.received_at,
                        m.body.as_slice()
                    ])?;
                    for r in new.recipients.iter().filter(|r| r.allowed) {
                        contact.execute(params![r.address.as_str(), m.received_at])?;
                        delivery.execute(params![m.id, r.address.as_str(), m.received_at])?;
                    }
                }
            }
            Ok(())
        })
    }

    fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                "SELECT message_id, recipient, attempts, next_attempt_at FROM deliveries
                     ORDER BY next_attempt_at, message_id, recipient",
                [],
                |row| {
                    Ok(PendingDelivery {
                        message_id: row.get(0)?,
                        recipient: row.get(1)?,
                        attempts: row.get(2)?,
                        next_attempt_at: row.get(3)?,
                    })
                },
            )
        })
    }

    fn message(&self, id: &str) -> Result<Option<QueuedMessage>, StoreError> {
        self.read(|conn| {
            let message = conn
                .prepare_cached(
                    "SELECT id, sender, purpose, received_at, body FROM messages WHERE id = ?1",
                )?
                .query_row([id], |row| {
                    Ok(QueuedMessage {
                        id: row.get(0)?,
                        sender: row.get(1)?,
                        purpose: row.get(2)?,
                        received_at: row.get(3)?,
                        body: Arc::new(row.get(4)?),
                    })
                })
                .optional()?;
            Ok(message)
        })
    }

    fn record_outcomes(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut finish = tx.prepare_cached(
                "DELETE FROM deliveries WHERE message_id = ?1 AND recipient = ?2",
            )?;
            let mut reschedule = tx.prepare_cached(
                "UPDATE deliveries
                 SET attempts = attempts + 1, next_attempt_at = ?3, last_error = ?4
                 WHERE message_id = ?1 AND recipient = ?2",
            )?;
            // Read the purpose here, before the message row may be collected below.
            let mut log = tx.prepare_cached(
                "INSERT INTO events (at, kind, message_id, address, purpose, detail)
                 VALUES (?1, ?2, ?3, ?4, (SELECT purpose FROM messages WHERE id = ?3), ?5)",
            )?;
            let mut touched = BTreeSet::new();
            for o in outcomes {
                let (kind, detail) = match &o.kind {
                    OutcomeKind::Delivered { reply } => {
                        finish.execute([&o.message_id, &o.recipient])?;
                        ("delivered", reply)
                    }
                    OutcomeKind::Deferred {
                        next_attempt_at,
                        error,
                    } => {
                        reschedule.execute(params![
                            o.message_id,
                            o.recipient,
                            next_attempt_at,
                            error
                        ])?;
                        ("deferred", error)
                    }
                    OutcomeKind::Failed { error, suppress } => {
                        finish.execute([&o.message_id, &o.recipient])?;
                        if *suppress {
                            upsert_suppression(tx, &o.recipient, HARD_BOUNCE, error, o.at)?;
                        }
                        ("bounced", error)
                    }
                };
                log.execute(params![o.at, kind, o.message_id, o.recipient, detail])?;
                touched.insert(o.message_id.as_str());
            }
            let mut collect = tx.prepare_cached(
                "DELETE FROM messages WHERE id = ?1
                 AND NOT EXISTS (SELECT 1 FROM deliveries WHERE message_id = ?1)",
            )?;
            for id in touched {
                collect.execute([id])?;
            }
            Ok(())
        })
    }

    fn queue(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                "SELECT d.message_id, m.sender, d.recipient, m.purpose, m.received_at,
                            d.attempts, d.next_attempt_at, d.last_error
                     FROM deliveries AS d JOIN messages AS m ON m.id = d.message_id
                     ORDER BY d.next_attempt_at, d.message_id, d.recipient",
                [],
                |row| {
                    Ok(QueueEntry {
                        message_id: row.get(0)?,
                        sender: row.get(1)?,
                        recipient: row.get(2)?,
                        purpose: row.get(3)?,
                        received_at: row.get(4)?,
                        attempts: row.get(5)?,
                        next_attempt_at: row.get(6)?,
                        last_error: row.get(7)?,
                    })
                },
            )
        })
    }

    fn events_for(&self, address: &Address) -> Result<Vec<Event>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                "SELECT id, at, kind, message_id, address, purpose, detail, origin FROM events
                     WHERE address = ?1 ORDER BY id",
                [address.as_str()],
                |row| {
                    Ok(Event {
                        id: row.get(0)?,
                        at: row.get(1)?,
                        kind: row.get(2)?,
                        message_id: row.get(3)?,
                        address: row.get(4)?,
                        purpose: row.get(5)?,
                        detail: row.get(6)?,
                        origin: row.get(7)?,
                    })
                },
            )
        })
    }

    fn events_since(&self, _: i64, _: &[&str], _: usize) -> Result<Vec<Event>, StoreError> {
        todo!("issue 4 store")
    }
    fn webhook_cursor(&self, _: &str) -> Result<i64, StoreError> {
        todo!("issue 4 store")
    }
    fn set_webhook_cursor(&self, _: &str, _: i64) -> Result<(), StoreError> {
        todo!("issue 4 store")
    }
    fn append_consents(&self, _: &[NewConsentEvent]) -> Result<Vec<usize>, StoreError> {
        todo!("issue 4 store")
    }
    fn history_page(&self, _: i64, _: usize) -> Result<Vec<ConsentEvent>, StoreError> {
        todo!("issue 4 store")
    }
    fn contacts_page(&self, _: i64, _: usize) -> Result<Vec<(i64, ContactRecord)>, StoreError> {
        todo!("issue 4 store")
    }
    fn grants_older_than(&self, _: &str, _: i64) -> Result<Vec<Grant>, StoreError> {
        todo!("issue 4 store")
    }
    fn create_signup(&self, _: &NewSignup) -> Result<i64, StoreError> {
        todo!("issue 4 store")
    }
    fn signup(&self, _: i64) -> Result<Option<Signup>, StoreError> {
        todo!("issue 4 store")
    }
    fn confirm_signup(&self, _: i64, _: i64, _: serde_json::Value) -> Result<Confirmation, StoreError> {
        todo!("issue 4 store")
    }
    fn signups_since(&self, _: &Address, _: i64) -> Result<usize, StoreError> {
        todo!("issue 4 store")
    }
    fn forget(&self, _: &Address, _: i64) -> Result<bool, StoreError> {
        todo!("issue 4 store")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConsentAction::{Grant, Withdraw};

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("optgate.db"), true).unwrap()
    }

    fn record(
        store: &SqliteStore,
        address: &str,
        purpose: &str,
        action: ConsentAction,
        at: i64,
    ) -> i64 {
        store
            .append_consent(&NewConsentEvent {
                address: addr(address),
                purpose: purpose.into(),
                action,
                at,
                source: "test".into(),
                evidence: serde_json::json!({ "ip": "192.0.2.1", "wording": "v3" }),
            })
            .unwrap()
    }

    fn message(id: &str, received_at: i64, recipients: &[(&str, bool)]) -> NewMessage {
        NewMessage {
            message: QueuedMessage {
                id: id.into(),
                sender: "news@shop.example".into(),
                purpose: "newsletter".into(),
                received_at,
                body: Arc::new(format!("Subject: {id}\r\n\r\nHello\r\n").into_bytes()),
            },
            recipients: recipients
                .iter()
                .map(|&(a, allowed)| RecipientDecision {
                    address: addr(a),
                    allowed,
                    reason: if allowed {
                        "allowed: consent (consent event 1)".into()
                    } else {
                        "suppressed: no consent".into()
                    },
                })
                .collect(),
            origin: "listmonk@192.0.2.7".into(),
        }
    }

    fn outcome(message_id: &str, recipient: &str, at: i64, kind: OutcomeKind) -> DeliveryOutcome {
        DeliveryOutcome {
            message_id: message_id.into(),
            recipient: recipient.into(),
            at,
            kind,
        }
    }

    fn kinds(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn contacts_have_stable_numbers_and_every_allowed_recipient_becomes_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let a = addr("first@example.com");
        let id = store.contact_id(&a).unwrap();
        assert_eq!(
            store.contact_id(&a).unwrap(),
            id,
            "asking again gives the same number"
        );
        assert_eq!(store.contact_address(id).unwrap(), Some(a));
        assert_eq!(store.contact_address(id + 1000).unwrap(), None);

        store
            .enqueue(&[message(
                "M1",
                10,
                &[("mailed@example.com", true), ("dropped@example.com", false)],
            )])
            .unwrap();
        let mailed = store.contact_id(&addr("mailed@example.com")).unwrap();
        assert_eq!(
            store.contact_address(mailed).unwrap().unwrap().as_str(),
            "mailed@example.com"
        );
        assert!(
            store
                .contact(&addr("dropped@example.com"))
                .unwrap()
                .is_none(),
            "a suppressed recipient is not made a contact"
        );
    }

    #[test]
    fn facts_for_an_unknown_address_are_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let facts = store
            .consent_facts(&[addr("nobody@example.com")], "newsletter")
            .unwrap();
        assert_eq!(facts, vec![ConsentFacts::default()]);
        assert!(store.consent_facts(&[], "newsletter").unwrap().is_empty());
    }

    #[test]
    fn facts_hold_the_newest_event_for_the_purpose_and_for_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let first = record(&store, "ann@example.com", "newsletter", Grant, 100);
        let all = record(&store, "ann@example.com", ALL_PURPOSES, Withdraw, 200);
        // Same second as the withdrawal: only the id can tell which came last.
        let regrant = record(&store, "ann@example.com", "newsletter", Grant, 200);
        let bob = record(&store, "bob@example.com", "newsletter", Withdraw, 300);
        assert!(first < all && all < regrant && regrant < bob);
        store.set_customer(&addr("bob@example.com"), true).unwrap();
        store
            .suppress(
                &addr("bob@example.com"),
                "hard bounce",
                "550 no such user",
                400,
            )
            .unwrap();

        let who = [
            addr("ann@example.com"),
            addr("nobody@example.com"),
            addr("bob@example.com"),
        ];
        let facts = store.consent_facts(&who, "newsletter").unwrap();
        assert_eq!(
            facts,
            vec![
                ConsentFacts {
                    erased: false,
                    customer: false,
                    suppression: None,
                    purpose_event: Some(LatestEvent {
                        id: regrant,
                        action: Grant,
                        at: 200
                    }),
                    all_event: Some(LatestEvent {
                        id: all,
                        action: Withdraw,
                        at: 200
                    }),
                },
                ConsentFacts::default(),
                ConsentFacts {
                    erased: false,
                    customer: true,
                    suppression: Some("hard bounce".into()),
                    purpose_event: Some(LatestEvent {
                        id: bob,
                        action: Withdraw,
                        at: 300
                    }),
                    all_event: None,
                },
            ]
        );

        // Another purpose sees only the "all" withdrawal.
        let offers = store.consent_facts(&who[..1], "offers").unwrap();
        assert_eq!(offers[0].purpose_event, None);
        assert_eq!(
            offers[0].all_event,
            Some(LatestEvent {
                id: all,
                action: Withdraw,
                at: 200
            })
        );
    }

    #[test]
    fn facts_are_index_seeks_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let conn = store.writer.lock().unwrap();
        let plan = rows(
            &conn,
            &format!("EXPLAIN QUERY PLAN {FACTS}"),
            params!["a@example.com", "p", ALL_PURPOSES],
            |row| Ok(row.get::<_, String>(3)?),
        )
        .unwrap();
        // The constant row and its co-routine are the only scans; every table is sought.
        let table_scans = plan.iter().filter(|l| {
            l.starts_with("SCAN ")
                && !l.starts_with("SCAN CONSTANT ROW")
                && !l.starts_with("SCAN (subquery")
        });
        assert_eq!(table_scans.count(), 0, "{plan:#?}");
        let seeks = plan.iter().filter(|l| l.starts_with("SEARCH "));
        assert_eq!(seeks.count(), 6, "{plan:#?}");
    }

    #[test]
    fn history_is_append_only_and_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let before = clock::now();
        let a = record(&store, "ann@example.com", "newsletter", Grant, 1_000);
        // An import of an older event: the history is ordered by id, not by `at`.
        let b = record(&store, "ann@example.com", ALL_PURPOSES, Withdraw, 500);
        let c = record(&store, "ann@example.com", "offers", Grant, 2_000);

        let contact = store.contact(&addr("ann@example.com")).unwrap().unwrap();
        assert_eq!(contact.address, "ann@example.com");
        assert!(!contact.customer);
        assert!(contact.suppression.is_none());
        let ids: Vec<i64> = contact.history.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![a, b, c]);
        let e = &contact.history[1];
        assert_eq!(
            (e.purpose.as_str(), e.action, e.at, e.source.as_str()),
            (ALL_PURPOSES, Withdraw, 500, "test")
        );
        assert!(e.recorded_at >= before && e.recorded_at <= clock::now());
        assert_eq!(
            e.evidence,
            serde_json::json!({ "ip": "192.0.2.1", "wording": "v3" })
        );

        // Not even hand-written SQL may rewrite the proof.
        let raw = Connection::open(dir.path().join("optgate.db")).unwrap();
        let update = raw.execute(
            "UPDATE consent_history SET action = 'grant' WHERE id = ?1",
            [b],
        );
        assert!(update.unwrap_err().to_string().contains("append-only"));
        assert!(raw.execute("DELETE FROM consent_history", []).is_err());
        assert_eq!(
            store
                .contact(&addr("ann@example.com"))
                .unwrap()
                .unwrap()
                .history
                .len(),
            3
        );
    }

    #[test]
    fn corrupt_history_is_reported_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        record(&store, "ann@example.com", "newsletter", Grant, 1);
        let raw = Connection::open(dir.path().join("optgate.db")).unwrap();
        raw.execute_batch(
            "PRAGMA ignore_check_constraints = ON;
             DROP TRIGGER consent_history_no_update;
             UPDATE consent_history SET action = 'maybe';",
        )
        .unwrap();
        let err = store
            .consent_facts(&[addr("ann@example.com")], "newsletter")
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt(ref m) if m.contains("maybe")),
            "{err}"
        );
        assert!(matches!(
            store.contact(&addr("ann@example.com")),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn contacts_customers_and_suppressions() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let carl = addr("carl@example.com");
        assert!(store.contact(&carl).unwrap().is_none());

        // Suppressed but otherwise unknown: still shown, as not a customer.
        store
            .suppress(&carl, "hard bounce", "550 5.1.1 unknown", 10)
            .unwrap();
        store
            .suppress(&carl, "complaint", "abuse report", 20)
            .unwrap();
        let c = store.contact(&carl).unwrap().unwrap();
        assert!(!c.customer && c.history.is_empty());
        let s = c.suppression.unwrap();
        assert_eq!(
            (s.reason.as_str(), s.detail.as_str(), s.at),
            ("complaint", "abuse report", 20)
        );

        store.set_customer(&carl, true).unwrap();
        assert!(store.contact(&carl).unwrap().unwrap().customer);
        assert!(store.unsuppress(&carl).unwrap());
        assert!(!store.unsuppress(&carl).unwrap());
        let c = store.contact(&carl).unwrap().unwrap();
        assert!(c.customer && c.suppression.is_none());
        store.set_customer(&carl, false).unwrap();
        assert!(!store.consent_facts(&[carl], "newsletter").unwrap()[0].customer);
    }

    #[test]
    fn enqueue_keeps_every_decision_and_only_allowed_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let batch = [
            message(
                "M1",
                1_000,
                &[
                    ("ann@example.com", true),
                    ("bob@example.com", false),
                    ("cid@example.com", true),
                ],
            ),
            message(
                "M2",
                900,
                &[("bob@example.com", false), ("dan@example.com", false)],
            ),
            message(
                "M3",
                1_100,
                &[("ann@example.com", true), ("ann@example.com", true)],
            ),
        ];
        store.enqueue(&batch).unwrap();

        let pending = store.pending_deliveries().unwrap();
        let pd = |m: &str, r: &str, next| PendingDelivery {
            message_id: m.into(),
            recipient: r.into(),
            attempts: 0,
            next_attempt_at: next,
        };
        assert_eq!(
            pending,
            vec![
                pd("M1", "ann@example.com", 1_000),
                pd("M1", "cid@example.com", 1_000),
                pd("M3", "ann@example.com", 1_100)
            ]
        );

        let m1 = store.message("M1").unwrap().unwrap();
        assert_eq!(
            (m1.sender.as_str(), m1.purpose.as_str(), m1.received_at),
            ("news@shop.example", "newsletter", 1_000)
        );
        assert_eq!(m1.body.as_slice(), b"Subject: M1\r\n\r\nHello\r\n");
        assert!(
            store.message("M2").unwrap().is_none(),
            "an all-suppressed message stores no body"
        );

        let bob = store.events_for(&addr("bob@example.com")).unwrap();
        assert_eq!(kinds(&bob), vec!["decision", "decision"]);
        assert_eq!(bob[0].message_id.as_deref(), Some("M1"));
        assert_eq!(bob[1].message_id.as_deref(), Some("M2"));
        assert_eq!(
            (bob[1].at, bob[1].purpose.as_deref(), bob[1].detail.as_str()),
            (900, Some("newsletter"), "suppressed: no consent")
        );
        let ann = store.events_for(&addr("ann@example.com")).unwrap();
        assert_eq!(ann.len(), 3);
        assert_eq!(ann[0].detail, "allowed: consent (consent event 1)");
        assert_eq!(store.events_for(&addr("dan@example.com")).unwrap().len(), 1);

        let raw = Connection::open(dir.path().join("optgate.db")).unwrap();
        let origins: i64 = raw
            .query_row(
                "SELECT count(*) FROM events WHERE origin = 'listmonk@192.0.2.7'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(origins, 7);

        let queue = store.queue().unwrap();
        assert_eq!(queue.len(), 3);
        assert_eq!(
            (
                queue[0].message_id.as_str(),
                queue[0].sender.as_str(),
                queue[0].recipient.as_str(),
                queue[0].purpose.as_str()
            ),
            ("M1", "news@shop.example", "ann@example.com", "newsletter")
        );
        assert_eq!(
            (
                queue[0].received_at,
                queue[0].attempts,
                queue[0].last_error.as_deref()
            ),
            (1_000, 0, None)
        );
    }

    #[test]
    fn a_failing_batch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .enqueue(&[message("M1", 1, &[("ann@example.com", true)])])
            .unwrap();
        let again = [
            message("M2", 2, &[("bob@example.com", true)]),
            message("M1", 3, &[("cid@example.com", true)]),
        ];
        assert!(matches!(
            store.enqueue(&again),
            Err(StoreError::Database(_))
        ));
        assert!(store.message("M2").unwrap().is_none());
        assert!(
            store
                .events_for(&addr("bob@example.com"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.pending_deliveries().unwrap().len(), 1);
    }

    #[test]
    fn outcomes_finish_reschedule_bounce_and_collect_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let to = [
            ("ann@example.com", true),
            ("bob@example.com", true),
            ("cid@example.com", true),
            ("dan@example.com", true),
        ];
        store.enqueue(&[message("M1", 1_000, &to)]).unwrap();

        store
            .record_outcomes(&[
                outcome(
                    "M1",
                    "ann@example.com",
                    1_010,
                    OutcomeKind::Delivered {
                        reply: "250 2.0.0 queued as X".into(),
                    },
                ),
                outcome(
                    "M1",
                    "bob@example.com",
                    1_011,
                    OutcomeKind::Deferred {
                        next_attempt_at: 1_600,
                        error: "451 4.7.1 greylisted".into(),
                    },
                ),
                outcome(
                    "M1",
                    "cid@example.com",
                    1_012,
                    OutcomeKind::Failed {
                        error: "550 5.1.1 no such user".into(),
                        suppress: true,
                    },
                ),
                outcome(
                    "M1",
                    "dan@example.com",
                    1_013,
                    OutcomeKind::Failed {
                        error: "expired after 5 days".into(),
                        suppress: false,
                    },
                ),
            ])
            .unwrap();

        let pending = store.pending_deliveries().unwrap();
        assert_eq!(
            pending,
            vec![PendingDelivery {
                message_id: "M1".into(),
                recipient: "bob@example.com".into(),
                attempts: 1,
                next_attempt_at: 1_600
            }]
        );
        assert_eq!(
            store.queue().unwrap()[0].last_error.as_deref(),
            Some("451 4.7.1 greylisted")
        );
        assert!(
            store.message("M1").unwrap().is_some(),
            "bob still needs the body"
        );

        let ann = store.events_for(&addr("ann@example.com")).unwrap();
        assert_eq!(kinds(&ann), vec!["decision", "delivered"]);
        assert_eq!(
            (ann[1].at, ann[1].purpose.as_deref(), ann[1].detail.as_str()),
            (1_010, Some("newsletter"), "250 2.0.0 queued as X")
        );
        assert_eq!(
            kinds(&store.events_for(&addr("bob@example.com")).unwrap()),
            vec!["decision", "deferred"]
        );
        let cid = store.events_for(&addr("cid@example.com")).unwrap();
        assert_eq!(kinds(&cid), vec!["decision", "bounced"]);
        assert_eq!(cid[1].detail, "550 5.1.1 no such user");

        let facts = store
            .consent_facts(
                &[addr("cid@example.com"), addr("dan@example.com")],
                "newsletter",
            )
            .unwrap();
        assert_eq!(facts[0].suppression.as_deref(), Some("hard bounce"));
        assert_eq!(
            facts[1].suppression, None,
            "an expiry is no reason to suppress"
        );
        let s = store
            .contact(&addr("cid@example.com"))
            .unwrap()
            .unwrap()
            .suppression
            .unwrap();
        assert_eq!((s.detail.as_str(), s.at), ("550 5.1.1 no such user", 1_012));

        // A second deferral counts up; the last delivery collects the message.
        let retry = OutcomeKind::Deferred {
            next_attempt_at: 2_000,
            error: "421 try later".into(),
        };
        store
            .record_outcomes(&[outcome("M1", "bob@example.com", 1_600, retry)])
            .unwrap();
        assert_eq!(store.pending_deliveries().unwrap()[0].attempts, 2);
        store
            .record_outcomes(&[outcome(
                "M1",
                "bob@example.com",
                2_000,
                OutcomeKind::Delivered {
                    reply: "250 ok".into(),
                },
            )])
            .unwrap();
        assert!(store.pending_deliveries().unwrap().is_empty());
        assert!(store.message("M1").unwrap().is_none());
        let bob = store.events_for(&addr("bob@example.com")).unwrap();
        assert_eq!(
            kinds(&bob),
            vec!["decision", "deferred", "deferred", "delivered"]
        );
        assert_eq!(
            bob[3].purpose.as_deref(),
            Some("newsletter"),
            "the purpose is read before the message goes"
        );
    }

    #[test]
    fn the_queue_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optgate.db");
        let store = SqliteStore::open(&path, true).unwrap();
        store
            .enqueue(&[message(
                "M1",
                5,
                &[("ann@example.com", true), ("bob@example.com", true)],
            )])
            .unwrap();
        store
            .enqueue(&[message("M2", 3, &[("cid@example.com", true)])])
            .unwrap();
        let deferred = OutcomeKind::Deferred {
            next_attempt_at: 50,
            error: "451".into(),
        };
        store
            .record_outcomes(&[outcome("M1", "ann@example.com", 6, deferred)])
            .unwrap();
        let before = store.pending_deliveries().unwrap();
        drop(store);

        let store = SqliteStore::open(&path, true).unwrap();
        let after = store.pending_deliveries().unwrap();
        assert_eq!(after, before);
        assert_eq!(
            after
                .iter()
                .map(|p| (p.message_id.as_str(), p.recipient.as_str(), p.attempts))
                .collect::<Vec<_>>(),
            vec![
                ("M2", "cid@example.com", 0),
                ("M1", "bob@example.com", 0),
                ("M1", "ann@example.com", 1)
            ]
        );
        assert_eq!(
            store.message("M1").unwrap().unwrap().body.as_slice(),
            b"Subject: M1\r\n\r\nHello\r\n"
        );
        let raw = Connection::open(&path).unwrap();
        let version: usize = raw
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn a_file_from_a_newer_release_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optgate.db");
        drop(SqliteStore::open(&path, false).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteStore::open(&path, false).err().unwrap();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[test]
    fn the_cli_writes_while_serve_has_the_file_open() {
        let dir = tempfile::tempdir().unwrap();
        let serve = Arc::new(open(&dir));
        let ann = [addr("ann@example.com")];
        // Warm serve's reader pool first: a pooled reader must still see later commits.
        assert_eq!(
            serve.consent_facts(&ann, "newsletter").unwrap()[0],
            ConsentFacts::default()
        );

        let cli = open(&dir);
        let id = record(&cli, "ann@example.com", "newsletter", Grant, 7);
        cli.suppress(&ann[0], "manual", "asked by phone", 8)
            .unwrap();
        let facts = &serve.consent_facts(&ann, "newsletter").unwrap()[0];
        assert_eq!(
            facts.purpose_event,
            Some(LatestEvent {
                id,
                action: Grant,
                at: 7
            })
        );
        assert_eq!(facts.suppression.as_deref(), Some("manual"));
        assert!(serve.unsuppress(&ann[0]).unwrap());
        assert!(cli.contact(&ann[0]).unwrap().unwrap().suppression.is_none());

        // Both processes writing at once: the busy timeout makes them take turns.
        let spool = {
            let serve = serve.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    serve
                        .enqueue(&[message(&format!("S{i}"), i, &[("bob@example.com", true)])])
                        .unwrap();
                    serve
                        .consent_facts(&[addr("bob@example.com")], "newsletter")
                        .unwrap();
                }
            })
        };
        for i in 0..50 {
            record(
                &cli,
                "cid@example.com",
                "newsletter",
                if i % 2 == 0 { Grant } else { Withdraw },
                i,
            );
        }
        spool.join().unwrap();
        assert_eq!(serve.pending_deliveries().unwrap().len(), 50);
        assert_eq!(cli.queue().unwrap().len(), 50);
        let cid = serve.contact(&addr("cid@example.com")).unwrap().unwrap();
        assert_eq!(cid.history.len(), 50);
        let latest = &serve
            .consent_facts(&[addr("cid@example.com")], "newsletter")
            .unwrap()[0];
        assert_eq!(
            latest.purpose_event.as_ref().map(|e| (e.id, e.action)),
            cid.history.last().map(|e| (e.id, Withdraw))
        );
    }
}
