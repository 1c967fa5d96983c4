//! The embedded default backend: one SQLite file in WAL mode, one writer connection
//! and a small pool of read-only ones, so policy lookups never wait behind a commit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{
    Connection, DatabaseName, OpenFlags, OptionalExtension, Params, Row, Transaction,
    TransactionBehavior, params,
};

use ring::hmac;

use super::*;
use crate::clock;

/// The schema, one entry per version: `PRAGMA user_version` counts the entries
/// applied, so a later release appends an entry and older files catch up on open.
const MIGRATIONS: &[&str] = &[
    r"
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
",
    r"
    -- Contact numbers go into unsubscribe and preference links, so a forgotten
    -- contact's number must never name someone else: AUTOINCREMENT. SQLite cannot add
    -- it in place, so the table is copied (foreign keys are off while migrating).
    CREATE TABLE contacts_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        address TEXT NOT NULL UNIQUE,
        customer INTEGER NOT NULL DEFAULT 0 CHECK (customer IN (0, 1)),
        created_at INTEGER NOT NULL
    );
    INSERT INTO contacts_v2 (id, address, customer, created_at)
        SELECT id, address, customer, created_at FROM contacts ORDER BY id;
    DROP TABLE contacts;
    ALTER TABLE contacts_v2 RENAME TO contacts;

    -- People who asked to be forgotten, as a keyed hash of their address (the key is
    -- a file beside the database): enough to refuse them again, not to name them.
    CREATE TABLE erasures (
        hash BLOB PRIMARY KEY NOT NULL,
        at INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Erasure is the one way out of the append-only history: `forget` names the
    -- address here, deletes its history and empties this table, in one transaction.
    CREATE TABLE forgetting (address TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
    DROP TRIGGER IF EXISTS consent_history_no_delete;
    CREATE TRIGGER consent_history_no_delete BEFORE DELETE ON consent_history
    WHEN OLD.address NOT IN (SELECT address FROM forgetting)
    BEGIN SELECT RAISE(ABORT, 'the consent history is append-only'); END;

    -- The feed of the admin API and of webhooks filters by kind: each kind is then a
    -- range of this index, however many decisions lie in between.
    CREATE INDEX events_kind ON events (kind, id);

    -- Per webhook URL, the last event it acknowledged.
    CREATE TABLE webhook_cursors (
        url TEXT PRIMARY KEY NOT NULL,
        event_id INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Double opt-in sign-ups. The id goes into the confirmation link: AUTOINCREMENT
    -- so that a link never confirms a later sign-up. `purposes` and `evidence` are JSON.
    CREATE TABLE signups (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        address TEXT NOT NULL,
        purposes TEXT NOT NULL,
        source TEXT NOT NULL,
        wording_version TEXT NOT NULL,
        evidence TEXT NOT NULL,
        at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        confirmed_at INTEGER
    );
    CREATE INDEX signups_address ON signups (address, at);
",
    r"
    -- Always empty between transactions: `forget` fills the file's free pages with
    -- rows of zeros here and deletes them again (see `scrub_free_pages`).
    CREATE TABLE scrub (fill BLOB NOT NULL);
",
];

/// Long enough to ride out the other process's commit (the CLI writing while `serve`
/// runs, or the reverse), short enough that a stuck lock surfaces as an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The writer's page cache, in KiB (SQLite reads a negative `cache_size` as KiB).
const WRITER_CACHE_KIB: i64 = -65_536;
/// Message bytes in one enqueue beyond which the writer's cache is emptied after it.
const LARGE_BATCH_BYTES: usize = 8 << 20;

/// Log size, in pages (32 MiB of 4 KiB pages), from which a commit copies the log into
/// the file: SQLite's default of 1 000 pages checkpointed every ~70 newsletters,
/// each time with two fsyncs and a write of every page changed since. A larger window
/// writes a page reused within it (a queued body's pages, the queue's b-tree pages)
/// once rather than once per checkpoint. The log then peaks at this size plus the
/// transaction that crosses it, unless a reader keeps a checkpoint from completing or
/// a transaction is larger itself (an import): see [`WAL_SIZE_LIMIT`].
const WAL_AUTOCHECKPOINT_PAGES: i64 = 8_192;
/// Bytes the log file is cut back to when it starts over after a checkpoint, so that
/// a burst (an import, a long read) does not leave a huge file behind. Above the
/// usual peak, so that the log is not truncated and grown again in steady state.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Readers kept open between calls; more are opened under a burst and closed after.
const MAX_IDLE_READERS: usize = 4;

/// The hot path, once per recipient: the scalar subqueries are primary-key seeks and
/// each `max(id)` is one seek into `consent_history_latest`; the constant row makes
/// an unknown address come back as one row of NULLs rather than no row. ?4 is the
/// address's keyed hash, looked up on the erasure list.
const FACTS: &str = "
    SELECT (SELECT customer FROM contacts WHERE address = ?1),
           (SELECT reason FROM suppressions WHERE address = ?1),
           p.id, p.action, p.at, a.id, a.action, a.at,
           EXISTS (SELECT 1 FROM erasures WHERE hash = ?4)
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

/// The decision logged for a recipient the policy allowed but who was forgotten
/// before the message was committed; it reads as the policy's own refusal of an
/// erased person (`policy::SuppressReason::Erased`).
const ERASED_SINCE_DECIDED: &str = "suppressed: erased";

/// The erasure key lives at `{database}{ERASURE_KEY_SUFFIX}`.
pub const ERASURE_KEY_SUFFIX: &str = ".erasure-key";

/// The source of sign-up confirmations that name none.
const DOUBLE_OPT_IN: &str = "double-opt-in";

pub struct SqliteStore {
    path: PathBuf,
    /// Keys the hashes on the erasure list (from `{database}.erasure-key`).
    erasure_key: hmac::Key,
    // Declared before the writer so the readers close first, and the writer, closing
    // last, can checkpoint and remove the WAL file.
    readers: Mutex<Vec<Connection>>,
    writer: Mutex<Connection>,
    /// Commits are fsync'd (`storage.fsync`), but for delivery outcomes: see
    /// [`SqliteStore::record_outcomes`].
    fsync: bool,
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
        // A large transaction (an import) whose pages outgrow the cache spills them to
        // the log mid-way, and writes them again at commit: give the writer room.
        writer.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
        writer.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        writer.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        // Deleted rows are overwritten with zeros, and so are the pages they free:
        // a forgotten person must not be recoverable from the file. The one exception,
        // delivered bodies, is in `record_outcomes`; `forget` scrubs what it leaves.
        writer.pragma_update(None, "secure_delete", true)?;
        // Foreign keys are switched on after migrating: a migration that copies a
        // table (SQLite's way to change one) must not have them enforced midway. (The
        // bundled SQLite enables them by default, so say it.)
        writer.pragma_update(None, "foreign_keys", false)?;
        migrate(&mut writer)?;
        writer.pragma_update(None, "foreign_keys", true)?;
        let erasure_key = erasure_key(path, &writer)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            erasure_key,
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(writer),
            fsync,
        })
    }

    /// Runs `f` in one IMMEDIATE transaction: taking the write lock up front means a
    /// second process makes us wait (busy timeout) instead of failing mid-transaction.
    /// The writer connection, set to sync its next commit or not (when
    /// `storage.fsync` is on): every user says, so that a commit left unsynced never
    /// leaves the next one so.
    fn writer(&self, synced: bool) -> Result<MutexGuard<'_, Connection>, StoreError> {
        let conn = self
            .writer
            .lock()
            .map_err(|_| poisoned("writer connection"))?;
        if self.fsync {
            set(
                &conn,
                if synced {
                    "PRAGMA synchronous = FULL"
                } else {
                    "PRAGMA synchronous = NORMAL"
                },
            )?;
        }
        Ok(conn)
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_as(true, f)
    }

    /// The number `select` finds for `key`: on a reader when the row exists (the
    /// usual case, which then takes no write lock), else after `insert` made it (it
    /// must do nothing if another writer came first), read back in the same write.
    fn read_or_insert(
        &self,
        select: &str,
        key: &str,
        insert: impl FnOnce(&Transaction<'_>) -> Result<(), StoreError>,
    ) -> Result<i64, StoreError> {
        let known = self.read(|conn| {
            Ok(conn
                .prepare_cached(select)?
                .query_row([key], |row| row.get(0))
                .optional()?)
        })?;
        if let Some(value) = known {
            return Ok(value);
        }
        self.write(|tx| {
            insert(tx)?;
            Ok(tx
                .prepare_cached(select)?
                .query_row([key], |row| row.get(0))?)
        })
    }

    /// [`Self::write`] without the fsync at commit: the transaction reaches the disk
    /// with the next fsync'd commit or checkpoint. An application crash loses nothing
    /// (the log is in the OS's cache); a power cut may lose it.
    fn write_unsynced<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_as(false, f)
    }

    fn write_as<T>(
        &self,
        synced: bool,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer(synced)?;
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

    /// The keyed hash under which `address` (normalised) sits on the erasure list.
    fn erasure_hash(&self, address: &str) -> hmac::Tag {
        hmac::sign(&self.erasure_key, address.as_bytes())
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
        // Foreign keys were not enforced while migrating: check them before committing.
        let broken: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |row| row.get(0))
            .optional()?;
        if let Some(table) = broken {
            return Err(StoreError::Corrupt(format!(
                "a row of {table} refers to a missing row after migrating the schema"
            )));
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    }
    tx.commit()?;
    Ok(())
}

/// Reads the erasure key beside the database at `path`, creating it (32 random bytes
/// in hex, mode 0600) for a new database. A database that already has erasures but
/// no key is refused: a new key would silently let every forgotten person back in.
fn erasure_key(path: &Path, conn: &Connection) -> Result<hmac::Key, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.as_os_str().to_owned();
    name.push(ERASURE_KEY_SUFFIX);
    let key_path = PathBuf::from(name);
    let io = |e: std::io::Error| StoreError::Database(format!("{}: {e}", key_path.display()));
    match std::fs::read_to_string(&key_path) {
        Ok(text) => {
            let bytes = decode_hex(text.trim())
                .filter(|b| b.len() == 32)
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "{}: not a key (64 hexadecimal digits expected)",
                        key_path.display()
                    ))
                })?;
            return Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let held: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM erasures)", [], |row| {
        row.get(0)
    })?;
    if held {
        return Err(StoreError::Corrupt(format!(
            "{} is missing but the database holds erasures: restore it from a backup \
             (without it, forgotten people could be mailed again)",
            key_path.display()
        )));
    }
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| StoreError::Internal("no randomness for the erasure key".into()))?;
    let text: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    // Written whole under a temporary name, then linked into place: a second process
    // opening the same new database either wins the link or reads the winner's key.
    let mut tmp = key_path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut file, format!("{text}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, &key_path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(hmac::Key::new(hmac::HMAC_SHA256, &secret)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => erasure_key(path, conn),
        Err(e) => Err(io(e)),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
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
        erased: row.get(8)?,
        suppression: row.get(1)?,
        purpose_event: latest(row, 2)?,
        all_event: latest(row, 5)?,
    })
}

/// The columns [`consent_event`] reads, in its order.
const HISTORY_COLUMNS: &str = "id, address, purpose, action, at, recorded_at, source, evidence";

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

fn is_erased(conn: &Connection, hash: &hmac::Tag) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM erasures WHERE hash = ?1)")?
        .query_row([hash.as_ref()], |row| row.get(0))?)
}

fn json_text(value: &serde_json::Value) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Internal(format!("cannot serialise JSON: {e}")))
}

fn json_column(row: &Row<'_>, idx: usize, what: &str) -> Result<serde_json::Value, StoreError> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{what} is not JSON: {e}")))
}

/// Appends one consent event (creating the contact if new) and its entry in the event
/// log, inside the caller's transaction; returns the history id. `now` is when it
/// was recorded.
fn insert_consent(tx: &Connection, event: &NewConsentEvent, now: i64) -> Result<i64, StoreError> {
    let address = event.address.as_str();
    tx.prepare_cached(
        "INSERT INTO contacts (address, customer, created_at) VALUES (?1, 0, ?2)
         ON CONFLICT (address) DO NOTHING",
    )?
    .execute(params![address, now])?;
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO consent_history
             (address, purpose, action, at, recorded_at, source, evidence)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        )?
        .query_row(
            params![
                address,
                event.purpose,
                event.action.as_str(),
                event.at,
                now,
                event.source,
                json_text(&event.evidence)?
            ],
            |row| row.get(0),
        )?;
    let kind = match event.action {
        ConsentAction::Grant => EVENT_CONSENT_GRANTED,
        ConsentAction::Withdraw => EVENT_CONSENT_WITHDRAWN,
    };
    tx.prepare_cached(
        "INSERT INTO events (at, kind, message_id, address, purpose, detail, origin)
         VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        event.at,
        kind,
        address,
        event.purpose,
        id.to_string(),
        event.source
    ])?;
    Ok(id)
}

/// The columns [`event`] reads, in its order.
const EVENT_COLUMNS: &str = "id, at, kind, message_id, address, purpose, detail, origin";

fn event(row: &Row<'_>) -> Result<Event, StoreError> {
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
}

/// The columns [`signup`] reads, in its order.
const SIGNUP_COLUMNS: &str =
    "id, address, purposes, source, wording_version, evidence, at, expires_at, confirmed_at";

fn signup(row: &Row<'_>) -> Result<Signup, StoreError> {
    let id: i64 = row.get(0)?;
    let purposes = json_column(row, 2, &format!("sign-up {id}: purposes"))?;
    Ok(Signup {
        id,
        address: row.get(1)?,
        purposes: serde_json::from_value(purposes).map_err(|e| {
            StoreError::Corrupt(format!("sign-up {id}: purposes are not a list: {e}"))
        })?,
        source: row.get(3)?,
        wording_version: row.get(4)?,
        evidence: json_column(row, 5, &format!("sign-up {id}: evidence"))?,
        at: row.get(6)?,
        expires_at: row.get(7)?,
        confirmed_at: row.get(8)?,
    })
}

fn find_signup(conn: &Connection, id: i64) -> Result<Option<Signup>, StoreError> {
    let found = rows(
        conn,
        &format!("SELECT {SIGNUP_COLUMNS} FROM signups WHERE id = ?1"),
        [id],
        signup,
    )?;
    Ok(found.into_iter().next())
}

/// The history of one address, oldest first.
fn history_of(conn: &Connection, address: &str) -> Result<Vec<ConsentEvent>, StoreError> {
    rows(
        conn,
        &format!("SELECT {HISTORY_COLUMNS} FROM consent_history WHERE address = ?1 ORDER BY id"),
        [address],
        consent_event,
    )
}

/// A `usize` limit as SQLite takes it.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
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
                    let hash = self.erasure_hash(a.as_str());
                    stmt.query_row(
                        params![a.as_str(), purpose, ALL_PURPOSES, hash.as_ref()],
                        |row| Ok(facts(row)),
                    )?
                })
                .collect()
        })
    }

    fn append_consent(&self, event: &NewConsentEvent) -> Result<i64, StoreError> {
        let hash = self.erasure_hash(event.address.as_str());
        let now = clock::now();
        self.write(|tx| {
            if is_erased(tx, &hash)? {
                return Err(StoreError::Erased);
            }
            insert_consent(tx, event, now)
        })
    }

    fn set_customer(&self, address: &Address, customer: bool) -> Result<(), StoreError> {
        let hash = self.erasure_hash(address.as_str());
        self.write(|tx| {
            if is_erased(tx, &hash)? {
                return Err(StoreError::Erased);
            }
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
            let history = history_of(&tx, addr)?;
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
        let hash = self.erasure_hash(address.as_str());
        self.write(|tx| {
            if is_erased(tx, &hash)? {
                return Err(StoreError::Erased);
            }
            upsert_suppression(tx, address.as_str(), reason, detail, at)
        })
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
        self.read_or_insert(
            "SELECT id FROM contacts WHERE address = ?1",
            address.as_str(),
            |tx| {
                tx.prepare_cached(
                    "INSERT INTO contacts (address, customer, created_at) VALUES (?1, 0, ?2)
                     ON CONFLICT DO NOTHING",
                )?
                .execute(params![address.as_str(), clock::now()])?;
                Ok(())
            },
        )
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

    fn enqueue(&self, batch: &[NewMessage]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Anyone may have been forgotten, even since the policy allowed them (a
        // `forget` between the end of DATA and this commit): their decision is logged
        // without the address, as the forgetting itself is, and they are not queued.
        let hashes: Vec<Vec<hmac::Tag>> = batch
            .iter()
            .map(|new| {
                new.recipients
                    .iter()
                    .map(|r| self.erasure_hash(r.address.as_str()))
                    .collect()
            })
            .collect();
        let written = self.write(|tx| {
            let mut decision = tx.prepare_cached(
                "INSERT INTO events (at, kind, message_id, address, purpose, detail, origin)
                 VALUES (?1, 'decision', ?2, ?3, ?4, ?5, ?6)",
            )?;
            // The body is written into its row in place (below): bound as a value,
            // SQLite would copy it whole, and again into the row's record.
            let mut message = tx.prepare_cached(
                "INSERT INTO messages (id, sender, purpose, received_at, body)
                 VALUES (?1, ?2, ?3, ?4, zeroblob(?5))",
            )?;
            // Everyone mailed becomes a contact, so their copy's token can name them.
            let mut contact = tx.prepare_cached(
                "INSERT INTO contacts (address, customer, created_at) VALUES (?1, 0, ?2)
                 ON CONFLICT DO NOTHING",
            )?;
            let mut contact_id = tx.prepare_cached("SELECT id FROM contacts WHERE address = ?1")?;
            // A recipient named twice in the envelope gets one copy, not a failed batch.
            let mut delivery = tx.prepare_cached(
                "INSERT INTO deliveries (message_id, recipient, attempts, next_attempt_at)
                 VALUES (?1, ?2, 0, ?3) ON CONFLICT DO NOTHING",
            )?;
            let mut queued = Vec::with_capacity(batch.len());
            for (new, hashes) in batch.iter().zip(&hashes) {
                let m = &new.message;
                let mut to = Vec::new();
                for (r, hash) in new.recipients.iter().zip(hashes) {
                    let erased = is_erased(tx, hash)?;
                    let (named, reason) = match (erased, r.allowed) {
                        (false, _) => (r.address.as_str(), r.reason.as_str()),
                        (true, false) => ("", r.reason.as_str()),
                        (true, true) => ("", ERASED_SINCE_DECIDED),
                    };
                    decision.execute(params![
                        m.received_at,
                        m.id,
                        named,
                        m.purpose,
                        reason,
                        new.origin
                    ])?;
                    if r.allowed && !erased {
                        to.push(r.address.as_str());
                    }
                }
                let mut ids = Vec::with_capacity(to.len());
                if !to.is_empty() {
                    let size = i64::try_from(m.body.len())
                        .map_err(|_| StoreError::Internal("message too large".into()))?;
                    message.execute(params![m.id, m.sender, m.purpose, m.received_at, size])?;
                    tx.blob_open(
                        DatabaseName::Main,
                        "messages",
                        "body",
                        tx.last_insert_rowid(),
                        false,
                    )?
                    .write_at(&m.body, 0)?;
                    for address in to {
                        contact.execute(params![address, m.received_at])?;
                        let id = contact_id.query_row([address], |row| row.get(0))?;
                        delivery.execute(params![m.id, address, m.received_at])?;
                        ids.push((address.to_string(), id));
                    }
                }
                queued.push(ids);
            }
            Ok(queued)
        });
        // The writer's cache is large for imports; after a large message, its pages
        // would stay in memory beside the queued body for as long as it is delivered.
        if batch.iter().map(|m| m.message.body.len()).sum::<usize>() > LARGE_BATCH_BYTES
            && let Ok(conn) = self.writer.lock()
        {
            let _ = conn.execute_batch("PRAGMA shrink_memory");
        }
        written
    }

    fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                "SELECT d.message_id, d.recipient, c.id, d.attempts, d.next_attempt_at
                     FROM deliveries d LEFT JOIN contacts c ON c.address = d.recipient
                     ORDER BY d.next_attempt_at, d.message_id, d.recipient",
                [],
                |row| {
                    Ok(PendingDelivery {
                        message_id: row.get(0)?,
                        recipient: row.get(1)?,
                        contact: row.get(2)?,
                        attempts: row.get(3)?,
                        next_attempt_at: row.get(4)?,
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
        // A delivery in flight when its recipient was forgotten comes back here: its
        // result is not logged, so the address is not written again.
        let hashes: Vec<hmac::Tag> = outcomes
            .iter()
            .map(|o| self.erasure_hash(&o.recipient))
            .collect();
        // Not fsync'd: a result lost to a power cut leaves its delivery pending, and
        // it is tried again (a copy may arrive twice), which is what any MTA does
        // (Postfix does not fsync a delivered message's removal either). What must
        // not be lost, the messages accepted with a 250, is always fsync'd.
        self.write_unsynced(|tx| {
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
            for (o, hash) in outcomes.iter().zip(&hashes) {
                let erased = is_erased(tx, hash)?;
                let (kind, detail) = match &o.kind {
                    OutcomeKind::Delivered { reply } => {
                        finish.execute([&o.message_id, &o.recipient])?;
                        (EVENT_DELIVERED, reply)
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
                        (EVENT_DEFERRED, error)
                    }
                    OutcomeKind::Failed { error, suppress } => {
                        finish.execute([&o.message_id, &o.recipient])?;
                        if *suppress && !erased {
                            upsert_suppression(tx, &o.recipient, HARD_BOUNCE, error, o.at)?;
                            // Before the bounce itself, so the bounce stays the last
                            // word about the delivery.
                            log.execute(params![
                                o.at,
                                EVENT_SUPPRESSION_ADDED,
                                o.message_id,
                                o.recipient,
                                error
                            ])?;
                        }
                        (EVENT_BOUNCED, error)
                    }
                };
                if !erased {
                    log.execute(params![o.at, kind, o.message_id, o.recipient, detail])?;
                }
                touched.insert(o.message_id.as_str());
            }
            collect_messages(tx, touched)
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
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE address = ?1 ORDER BY id"),
                [address.as_str()],
                event,
            )
        })
    }

    fn events_since(
        &self,
        after: i64,
        kinds: &[&str],
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let limit = sql_limit(limit);
        if kinds.is_empty() {
            return self.read(|conn| {
                rows(
                    conn,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 ORDER BY id LIMIT ?2"
                    ),
                    params![after, limit],
                    event,
                )
            });
        }
        // One range of `events_kind` per kind, each cut at the limit, then merged:
        // a rare kind is found without walking the decisions in between.
        let mut kinds: Vec<&str> = kinds.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        let sql = (0..kinds.len())
            .map(|i| {
                format!(
                    "SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events
                     WHERE kind = ?{} AND id > ?1 ORDER BY id LIMIT ?2)",
                    i + 3
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
            + " ORDER BY id LIMIT ?2";
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&after, &limit];
        values.extend(kinds.iter().map(|k| k as &dyn rusqlite::ToSql));
        self.read(|conn| rows(conn, &sql, values.as_slice(), event))
    }

    fn webhook_cursor_or_start(&self, url: &str, from_now: bool) -> Result<i64, StoreError> {
        // Recorded at once, so that a URL started "now" keeps its place across restarts
        // instead of moving on to whatever is newest at each start.
        self.read_or_insert(
            "SELECT event_id FROM webhook_cursors WHERE url = ?1",
            url,
            |tx| {
                tx.prepare_cached(
                    "INSERT INTO webhook_cursors (url, event_id) VALUES (?1,
                        CASE WHEN ?2 THEN (SELECT coalesce(max(id), 0) FROM events) ELSE 0 END)
                     ON CONFLICT (url) DO NOTHING",
                )?
                .execute(params![url, from_now])?;
                Ok(())
            },
        )
    }

    fn set_webhook_cursor(&self, url: &str, event_id: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO webhook_cursors (url, event_id) VALUES (?1, ?2)
                 ON CONFLICT (url) DO UPDATE SET event_id = excluded.event_id",
            )?
            .execute(params![url, event_id])?;
            Ok(())
        })
    }

    fn append_consents(&self, events: &[NewConsentEvent]) -> Result<Vec<usize>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Hashing needs no lock: do it before taking the writer.
        let hashes: Vec<hmac::Tag> = events
            .iter()
            .map(|e| self.erasure_hash(e.address.as_str()))
            .collect();
        let now = clock::now();
        self.write(|tx| {
            let mut refused = Vec::new();
            for (i, (event, hash)) in events.iter().zip(&hashes).enumerate() {
                if is_erased(tx, hash)? {
                    refused.push(i);
                } else {
                    insert_consent(tx, event, now)?;
                }
            }
            Ok(refused)
        })
    }

    fn history_page(&self, after: i64, limit: usize) -> Result<Vec<ConsentEvent>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                &format!(
                    "SELECT {HISTORY_COLUMNS} FROM consent_history WHERE id > ?1 ORDER BY id LIMIT ?2"
                ),
                params![after, sql_limit(limit)],
                consent_event,
            )
        })
    }

    fn contacts_page(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, ContactRecord)>, StoreError> {
        self.read(|conn| {
            // One snapshot for the page and every history in it.
            let tx = conn.unchecked_transaction()?;
            let mut page = rows(
                &tx,
                "SELECT c.id, c.address, c.customer, s.reason, s.detail, s.at
                     FROM contacts AS c LEFT JOIN suppressions AS s ON s.address = c.address
                     WHERE c.id > ?1 ORDER BY c.id LIMIT ?2",
                params![after, sql_limit(limit)],
                |row| {
                    let suppression = match row.get::<_, Option<String>>(3)? {
                        Some(reason) => Some(Suppression {
                            reason,
                            detail: row.get(4)?,
                            at: row.get(5)?,
                        }),
                        None => None,
                    };
                    Ok((
                        row.get::<_, i64>(0)?,
                        ContactRecord {
                            address: row.get(1)?,
                            customer: row.get(2)?,
                            suppression,
                            history: Vec::new(),
                        },
                    ))
                },
            )?;
            for (_, contact) in &mut page {
                contact.history = history_of(&tx, &contact.address)?;
            }
            tx.commit()?;
            Ok(page)
        })
    }

    fn grants_older_than(
        &self,
        purpose: &str,
        granted_at_or_before: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        // A grant is current when nothing newer was said for its purpose, nor a
        // withdrawal from everything.
        self.read(|conn| {
            rows(
                conn,
                "SELECT h.address, h.purpose, h.id, h.at FROM consent_history AS h
                     WHERE h.purpose = ?1 AND h.action = 'grant' AND h.at <= ?2
                     AND h.id = (SELECT max(id) FROM consent_history
                                 WHERE address = h.address AND purpose = ?1)
                     AND NOT EXISTS (SELECT 1 FROM consent_history
                                     WHERE address = h.address AND purpose = ?3
                                     AND action = 'withdraw' AND id > h.id)
                     ORDER BY h.at, h.id",
                params![purpose, granted_at_or_before, ALL_PURPOSES],
                |row| {
                    Ok(Grant {
                        address: row.get(0)?,
                        purpose: row.get(1)?,
                        event_id: row.get(2)?,
                        at: row.get(3)?,
                    })
                },
            )
        })
    }

    fn create_signup(&self, new: &NewSignup) -> Result<i64, StoreError> {
        let hash = self.erasure_hash(new.address.as_str());
        let purposes = serde_json::to_string(&new.purposes)
            .map_err(|e| StoreError::Internal(format!("cannot serialise the purposes: {e}")))?;
        let evidence = json_text(&new.evidence)?;
        self.write(|tx| {
            if is_erased(tx, &hash)? {
                return Err(StoreError::Erased);
            }
            Ok(tx
                .prepare_cached(
                    "INSERT INTO signups
                     (address, purposes, source, wording_version, evidence, at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                )?
                .query_row(
                    params![
                        new.address.as_str(),
                        purposes,
                        new.source,
                        new.wording_version,
                        evidence,
                        new.at,
                        new.expires_at
                    ],
                    |row| row.get(0),
                )?)
        })
    }

    fn signup(&self, id: i64) -> Result<Option<Signup>, StoreError> {
        self.read(|conn| find_signup(conn, id))
    }

    fn confirm_signup(
        &self,
        id: i64,
        at: i64,
        evidence: serde_json::Value,
    ) -> Result<Confirmation, StoreError> {
        let now = clock::now();
        self.write(|tx| {
            // Read inside the write transaction: two clicks on the link cannot both
            // find it unconfirmed.
            let Some(s) = find_signup(tx, id)? else {
                return Ok(Confirmation::Unknown);
            };
            if s.confirmed_at.is_some() {
                return Ok(Confirmation::AlreadyConfirmed);
            }
            if at > s.expires_at {
                return Ok(Confirmation::Expired);
            }
            let address = Address::parse(&s.address)
                .map_err(|e| StoreError::Corrupt(format!("sign-up {id}: {e}")))?;
            let proof = serde_json::json!({
                "signup": s.evidence,
                "confirmation": evidence,
                "wording_version": s.wording_version,
            });
            let source = match s.source.as_str() {
                "" => DOUBLE_OPT_IN.to_string(),
                other => other.to_string(),
            };
            let mut ids = Vec::with_capacity(s.purposes.len());
            for purpose in &s.purposes {
                let grant = NewConsentEvent {
                    address: address.clone(),
                    purpose: purpose.clone(),
                    action: ConsentAction::Grant,
                    at,
                    source: source.clone(),
                    evidence: proof.clone(),
                };
                ids.push(insert_consent(tx, &grant, now)?);
            }
            tx.prepare_cached("UPDATE signups SET confirmed_at = ?2 WHERE id = ?1")?
                .execute(params![id, at])?;
            Ok(Confirmation::Recorded(ids))
        })
    }

    fn signups_since(&self, address: &Address, since: i64) -> Result<usize, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT count(*) FROM signups WHERE address = ?1 AND at >= ?2")?
                .query_row(params![address.as_str(), since], |row| row.get(0))?)
        })
    }

    fn signups_for(&self, address: &Address) -> Result<Vec<Signup>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                &format!("SELECT {SIGNUP_COLUMNS} FROM signups WHERE address = ?1 ORDER BY id"),
                [address.as_str()],
                signup,
            )
        })
    }

    fn forget(&self, address: &Address, at: i64) -> Result<bool, StoreError> {
        let addr = address.as_str();
        let hash = self.erasure_hash(addr);
        let mut conn = self.writer(true)?;
        // The writer overwrites deleted rows (secure_delete, set at open), and the
        // transaction ends by zeroing every free page (`scrub_free_pages`).
        let held = forget_in(&mut conn, addr, hash.as_ref(), at)?;
        // Best effort: move the overwritten pages from the log into the file and empty
        // the log, so the old bytes do not linger there either. Readers may hold it up.
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        Ok(held)
    }
}

/// Deletes the messages among `ids` that have no delivery left, last in the caller's
/// transaction. Their bodies are most of what the queue writes: overwriting their
/// freed pages with zeros (`secure_delete = ON`) wrote each body a second time through
/// the log, to be replaced by the next body anyway. So here the freed pages keep
/// their bytes (`FAST` still zeroes what stays in the rows' pages) until they are
/// reused, or until [`SqliteStore::forget`] scrubs them. Last, because a page freed
/// here and reused in the same transaction would be read back rather than zeroed.
fn collect_messages<'a>(
    tx: &Transaction<'_>,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<(), StoreError> {
    let mut collect = tx.prepare_cached(
        "DELETE FROM messages WHERE id = ?1
         AND NOT EXISTS (SELECT 1 FROM deliveries WHERE message_id = ?1)",
    )?;
    set(tx, "PRAGMA secure_delete = FAST")?;
    let collected = ids
        .into_iter()
        .try_for_each(|id| collect.execute([id]).map(|_| ()));
    // Restored whatever happened: every other deletion zeroes the pages it frees.
    set(tx, "PRAGMA secure_delete = ON")?;
    Ok(collected?)
}

/// Runs a PRAGMA that sets a value, through the statement cache: the writer sets two
/// of them around most transactions, and parsing them each time showed in profiles.
fn set(conn: &Connection, pragma: &'static str) -> Result<(), StoreError> {
    let mut statement = conn.prepare_cached(pragma)?;
    // Some answer with the new value: step through it.
    let mut rows = statement.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// Largest row of zeros [`scrub_free_pages`] writes at once (SQLite caps a value at
/// 1 GB; this keeps each well below).
const SCRUB_CHUNK_BYTES: i64 = 64 << 20;

/// Overwrites every free page of the file with zeros, in the caller's transaction:
/// rows of zeros in `scrub` take the whole free list (a page of it at least per row),
/// and deleting them with `secure_delete = ON` zeroes every page again, trunk pages
/// of the free list included. What was deleted without zeroing (delivered bodies, see
/// [`collect_messages`]) is then gone from free space. Costs two writes through the
/// log of each free page: as many as the queue's largest backlog left behind.
fn scrub_free_pages(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let page_size: i64 = tx.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    loop {
        let free: i64 = tx.query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
        if free == 0 {
            break;
        }
        tx.prepare_cached("INSERT INTO scrub (fill) VALUES (zeroblob(?1))")?
            .execute([free.saturating_mul(page_size).min(SCRUB_CHUNK_BYTES)])?;
    }
    tx.execute("DELETE FROM scrub", [])?;
    Ok(())
}

/// The transaction of [`SqliteStore::forget`]: true if anything was held.
fn forget_in(
    conn: &mut Connection,
    address: &str,
    hash: &[u8],
    at: i64,
) -> Result<bool, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The one row that lets the history trigger allow these deletions.
    tx.execute("INSERT INTO forgetting (address) VALUES (?1)", [address])?;
    let messages: Vec<String> = rows(
        &tx,
        "SELECT DISTINCT message_id FROM deliveries WHERE recipient = ?1",
        [address],
        |row| Ok(row.get(0)?),
    )?;
    let mut held = 0;
    for sql in [
        "DELETE FROM deliveries WHERE recipient = ?1",
        "DELETE FROM consent_history WHERE address = ?1",
        "DELETE FROM contacts WHERE address = ?1",
        "DELETE FROM suppressions WHERE address = ?1",
        "DELETE FROM events WHERE address = ?1",
        "DELETE FROM signups WHERE address = ?1",
        "DELETE FROM forgetting WHERE address = ?1",
    ] {
        held += tx.execute(sql, [address])?;
    }
    held -= 1; // the `forgetting` row
    for id in &messages {
        tx.execute(
            "DELETE FROM messages WHERE id = ?1
             AND NOT EXISTS (SELECT 1 FROM deliveries WHERE message_id = ?1)",
            [id],
        )?;
    }
    let listed = tx.execute(
        "INSERT INTO erasures (hash, at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        params![hash, at],
    )?;
    if held > 0 || listed > 0 {
        tx.execute(
            "INSERT INTO events (at, kind, message_id, address, purpose, detail, origin)
             VALUES (?1, ?2, NULL, '', NULL, ?3, NULL)",
            params![
                at,
                EVENT_CONTACT_FORGOTTEN,
                "erased at the person's request (the address is kept only as a keyed hash)"
            ],
        )?;
    }
    scrub_free_pages(&tx)?;
    tx.commit()?;
    Ok(held > 0)
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

    /// The schema version a database file is at, read as any SQLite client would.
    fn schema_version(path: &Path) -> usize {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn only_delivery_outcomes_are_committed_without_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let synchronous = |tx: &Transaction<'_>| -> Result<i64, StoreError> {
            Ok(tx.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
        };
        const NORMAL: i64 = 1;
        const FULL: i64 = 2;
        assert_eq!(store.write_unsynced(synchronous).unwrap(), NORMAL);
        // The next commit is synced again, whoever makes it.
        assert_eq!(store.write(synchronous).unwrap(), FULL);
        assert_eq!(store.write_unsynced(synchronous).unwrap(), NORMAL);
        let forgetting = store.writer(true).unwrap();
        let mode: i64 = forgetting
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, FULL);
        drop(forgetting);
        // Without storage.fsync, nothing is synced.
        let relaxed = SqliteStore::open(&dir.path().join("relaxed.db"), false).unwrap();
        assert_eq!(relaxed.write(synchronous).unwrap(), NORMAL);
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
            params!["a@example.com", "p", ALL_PURPOSES, [0u8; 32].as_slice()],
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
        assert_eq!(seeks.count(), 7, "{plan:#?}");
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
    fn a_person_forgotten_after_the_decision_is_not_queued_nor_stored_again() {
        // The policy allowed zoe at the end of DATA; she was forgotten before the
        // spool committed. The commit must not mail her, nor write her address again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optgate.db");
        let store = open(&dir);
        let zoe = addr("zoe@example.com");
        record(&store, "zoe@example.com", "newsletter", Grant, 10);
        assert!(store.forget(&zoe, 20).unwrap());

        let queued = store
            .enqueue(&[
                message("Z1", 30, &[("zoe@example.com", true)]),
                message(
                    "Z2",
                    31,
                    &[("zoe@example.com", true), ("ann@example.com", true)],
                ),
            ])
            .unwrap();
        let ann = store.contact_id(&addr("ann@example.com")).unwrap();
        assert_eq!(
            queued,
            vec![vec![], vec![("ann@example.com".to_string(), ann)]]
        );
        assert_eq!(
            tables_mentioning(&path, "zoe@example.com"),
            Vec::<String>::new()
        );
        assert!(
            store.message("Z1").unwrap().is_none(),
            "no body kept for nobody"
        );
        let pending: Vec<String> = store
            .pending_deliveries()
            .unwrap()
            .into_iter()
            .map(|d| d.recipient)
            .collect();
        assert_eq!(pending, vec!["ann@example.com"]);
        // Each decision is still logged, without the address, as a suppression.
        let raw = Connection::open(&path).unwrap();
        let details: Vec<(String, String, String)> = raw
            .prepare("SELECT message_id, address, detail FROM events WHERE kind = 'decision' ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let row = |m: &str, a: &str, d: &str| (m.to_string(), a.to_string(), d.to_string());
        assert_eq!(
            details,
            vec![
                row("Z1", "", "suppressed: erased"),
                row("Z2", "", "suppressed: erased"),
                row(
                    "Z2",
                    "ann@example.com",
                    "allowed: consent (consent event 1)"
                ),
            ]
        );
        // Worded as the policy words its own refusal of an erased person.
        use crate::policy::{Decision, SuppressReason};
        assert_eq!(
            ERASED_SINCE_DECIDED,
            Decision::Suppress(SuppressReason::Erased).reason()
        );
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
        let queued = store.enqueue(&batch).unwrap();
        // Each allowed recipient with their contact number, in envelope order, per message.
        let ann = store.contact_id(&addr("ann@example.com")).unwrap();
        let cid = store.contact_id(&addr("cid@example.com")).unwrap();
        assert_ne!(ann, cid);
        let q = |a: &str, id: i64| (a.to_string(), id);
        assert_eq!(
            queued,
            vec![
                vec![q("ann@example.com", ann), q("cid@example.com", cid)],
                vec![],
                vec![q("ann@example.com", ann), q("ann@example.com", ann)]
            ]
        );

        let pending = store.pending_deliveries().unwrap();
        let pd = |m: &str, r: &str, contact, next| PendingDelivery {
            message_id: m.into(),
            recipient: r.into(),
            contact: Some(contact),
            attempts: 0,
            next_attempt_at: next,
        };
        assert_eq!(
            pending,
            vec![
                pd("M1", "ann@example.com", ann, 1_000),
                pd("M1", "cid@example.com", cid, 1_000),
                pd("M3", "ann@example.com", ann, 1_100)
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
                contact: Some(store.contact_id(&addr("bob@example.com")).unwrap()),
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
        assert_eq!(
            kinds(&cid),
            vec!["decision", "suppression.added", "bounced"]
        );
        assert_eq!(cid[1].detail, "550 5.1.1 no such user");
        assert_eq!(cid[2].detail, "550 5.1.1 no such user");
        assert_eq!(
            (
                cid[1].at,
                cid[1].purpose.as_deref(),
                cid[1].origin.as_deref()
            ),
            (1_012, Some("newsletter"), None)
        );
        assert_eq!(
            kinds(&store.events_for(&addr("dan@example.com")).unwrap()),
            vec!["decision", "bounced"],
            "an expiry adds no suppression"
        );

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
        let version = schema_version(&path);
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

    fn consent(address: &str, purpose: &str, action: ConsentAction, at: i64) -> NewConsentEvent {
        NewConsentEvent {
            address: addr(address),
            purpose: purpose.into(),
            action,
            at,
            source: "import".into(),
            evidence: serde_json::json!({ "line": at }),
        }
    }

    fn signup_for(address: &str, purposes: &[&str], at: i64, source: &str) -> NewSignup {
        NewSignup {
            address: addr(address),
            purposes: purposes.iter().map(|p| p.to_string()).collect(),
            source: source.into(),
            wording_version: "form-v2".into(),
            evidence: serde_json::json!({ "ip": "198.51.100.4", "user_agent": "Firefox" }),
            at,
            expires_at: at + 3_600,
        }
    }

    /// Every table of the file whose rows mention `needle`, in any column, as text or bytes.
    fn tables_mentioning(path: &Path, needle: &str) -> Vec<String> {
        let raw = Connection::open(path).unwrap();
        let tables: Vec<String> = raw
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(tables.len() >= 10, "{tables:?}");
        let mut found = Vec::new();
        for table in tables {
            let mut stmt = raw.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
            let columns = stmt.column_count();
            let mut rows = stmt.query([]).unwrap();
            while let Some(row) = rows.next().unwrap() {
                let hit = (0..columns).any(|i| match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => {
                        b.windows(needle.len()).any(|w| w == needle.as_bytes())
                    }
                    _ => false,
                });
                if hit {
                    found.push(table.clone());
                    break;
                }
            }
        }
        found
    }

    #[test]
    fn every_consent_change_is_an_event_of_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let granted = record(&store, "ann@example.com", "newsletter", Grant, 100);
        store
            .enqueue(&[message("M1", 150, &[("ann@example.com", true)])])
            .unwrap();
        let withdrawn = record(&store, "ann@example.com", ALL_PURPOSES, Withdraw, 200);

        let ann = store.events_for(&addr("ann@example.com")).unwrap();
        assert_eq!(
            kinds(&ann),
            vec!["consent.granted", "decision", "consent.withdrawn"]
        );
        let g = &ann[0];
        assert_eq!(
            (
                g.at,
                g.purpose.as_deref(),
                g.detail.clone(),
                g.origin.as_deref()
            ),
            (100, Some("newsletter"), granted.to_string(), Some("test"))
        );
        assert_eq!(g.message_id, None);
        assert_eq!(ann[1].origin.as_deref(), Some("listmonk@192.0.2.7"));
        assert_eq!(
            (ann[2].purpose.as_deref(), ann[2].detail.clone()),
            (Some("all"), withdrawn.to_string())
        );

        // The feed: everything after a cursor, or only some kinds.
        let all = store.events_since(0, &[], 100).unwrap();
        assert_eq!(
            all.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![ann[0].id, ann[1].id, ann[2].id]
        );
        assert_eq!(
            store.events_since(ann[0].id, &[], 1).unwrap()[0].id,
            ann[1].id
        );
        let changes = store
            .events_since(
                0,
                &[
                    EVENT_CONSENT_WITHDRAWN,
                    EVENT_CONSENT_GRANTED,
                    EVENT_CONSENT_GRANTED,
                ],
                10,
            )
            .unwrap();
        assert_eq!(
            kinds(&changes),
            vec!["consent.granted", "consent.withdrawn"]
        );
        assert!(store.events_since(ann[2].id, &[], 10).unwrap().is_empty());
        assert!(
            store
                .events_since(0, &["nothing.like.this"], 10)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_feed_by_kind_pages_across_many_other_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut grants = Vec::new();
        for round in 0..5 {
            let batch: Vec<NewMessage> = (0..40)
                .map(|i| message(&format!("M{round}-{i}"), i, &[("bob@example.com", false)]))
                .collect();
            store.enqueue(&batch).unwrap();
            grants.push(record(
                &store,
                "ann@example.com",
                "newsletter",
                Grant,
                round,
            ));
            record(&store, "ann@example.com", "newsletter", Withdraw, round);
        }
        // Pages of two grants, oldest first, whatever lies between them.
        let mut cursor = 0;
        let mut seen = Vec::new();
        loop {
            let page = store
                .events_since(cursor, &[EVENT_CONSENT_GRANTED], 2)
                .unwrap();
            let Some(last) = page.last() else { break };
            cursor = last.id;
            assert!(page.len() <= 2);
            seen.extend(page.iter().map(|e| e.detail.parse::<i64>().unwrap()));
        }
        assert_eq!(seen, grants);
        let mixed = store
            .events_since(0, &[EVENT_CONSENT_GRANTED, EVENT_CONSENT_WITHDRAWN], 3)
            .unwrap();
        assert_eq!(
            kinds(&mixed),
            vec!["consent.granted", "consent.withdrawn", "consent.granted"]
        );
        assert!(mixed.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(store.events_since(0, &[], 1_000).unwrap().len(), 5 * 42);

        // Each kind is a range of the kind index, not a walk through the decisions.
        let conn = store.writer.lock().unwrap();
        let plan = rows(
            &conn,
            "EXPLAIN QUERY PLAN SELECT id FROM events WHERE kind = ?1 AND id > ?2 ORDER BY id LIMIT 2",
            params!["x", 0],
            |row| Ok(row.get::<_, String>(3)?),
        )
        .unwrap();
        assert!(plan.iter().any(|l| l.contains("events_kind")), "{plan:#?}");
    }

    #[test]
    fn webhook_cursors_are_kept_per_url() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let crm = "https://crm.example.com/hook";
        assert_eq!(store.webhook_cursor_or_start(crm, false).unwrap(), 0);
        store.set_webhook_cursor(crm, 41).unwrap();
        store.set_webhook_cursor(crm, 42).unwrap();
        store
            .set_webhook_cursor("https://mailer.example.com/hook", 7)
            .unwrap();
        drop(store);
        let store = open(&dir);
        assert_eq!(store.webhook_cursor_or_start(crm, false).unwrap(), 42);
        assert_eq!(
            store
                .webhook_cursor_or_start("https://mailer.example.com/hook", true)
                .unwrap(),
            7,
            "a known URL keeps its place, whatever its start"
        );
        assert_eq!(
            store
                .webhook_cursor_or_start("https://other.example.com/", false)
                .unwrap(),
            0
        );
    }

    #[test]
    fn a_new_webhook_url_started_now_starts_after_the_newest_event_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let late = "https://late.example.com/hook";
        assert_eq!(
            store
                .webhook_cursor_or_start("https://empty.example/", true)
                .unwrap(),
            0
        );
        for purpose in ["news", "offers"] {
            store
                .append_consent(&consent(
                    "ann@example.net",
                    purpose,
                    ConsentAction::Grant,
                    60,
                ))
                .unwrap();
        }
        let newest = store.events_since(0, &[], 100).unwrap().last().unwrap().id;
        assert_eq!(store.webhook_cursor_or_start(late, true).unwrap(), newest);
        store
            .append_consent(&consent(
                "bob@example.net",
                "news",
                ConsentAction::Grant,
                61,
            ))
            .unwrap();
        // Its place was recorded: asking again (a restart) does not move it on.
        assert_eq!(store.webhook_cursor_or_start(late, true).unwrap(), newest);
        assert_eq!(
            store
                .webhook_cursor_or_start("https://all.example/", false)
                .unwrap(),
            0
        );
    }

    #[test]
    fn bulk_consents_are_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optgate.db");
        let store = open(&dir);
        let events: Vec<NewConsentEvent> = (0..2_000)
            .map(|i| consent(&format!("r{i}@example.com"), "newsletter", Grant, i))
            .collect();
        assert!(store.append_consents(&events).unwrap().is_empty());
        assert!(store.append_consents(&[]).unwrap().is_empty());
        let page = store.history_page(0, 5_000).unwrap();
        assert_eq!(page.len(), 2_000);
        let e = &page[1_999];
        assert_eq!(
            (
                e.address.as_str(),
                e.purpose.as_str(),
                e.action,
                e.at,
                e.source.as_str()
            ),
            ("r1999@example.com", "newsletter", Grant, 1_999, "import")
        );
        assert_eq!(e.evidence, serde_json::json!({ "line": 1_999 }));
        assert_eq!(
            store
                .events_since(0, &[EVENT_CONSENT_GRANTED], 5_000)
                .unwrap()
                .len(),
            2_000
        );

        // A failure on the last event leaves none of the batch behind.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON consent_history
                 WHEN NEW.address = 'last@example.com'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            .unwrap();
        let mut failing: Vec<NewConsentEvent> = (0..500)
            .map(|i| consent(&format!("n{i}@example.com"), "newsletter", Grant, i))
            .collect();
        failing.push(consent("last@example.com", "newsletter", Grant, 9));
        let err = store.append_consents(&failing).unwrap_err();
        assert!(err.to_string().contains("refused by the test"), "{err}");
        assert_eq!(store.history_page(0, 5_000).unwrap().len(), 2_000);
        assert!(store.contact(&addr("n0@example.com")).unwrap().is_none());
        assert_eq!(store.events_since(0, &[], 5_000).unwrap().len(), 2_000);
    }

    #[test]
    fn exports_page_through_history_and_contacts() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let a1 = record(&store, "ann@example.com", "newsletter", Grant, 10);
        let b1 = record(&store, "bob@example.com", "newsletter", Grant, 20);
        let a2 = record(&store, "ann@example.com", ALL_PURPOSES, Withdraw, 30);
        store.set_customer(&addr("cid@example.com"), true).unwrap();
        store
            .suppress(&addr("bob@example.com"), "hard bounce", "550", 40)
            .unwrap();

        let first = store.history_page(0, 2).unwrap();
        assert_eq!(first.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a1, b1]);
        let rest = store.history_page(b1, 2).unwrap();
        assert_eq!(rest.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a2]);
        assert!(store.history_page(a2, 2).unwrap().is_empty());

        let page = store.contacts_page(0, 2).unwrap();
        assert_eq!(page.len(), 2);
        let (ann_id, ann) = &page[0];
        assert_eq!(ann.address, "ann@example.com");
        assert_eq!(
            ann.history.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![a1, a2]
        );
        assert!(!ann.customer && ann.suppression.is_none());
        let (bob_id, bob) = &page[1];
        assert!(bob_id > ann_id);
        assert_eq!(
            bob.suppression.as_ref().map(|s| (s.reason.as_str(), s.at)),
            Some(("hard bounce", 40))
        );
        let last = store.contacts_page(*bob_id, 2).unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].1.address, "cid@example.com");
        assert!(last[0].1.customer && last[0].1.history.is_empty());
        assert!(store.contacts_page(last[0].0, 2).unwrap().is_empty());
    }

    #[test]
    fn current_old_grants_are_found_for_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let old = record(&store, "old@example.com", "newsletter", Grant, 100);
        record(&store, "renewed@example.com", "newsletter", Grant, 100);
        record(&store, "renewed@example.com", "newsletter", Grant, 900);
        record(&store, "gone@example.com", "newsletter", Grant, 100);
        record(&store, "gone@example.com", "newsletter", Withdraw, 150);
        record(&store, "objected@example.com", "newsletter", Grant, 100);
        record(&store, "objected@example.com", ALL_PURPOSES, Withdraw, 150);
        record(&store, "back@example.com", ALL_PURPOSES, Withdraw, 50);
        let back = record(&store, "back@example.com", "newsletter", Grant, 200);
        record(&store, "other@example.com", "offers", Grant, 100);
        // An import of an older grant after a newer one: the newest event is what counts.
        record(&store, "late@example.com", "newsletter", Grant, 800);
        let late = record(&store, "late@example.com", "newsletter", Grant, 120);

        let found = store.grants_older_than("newsletter", 500).unwrap();
        let got: Vec<(&str, i64, i64)> = found
            .iter()
            .map(|g| (g.address.as_str(), g.event_id, g.at))
            .collect();
        assert_eq!(
            got,
            vec![
                ("old@example.com", old, 100),
                ("late@example.com", late, 120),
                ("back@example.com", back, 200)
            ]
        );
        assert!(found.iter().all(|g| g.purpose == "newsletter"));
        assert_eq!(store.grants_older_than("newsletter", 99).unwrap().len(), 0);
        assert_eq!(store.grants_older_than("offers", 100).unwrap().len(), 1);
    }

    #[test]
    fn sign_ups_are_confirmed_once_with_both_proofs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let ann = addr("ann@example.com");
        let id = store
            .create_signup(&signup_for(
                "ann@example.com",
                &["newsletter", "offers"],
                1_000,
                "",
            ))
            .unwrap();
        let other = store
            .create_signup(&signup_for(
                "ann@example.com",
                &["newsletter"],
                1_500,
                "footer-form",
            ))
            .unwrap();
        assert!(other > id);
        let s = store.signup(id).unwrap().unwrap();
        assert_eq!(
            (
                s.address.as_str(),
                s.purposes.clone(),
                s.wording_version.as_str(),
                s.at,
                s.expires_at
            ),
            (
                "ann@example.com",
                vec!["newsletter".to_string(), "offers".into()],
                "form-v2",
                1_000,
                4_600
            )
        );
        assert_eq!(s.evidence["user_agent"], "Firefox");
        assert_eq!(s.confirmed_at, None);
        assert!(store.signup(other + 1).unwrap().is_none());
        assert_eq!(store.signups_since(&ann, 1_000).unwrap(), 2);
        assert_eq!(store.signups_since(&ann, 1_001).unwrap(), 1);
        assert_eq!(store.signups_since(&addr("bob@example.com"), 0).unwrap(), 0);
        assert!(
            store.contact(&ann).unwrap().is_none(),
            "a sign-up is no consent"
        );

        let confirmation = serde_json::json!({ "ip": "198.51.100.9", "user_agent": "Safari" });
        assert_eq!(
            store
                .confirm_signup(other + 1, 1_100, confirmation.clone())
                .unwrap(),
            Confirmation::Unknown
        );
        assert_eq!(
            store
                .confirm_signup(id, 4_601, confirmation.clone())
                .unwrap(),
            Confirmation::Expired
        );
        let Confirmation::Recorded(ids) = store
            .confirm_signup(id, 4_600, confirmation.clone())
            .unwrap()
        else {
            panic!("not recorded");
        };
        assert_eq!(ids.len(), 2);
        assert_eq!(
            store
                .confirm_signup(id, 4_600, confirmation.clone())
                .unwrap(),
            Confirmation::AlreadyConfirmed
        );
        assert_eq!(store.signup(id).unwrap().unwrap().confirmed_at, Some(4_600));

        let history = store.contact(&ann).unwrap().unwrap().history;
        assert_eq!(history.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
        assert_eq!(
            history
                .iter()
                .map(|e| e.purpose.as_str())
                .collect::<Vec<_>>(),
            vec!["newsletter", "offers"]
        );
        let e = &history[0];
        assert_eq!(
            (e.action, e.at, e.source.as_str()),
            (Grant, 4_600, "double-opt-in")
        );
        assert_eq!(e.evidence["signup"]["ip"], "198.51.100.4");
        assert_eq!(e.evidence["confirmation"], confirmation);
        assert_eq!(e.evidence["wording_version"], "form-v2");
        let facts = &store
            .consent_facts(std::slice::from_ref(&ann), "newsletter")
            .unwrap()[0];
        assert_eq!(facts.purpose_event.as_ref().map(|e| e.id), Some(ids[0]));
        let events = store.events_since(0, &[EVENT_CONSENT_GRANTED], 10).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].origin.as_deref(), Some("double-opt-in"));

        // The sign-up's own source is kept.
        let Confirmation::Recorded(ids) = store.confirm_signup(other, 2_000, confirmation).unwrap()
        else {
            panic!("not recorded");
        };
        let last = store.contact(&ann).unwrap().unwrap().history;
        assert_eq!(
            last.last().map(|e| (e.id, e.source.as_str())),
            Some((ids[0], "footer-form"))
        );
        let listed = store.signups_for(&ann).unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|s| (s.id, s.confirmed_at))
                .collect::<Vec<_>>(),
            vec![(id, Some(4_600)), (other, Some(2_000))]
        );
    }

    #[test]
    fn forgetting_leaves_only_a_keyed_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optgate.db");
        let store = open(&dir);
        let ann = addr("ann@example.com");
        let bob = addr("bob@example.com");
        record(&store, "ann@example.com", "newsletter", Grant, 10);
        record(&store, "ann@example.com", ALL_PURPOSES, Withdraw, 20);
        record(&store, "bob@example.com", "newsletter", Grant, 10);
        store.set_customer(&ann, true).unwrap();
        store
            .create_signup(&signup_for("ann@example.com", &["newsletter"], 30, ""))
            .unwrap();
        store
            .enqueue(&[
                message(
                    "SHARED",
                    40,
                    &[("ann@example.com", true), ("bob@example.com", true)],
                ),
                message("ANN", 41, &[("ann@example.com", true)]),
            ])
            .unwrap();
        store
            .record_outcomes(&[outcome(
                "ANN",
                "ann@example.com",
                42,
                OutcomeKind::Deferred {
                    next_attempt_at: 99,
                    error: "451 later".into(),
                },
            )])
            .unwrap();
        store
            .suppress(&ann, "complaint", "abuse report", 43)
            .unwrap();
        let ann_id = store.contact_id(&ann).unwrap();
        let bob_id = store.contact_id(&bob).unwrap();
        let before = store
            .events_since(0, &[], 1_000)
            .unwrap()
            .last()
            .unwrap()
            .id;

        assert!(store.forget(&ann, 50).unwrap());

        assert_eq!(
            tables_mentioning(&path, "ann@example.com"),
            Vec::<String>::new()
        );
        // Nor in the file's free pages or its log: deleted rows are overwritten.
        for file in ["optgate.db", "optgate.db-wal"] {
            let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
            assert!(
                !bytes.windows(15).any(|w| w == b"ann@example.com"),
                "{file}"
            );
        }
        assert!(!tables_mentioning(&path, "bob@example.com").is_empty());
        assert!(store.contact(&ann).unwrap().is_none());
        assert!(store.events_for(&ann).unwrap().is_empty());
        assert!(store.signups_for(&ann).unwrap().is_empty());
        assert_eq!(store.contact_address(ann_id).unwrap(), None);
        assert!(
            store.message("ANN").unwrap().is_none(),
            "a message left with no delivery goes"
        );
        assert!(
            store.message("SHARED").unwrap().is_some(),
            "bob still needs it"
        );
        assert_eq!(
            store
                .pending_deliveries()
                .unwrap()
                .iter()
                .map(|p| p.recipient.as_str())
                .collect::<Vec<_>>(),
            vec!["bob@example.com"]
        );
        let logged = store.events_since(before, &[], 10).unwrap();
        assert_eq!(kinds(&logged), vec!["contact.forgotten"]);
        assert_eq!((logged[0].address.as_str(), logged[0].at), ("", 50));

        // Never mailed, imported or recorded again.
        let facts = store
            .consent_facts(&[ann.clone(), bob.clone()], "newsletter")
            .unwrap();
        assert!(facts[0].erased && !facts[1].erased);
        assert_eq!(facts[0].purpose_event, None);
        assert!(matches!(
            store.append_consent(&consent("ann@example.com", "newsletter", Grant, 60)),
            Err(StoreError::Erased)
        ));
        assert!(matches!(
            store.create_signup(&signup_for("ann@example.com", &["newsletter"], 60, "")),
            Err(StoreError::Erased)
        ));
        assert!(matches!(
            store.set_customer(&ann, true),
            Err(StoreError::Erased)
        ));
        assert!(matches!(
            store.suppress(&ann, "manual", "", 60),
            Err(StoreError::Erased)
        ));
        let refused = store
            .append_consents(&[
                consent("cid@example.com", "newsletter", Grant, 60),
                consent("ann@example.com", "newsletter", Grant, 60),
                consent("bob@example.com", "newsletter", Withdraw, 60),
            ])
            .unwrap();
        assert_eq!(refused, vec![1]);
        assert_eq!(store.contact(&bob).unwrap().unwrap().history.len(), 2);
        // A decision about them is still logged, without their address.
        let mut refused_message = message("AFTER", 70, &[("ann@example.com", false)]);
        refused_message.recipients[0].reason = "suppressed: erased".into();
        store.enqueue(&[refused_message]).unwrap();
        // So is the result of a delivery that was in flight: it is not.
        store
            .record_outcomes(&[outcome(
                "SHARED",
                "ann@example.com",
                71,
                OutcomeKind::Failed {
                    error: "550 5.1.1 no such user".into(),
                    suppress: true,
                },
            )])
            .unwrap();
        assert_eq!(
            tables_mentioning(&path, "ann@example.com"),
            Vec::<String>::new()
        );
        let decision = store
            .events_since(logged[0].id, &[EVENT_DECISION], 10)
            .unwrap();
        assert_eq!(kinds(&decision), vec!["decision"]);
        let unnamed = store.events_since(logged[0].id, &[], 10).unwrap();
        assert_eq!(unnamed.iter().filter(|e| e.address.is_empty()).count(), 1);
        assert_eq!(
            (decision[0].address.as_str(), decision[0].detail.as_str()),
            ("", "suppressed: erased")
        );

        // The history is still append-only for everyone else.
        let raw = Connection::open(&path).unwrap();
        let refused = raw.execute(
            "DELETE FROM consent_history WHERE address = 'bob@example.com'",
            [],
        );
        assert!(refused.unwrap_err().to_string().contains("append-only"));
        assert!(
            raw.execute("UPDATE consent_history SET at = 0", [])
                .is_err()
        );

        // Nothing more to forget; an address never seen is listed all the same.
        assert!(!store.forget(&ann, 80).unwrap());
        let cid = addr("cid@example.com");
        let dan = addr("dan@example.com");
        assert!(store.forget(&cid, 81).unwrap());
        assert!(!store.forget(&dan, 82).unwrap());
        assert!(store.consent_facts(&[dan], "newsletter").unwrap()[0].erased);
        assert_eq!(
            kinds(
                &store
                    .events_since(decision[0].id, &[EVENT_CONTACT_FORGOTTEN], 10)
                    .unwrap()
            ),
            vec!["contact.forgotten", "contact.forgotten"],
            "one per erasure, none for a repeat"
        );

        // A new contact never gets a forgotten one's number.
        let eve = store.contact_id(&addr("eve@example.com")).unwrap();
        assert!(eve > ann_id.max(bob_id));
    }

    #[test]
    fn the_erasure_key_is_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("optgate.db.erasure-key");
        let store = open(&dir);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&key).unwrap();
        assert_eq!(text.trim().len(), 64);
        store.forget(&addr("ann@example.com"), 1).unwrap();
        drop(store);

        // Reopened: the same key, so the same hash is still found.
        let store = open(&dir);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
        assert!(
            store
                .consent_facts(&[addr("ann@example.com")], "p")
                .unwrap()[0]
                .erased
        );
        drop(store);

        // Without its key the erasure list means nothing: refuse to open.
        std::fs::remove_file(&key).unwrap();
        let err = SqliteStore::open(&dir.path().join("optgate.db"), true)
            .err()
            .unwrap();
        assert!(err.to_string().contains("erasure-key is missing"), "{err}");
        std::fs::write(&key, "not hex\n").unwrap();
        let err = SqliteStore::open(&dir.path().join("optgate.db"), true)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a key"), "{err}");
    }

    #[test]
    fn a_version_1_file_is_migrated_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optgate.db");
        {
            let raw = Connection::open(&path).unwrap();
            raw.execute_batch(MIGRATIONS[0]).unwrap();
            raw.execute_batch(
                "INSERT INTO contacts (id, address, customer, created_at) VALUES
                     (1, 'ann@example.com', 1, 5), (7, 'bob@example.com', 0, 6);
                 INSERT INTO consent_history (address, purpose, action, at, recorded_at, source, evidence)
                     VALUES ('bob@example.com', 'newsletter', 'grant', 9, 9, 'cli', '{}');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, true).unwrap();
        assert_eq!(store.contact_id(&addr("ann@example.com")).unwrap(), 1);
        assert_eq!(store.contact_id(&addr("bob@example.com")).unwrap(), 7);
        assert!(
            store
                .contact(&addr("ann@example.com"))
                .unwrap()
                .unwrap()
                .customer
        );
        assert_eq!(
            store
                .contact(&addr("bob@example.com"))
                .unwrap()
                .unwrap()
                .history
                .len(),
            1
        );
        assert!(store.forget(&addr("bob@example.com"), 10).unwrap());
        assert_eq!(store.contact_id(&addr("cid@example.com")).unwrap(), 8);
        // The history still refers to the contacts table, and foreign keys hold.
        let err = store
            .writer
            .lock()
            .unwrap()
            .execute(
                "INSERT INTO consent_history (address, purpose, action, at, recorded_at, source, evidence)
                 VALUES ('nobody@example.com', 'p', 'grant', 1, 1, 'x', '{}')",
                [],
            )
            .unwrap_err();
        assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
        let version = schema_version(&path);
        assert_eq!(version, 3);
    }

    #[test]
    fn a_version_2_file_keeps_its_queue_and_is_scrubbed_by_forget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optgate.db");
        {
            // As the previous release (schema 2) leaves it, with a message queued.
            let raw = Connection::open(&path).unwrap();
            raw.execute_batch(&format!("{}{}", MIGRATIONS[0], MIGRATIONS[1]))
                .unwrap();
            raw.execute_batch(
                "PRAGMA journal_mode = wal; PRAGMA user_version = 2;
                 INSERT INTO messages VALUES ('OLD', 's@example.com', 'p', 5, zeroblob(20000));
                 INSERT INTO deliveries (message_id, recipient, next_attempt_at)
                     VALUES ('OLD', 'ann@example.com', 5);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, true).unwrap();
        let pending = store.pending_deliveries().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(store.message("OLD").unwrap().unwrap().body.len(), 20_000);
        let reply = "250 ok".into();
        store
            .record_outcomes(&[outcome(
                "OLD",
                "ann@example.com",
                6,
                OutcomeKind::Delivered { reply },
            )])
            .unwrap();
        assert!(store.message("OLD").unwrap().is_none());
        assert!(store.forget(&addr("ann@example.com"), 7).unwrap());
        let version = schema_version(&path);
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn the_log_stays_bounded_under_a_steady_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("optgate.db"), false).unwrap();
        let body = Arc::new(vec![b'x'; 44_000]);
        // About 60 MB through the log: twice the checkpoint window.
        for group in 0..120 {
            let batch: Vec<NewMessage> = (0..8)
                .map(|i| {
                    let mut m = message(&format!("M{group}-{i}"), 10, &[("a@example.com", true)]);
                    m.message.body = body.clone();
                    m
                })
                .collect();
            store.enqueue(&batch).unwrap();
            let delivered: Vec<DeliveryOutcome> = batch
                .iter()
                .map(|m| {
                    let reply = "250 ok".into();
                    outcome(
                        &m.message.id,
                        "a@example.com",
                        11,
                        OutcomeKind::Delivered { reply },
                    )
                })
                .collect();
            store.record_outcomes(&delivered).unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("optgate.db-wal"))
            .unwrap()
            .len();
        let frame = 4_096 + 24;
        let bound = (WAL_AUTOCHECKPOINT_PAGES as u64 + 200) * frame;
        assert!(wal <= bound, "{wal} > {bound}");
    }

    #[test]
    fn delivered_bodies_stay_in_free_pages_until_forget_scrubs_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        // Written nowhere else than in the body, which fills several overflow pages.
        const MARKER: &[u8] = b"Dear Ann, your order";
        let mut big = message("BIG", 10, &[("ann@example.com", true)]);
        let mut body = b"Subject: order\r\n\r\n".to_vec();
        for _ in 0..2_000 {
            body.extend_from_slice(MARKER);
            body.extend_from_slice(b"\r\n");
        }
        big.message.body = Arc::new(body);
        store.enqueue(&[big]).unwrap();
        let delivered = OutcomeKind::Delivered {
            reply: "250 ok".into(),
        };
        store
            .record_outcomes(&[outcome("BIG", "ann@example.com", 11, delivered)])
            .unwrap();
        let file_holds_marker = || {
            let bytes = std::fs::read(dir.path().join("optgate.db")).unwrap();
            bytes.windows(MARKER.len()).any(|w| w == MARKER)
        };
        {
            let writer = store.writer.lock().unwrap();
            let secure_delete: i64 = writer
                .query_row("PRAGMA secure_delete", [], |r| r.get(0))
                .unwrap();
            assert_eq!(
                secure_delete, 1,
                "every other deletion still zeroes its pages"
            );
            writer
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        assert!(store.message("BIG").unwrap().is_none());
        assert!(
            file_holds_marker(),
            "the body's freed pages were not zeroed"
        );

        assert!(store.forget(&addr("ann@example.com"), 12).unwrap());
        assert!(!file_holds_marker(), "forget zeroed every free page");
        let wal = std::fs::read(dir.path().join("optgate.db-wal")).unwrap_or_default();
        assert!(!wal.windows(MARKER.len()).any(|w| w == MARKER));
        let raw = Connection::open(dir.path().join("optgate.db")).unwrap();
        let (free, scratch): (i64, i64) = raw
            .query_row(
                "SELECT (SELECT freelist_count FROM pragma_freelist_count),
                        (SELECT count(*) FROM scrub)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(
            free >= 10,
            "the pages stay free for the next bodies: {free}"
        );
        assert_eq!(scratch, 0);
    }
}
