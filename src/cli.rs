//! The command line: what an operator types, parsed by clap, each command a short
//! function over the config and the store. Errors come back as one line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::address::Address;
use crate::clock;
use crate::config::Config;
use crate::import;
use crate::policy::{Decision, decide};
use crate::store::{
    ALL_PURPOSES, ConsentAction, ConsentEvent, ContactRecord, Event, NewConsentEvent, Signup,
    SqliteStore, Store, Suppression,
};

/// The command did its work, but some of its input was refused (and listed): `main`
/// exits with status 2 for it, not 1.
#[derive(Debug, thiserror::Error)]
#[error("{0} rows rejected (listed above); every other row was imported")]
pub struct RowsRejected(pub usize);

/// Whether `e` is a write to a closed pipe (`optgate consent export | head`): the
/// reader chose to stop, which is no failure to report.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let io = cause.downcast_ref::<std::io::Error>().or_else(|| {
            match cause.downcast_ref::<csv::Error>().map(csv::Error::kind) {
                Some(csv::ErrorKind::Io(io)) => Some(io),
                _ => None,
            }
        });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Rows read per page when exporting, so memory stays flat whatever the register's size.
const EXPORT_PAGE: usize = 5_000;

#[derive(Parser)]
#[command(
    name = "optgate",
    version,
    about = "A consent-enforcing SMTP gateway for marketing mail"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "config/optgate.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway: SMTP in, policy, queue, delivery.
    Serve,
    /// Read and validate the configuration, then exit.
    CheckConfig,
    /// Print an argon2id hash of a password read from standard input, for `password_hash`.
    HashPassword,
    /// Record, withdraw and inspect consents.
    #[command(subcommand)]
    Consent(ConsentCommand),
    /// Contacts: attributes, the suppression list, a person's file, erasure.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Inspect the delivery queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// DKIM keys.
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// The keys that sign unsubscribe links.
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Write a new private key (PEM) and print the DNS TXT record to publish.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// Where to write the private key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Sign new links with a fresh key; links already sent keep working for
    /// `tokens.retired_key_validity`. Restart `serve` to use it.
    Rotate,
}

#[derive(Subcommand)]
pub enum ConsentCommand {
    /// Record that EMAIL consented to PURPOSE.
    Grant {
        email: String,
        purpose: String,
        #[command(flatten)]
        proof: Proof,
    },
    /// Record that EMAIL withdrew consent (or objected) for PURPOSE, or for everything.
    Withdraw {
        email: String,
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        purpose: Option<String>,
        /// Withdraw from every purpose.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        proof: Proof,
    },
    /// The current state per purpose and the full history of EMAIL.
    Show { email: String },
    /// Import consents from a CSV file (all valid rows in one transaction).
    ///
    /// The header names the columns: email, purpose (`*` = every purpose, for
    /// withdrawals), status (granted | withdrawn), timestamp (RFC 3339), and optionally
    /// source and evidence (a JSON object). Every row is checked and each rejected one
    /// is listed with its line; the valid ones are written in one transaction, so an
    /// interrupted import leaves nothing behind. Exit status 2 if some were rejected.
    Import { file: PathBuf },
    /// Write the whole register to standard output, as CSV or JSON.
    ///
    /// CSV: the consent history with the columns `import` reads, so an export imports
    /// back as the same history. JSON: every contact with its customer flag,
    /// suppression and full history.
    Export {
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
    },
    /// List the current consents that lapse soon (purposes with expires_after_days).
    Expiring {
        /// How far ahead to look, e.g. 30d, 2weeks.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        within: Duration,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

#[derive(Args)]
pub struct Proof {
    /// How the consent reached you (form, phone, paper…).
    #[arg(long, default_value = "cli")]
    source: String,
    /// The proof as a JSON object (IP, wording version, document reference…).
    #[arg(long)]
    evidence: Option<String>,
}

#[derive(Subcommand)]
pub enum ContactCommand {
    /// Set a contact's attributes.
    Set {
        email: String,
        /// Whether the contact is an existing customer (for soft opt-in purposes).
        #[arg(long, action = clap::ArgAction::Set)]
        customer: bool,
    },
    /// Take EMAIL off the suppression list (after a hard bounce was fixed).
    Unsuppress { email: String },
    /// Print everything held about EMAIL, as JSON (GDPR art. 15 and 20).
    ///
    /// The contact, the suppression, the consent history, the events (decisions,
    /// deliveries), the sign-ups, and what may be sent to them today.
    Export { email: String },
    /// Erase everything held about EMAIL (GDPR art. 17).
    ///
    /// Only a keyed hash of the address is kept, so that it is never mailed or
    /// imported again; the erasure is logged without the address.
    Forget { email: String },
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Every delivery still waiting, with its attempts and last error.
    List,
}

/// Runs every command but `serve` (which needs the runtime).
pub fn run(config: &Config, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => unreachable!("serve is run by main on the async runtime"),
        Command::CheckConfig => {
            println!(
                "{}: ok ({} purposes, {} accounts, upstream {})",
                config.path.display(),
                config.purposes.len(),
                config.smtp.accounts.len(),
                match &config.upstream {
                    crate::config::UpstreamConfig::File { path } =>
                        format!("file {}", path.display()),
                    crate::config::UpstreamConfig::Smtp(s) => format!("smtp {}:{}", s.host, s.port),
                }
            );
            Ok(())
        }
        Command::HashPassword => hash_password(),
        Command::Consent(c) => consent(config, c),
        Command::Contact(c) => contact(config, c),
        Command::Queue(QueueCommand::List) => queue_list(config),
        Command::Dkim(DkimCommand::Keygen {
            domain,
            selector,
            algorithm,
            out,
        }) => dkim_keygen(&domain, &selector, algorithm, &out),
        Command::Tokens(TokensCommand::Rotate) => {
            if let Some(dir) = config.tokens.keys_file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let id = crate::token::TokenKeys::rotate(
                &config.tokens.keys_file,
                clock::now(),
                config.tokens.retired_key_validity,
            )?;
            println!(
                "token key {id} now signs new links; older links work for {} more",
                humantime::format_duration(config.tokens.retired_key_validity)
            );
            Ok(())
        }
    }
}

/// Needs no config: it only writes a key file and prints its DNS record.
pub fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: KeyAlgorithm,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    Address::parse(&format!("x@{domain}"))
        .map_err(|_| anyhow::anyhow!("'{domain}' is not a domain"))?;
    let algorithm = match algorithm {
        KeyAlgorithm::Rsa => crate::dkim::Algorithm::RsaSha256,
        KeyAlgorithm::Ed25519 => crate::dkim::Algorithm::Ed25519Sha256,
    };
    let key = crate::dkim::generate(domain, selector, algorithm)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    file.write_all(key.private_pem.as_bytes())?;
    file.sync_all()?;
    println!("{}", key.dns_record);
    Ok(())
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    std::fs::create_dir_all(&config.storage.data_dir).with_context(|| {
        format!(
            "cannot create data_dir {}",
            config.storage.data_dir.display()
        )
    })?;
    Ok(Arc::new(SqliteStore::open(
        &config.storage.database(),
        config.storage.fsync,
    )?))
}

fn known_purpose(config: &Config, purpose: &str) -> anyhow::Result<()> {
    if config.purpose(purpose).is_none() {
        let ids: Vec<&str> = config.purposes.iter().map(|p| p.id.as_str()).collect();
        bail!(
            "unknown purpose '{purpose}' (configured: {})",
            ids.join(", ")
        );
    }
    Ok(())
}

impl Proof {
    fn evidence(&self) -> anyhow::Result<serde_json::Value> {
        let mut evidence = match &self.evidence {
            None => serde_json::json!({}),
            Some(text) => serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .filter(|v| v.is_object())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--evidence must be a JSON object, e.g. '{{\"ip\":\"192.0.2.1\"}}'"
                    )
                })?,
        };
        if let Some(user) = std::env::var("USER").ok().filter(|u| !u.is_empty()) {
            evidence["recorded_by"] = serde_json::Value::String(user);
        }
        Ok(evidence)
    }
}

fn consent(config: &Config, command: ConsentCommand) -> anyhow::Result<()> {
    match command {
        ConsentCommand::Grant {
            email,
            purpose,
            proof,
        } => {
            let address = Address::parse(&email)?;
            known_purpose(config, &purpose)?;
            let event = NewConsentEvent {
                address,
                purpose,
                action: ConsentAction::Grant,
                at: clock::now(),
                source: proof.source.clone(),
                evidence: proof.evidence()?,
            };
            let id = open_store(config)?.append_consent(&event)?;
            println!(
                "granted: {} for {} (event {id})",
                event.address, event.purpose
            );
            Ok(())
        }
        ConsentCommand::Withdraw {
            email,
            purpose,
            all,
            proof,
        } => {
            let address = Address::parse(&email)?;
            let purpose = match (purpose, all) {
                (_, true) => ALL_PURPOSES.to_string(),
                (Some(p), false) => {
                    known_purpose(config, &p)?;
                    p
                }
                (None, false) => bail!("name a PURPOSE or give --all"),
            };
            let event = NewConsentEvent {
                address,
                purpose,
                action: ConsentAction::Withdraw,
                at: clock::now(),
                source: proof.source.clone(),
                evidence: proof.evidence()?,
            };
            let id = open_store(config)?.append_consent(&event)?;
            println!(
                "withdrawn: {} from {} (event {id})",
                event.address, event.purpose
            );
            Ok(())
        }
        ConsentCommand::Show { email } => show(config, &Address::parse(&email)?),
        ConsentCommand::Import { file } => consent_import(config, &file),
        ConsentCommand::Export { format } => consent_export(config, format),
        ConsentCommand::Expiring { within } => consent_expiring(config, within),
    }
}

/// Shows how an import goes on standard error: a bar on a terminal, otherwise a plain
/// line now and then (for logs, and for whoever waits on the import).
struct ImportProgress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Instant,
    rows: u64,
    rejected: u64,
}

impl ImportProgress {
    fn new(bytes: u64) -> ImportProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(bytes);
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} reading [{bar:30}] {bytes}/{total_bytes} {msg} ({elapsed})",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        eprintln!("optgate: reading and checking every row");
        ImportProgress {
            bar,
            started: now,
            last_line: now,
            rows: 0,
            rejected: 0,
        }
    }

    fn row(&mut self, bytes: u64) {
        self.rows += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position(bytes);
                if self.rows.is_multiple_of(1_000) {
                    bar.set_message(format!("{} rows, {} rejected", self.rows, self.rejected));
                }
            }
            None if self.last_line.elapsed() >= Duration::from_secs(1) => {
                self.last_line = Instant::now();
                eprintln!(
                    "optgate: {} rows read, {} rejected ({} rows/s)",
                    self.rows,
                    self.rejected,
                    rate(self.rows, self.started.elapsed())
                );
            }
            None => {}
        }
    }

    /// Prints a line on standard output without tearing the bar.
    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// The read is over: say what is being written, and spin while it is.
    fn writing(&mut self, rows: usize) {
        let what = format!("writing {rows} rows in one transaction");
        match self.bar.take() {
            Some(bar) => {
                bar.finish_and_clear();
                let spinner = indicatif::ProgressBar::new_spinner().with_message(what);
                spinner.enable_steady_tick(Duration::from_millis(100));
                self.bar = Some(spinner);
            }
            None => eprintln!("optgate: {what}"),
        }
    }

    fn done(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

fn rate(rows: u64, elapsed: Duration) -> u64 {
    (rows as f64 / elapsed.as_secs_f64().max(1e-3)) as u64
}

fn consent_import(config: &Config, file: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let input =
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let bytes = input.metadata().map(|m| m.len()).unwrap_or(0);
    // Opened first: a database that cannot be written is said before the long read.
    let store = open_store(config)?;
    let mut progress = ImportProgress::new(bytes);
    let read = import::read_csv(
        config,
        std::io::BufReader::with_capacity(1 << 16, input),
        clock::now(),
        |p| match p {
            import::Progress::Row { bytes } => progress.row(bytes),
            import::Progress::Rejected(r) => {
                progress.rejected += 1;
                progress.println(&format!("line {}: {}", r.line, r.reason));
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()));
    let read = match read {
        Ok(read) => read,
        Err(e) => {
            progress.done();
            return Err(e);
        }
    };
    progress.writing(read.events.len());
    let refused = store.append_consents(&read.events);
    progress.done();
    let refused = refused?;
    for &i in &refused {
        if let Some(line) = read.lines.get(i) {
            println!("line {line}: email: erased at the person's request");
        }
    }
    let imported = read.events.len() - refused.len();
    let rejected = read.rejected.len() + refused.len();
    println!(
        "imported {imported} rows, rejected {rejected} ({} rows/s)",
        rate(read.rows, started.elapsed())
    );
    if rejected > 0 {
        return Err(RowsRejected(rejected).into());
    }
    Ok(())
}

fn consent_export(config: &Config, format: ExportFormat) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let stdout = std::io::stdout().lock();
    match format {
        ExportFormat::Csv => {
            let mut out = csv::Writer::from_writer(std::io::BufWriter::new(stdout));
            out.write_record(import::CSV_COLUMNS)?;
            let mut after = 0;
            loop {
                let page = store.history_page(after, EXPORT_PAGE)?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for event in &page {
                    out.write_record(import::csv_row(event))?;
                }
            }
            out.flush()?;
        }
        ExportFormat::Json => {
            // Written contact by contact: a large register never sits whole in memory.
            let mut out = std::io::BufWriter::new(stdout);
            write!(
                out,
                "{{\"exported_at\":{},\"contacts\":[",
                json!(clock::rfc3339(clock::now()))
            )?;
            let mut after = 0;
            let mut first = true;
            loop {
                let page = store.contacts_page(after, EXPORT_PAGE)?;
                let Some((last, _)) = page.last() else { break };
                after = *last;
                for (id, contact) in &page {
                    if !first {
                        out.write_all(b",")?;
                    }
                    first = false;
                    let mut value = contact_json(contact);
                    value["id"] = json!(id);
                    write!(out, "\n{value}")?;
                }
            }
            writeln!(out, "\n]}}")?;
            out.flush()?;
        }
    }
    Ok(())
}

const DAY: i64 = 86_400;

fn consent_expiring(config: &Config, within: Duration) -> anyhow::Result<()> {
    let now = clock::now();
    let window = i64::try_from(within.as_secs()).unwrap_or(i64::MAX / 2);
    let expiring: Vec<_> = config
        .purposes
        .iter()
        .filter_map(|p| p.expires_after_days.map(|days| (p, i64::from(days) * DAY)))
        .collect();
    if expiring.is_empty() {
        println!("no purpose has expires_after_days: no consent lapses");
        return Ok(());
    }
    let store = open_store(config)?;
    let mut lapsing = Vec::new();
    for (purpose, lifetime) in expiring {
        // Lapses at `at + lifetime`, within the window when that is <= now + window.
        let granted_by = now.saturating_add(window).saturating_sub(lifetime);
        for grant in store.grants_older_than(&purpose.id, granted_by)? {
            lapsing.push((grant.at + lifetime, grant));
        }
    }
    lapsing.sort_by(|a, b| (a.0, &a.1.address).cmp(&(b.0, &b.1.address)));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "{} consents lapse within {} (or already have)",
        lapsing.len(),
        humantime::format_duration(within)
    )?;
    if !lapsing.is_empty() {
        writeln!(
            out,
            "{:<40} {:<16} {:<20} {:<20} state",
            "address", "purpose", "granted at", "lapses at"
        )?;
    }
    for (lapses, grant) in &lapsing {
        writeln!(
            out,
            "{:<40} {:<16} {:<20} {:<20} {}",
            grant.address,
            grant.purpose,
            clock::rfc3339(grant.at),
            clock::rfc3339(*lapses),
            if *lapses <= now { "lapsed" } else { "lapsing" }
        )?;
    }
    out.flush()?;
    Ok(())
}

fn history_json(e: &ConsentEvent) -> Value {
    json!({
        "id": e.id,
        "purpose": e.purpose,
        "action": e.action,
        "at": clock::rfc3339(e.at),
        "recorded_at": clock::rfc3339(e.recorded_at),
        "source": e.source,
        "evidence": e.evidence,
    })
}

fn suppression_json(s: Option<&Suppression>) -> Value {
    s.map_or(
        Value::Null,
        |s| json!({ "reason": s.reason, "detail": s.detail, "at": clock::rfc3339(s.at) }),
    )
}

fn contact_json(c: &ContactRecord) -> Value {
    json!({
        "address": c.address,
        "customer": c.customer,
        "suppression": suppression_json(c.suppression.as_ref()),
        "history": c.history.iter().map(history_json).collect::<Vec<_>>(),
    })
}

fn event_json(e: &Event) -> Value {
    json!({
        "id": e.id,
        "at": clock::rfc3339(e.at),
        "kind": e.kind,
        "message_id": e.message_id,
        "purpose": e.purpose,
        "detail": e.detail,
        "origin": e.origin,
    })
}

fn signup_json(s: &Signup) -> Value {
    json!({
        "id": s.id,
        "purposes": s.purposes,
        "source": s.source,
        "wording_version": s.wording_version,
        "evidence": s.evidence,
        "at": clock::rfc3339(s.at),
        "expires_at": clock::rfc3339(s.expires_at),
        "confirmed_at": s.confirmed_at.map(clock::rfc3339),
    })
}

/// Everything held about one person, with what may be sent to them today.
fn contact_export(config: &Config, address: &Address) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let now = clock::now();
    let record = store.contact(address)?;
    let mut purposes = Vec::new();
    let mut erased = false;
    for purpose in &config.purposes {
        let facts = store.consent_facts(std::slice::from_ref(address), &purpose.id)?;
        let Some(facts) = facts.first() else { continue };
        erased = facts.erased;
        let decision = decide(purpose, facts, now);
        purposes.push(json!({
            "purpose": purpose.id,
            "name": purpose.name,
            "basis": purpose.basis.as_str(),
            "may_be_mailed": decision.is_allowed(),
            "why": decision.reason(),
        }));
    }
    let file = json!({
        "address": address.as_str(),
        "exported_at": clock::rfc3339(now),
        "erased": erased,
        "contact": record.as_ref().map(|c| json!({ "customer": c.customer })),
        "suppression": suppression_json(record.as_ref().and_then(|c| c.suppression.as_ref())),
        "consent_history": record.as_ref().map_or(Vec::new(), |c| c.history.iter().map(history_json).collect()),
        "purposes": purposes,
        "events": store.events_for(address)?.iter().map(event_json).collect::<Vec<_>>(),
        "signups": store.signups_for(address)?.iter().map(signup_json).collect::<Vec<_>>(),
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &file)?;
    writeln!(out)?;
    Ok(())
}

fn show(config: &Config, address: &Address) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let record = store.contact(address)?;
    let now = clock::now();
    let erased = store
        .consent_facts(std::slice::from_ref(address), ALL_PURPOSES)?
        .first()
        .is_some_and(|f| f.erased);
    let mut out = std::io::stdout().lock();
    match &record {
        None if erased => writeln!(
            out,
            "{address}: erased at the person's request (nothing is held; never mailed again)"
        )?,
        None => writeln!(out, "{address}: unknown contact (no consent recorded)")?,
        Some(r) => writeln!(
            out,
            "{address}: customer: {}",
            if r.customer { "yes" } else { "no" }
        )?,
    }
    if let Some(s) = record.as_ref().and_then(|r| r.suppression.as_ref()) {
        writeln!(
            out,
            "suppressed since {}: {} ({})",
            clock::rfc3339(s.at),
            s.reason,
            s.detail
        )?;
    }
    writeln!(out, "\n{:<24} {:<20} may be mailed", "purpose", "basis")?;
    for purpose in &config.purposes {
        let facts = store.consent_facts(std::slice::from_ref(address), &purpose.id)?;
        let verdict = match facts.first().map(|f| decide(purpose, f, now)) {
            Some(Decision::Allow {
                record: Some(id), ..
            }) => format!("yes (consent event {id})"),
            Some(Decision::Allow { .. }) => "yes".to_string(),
            Some(Decision::Suppress(reason)) => format!("no: {}", reason.as_str()),
            None => "unknown".to_string(),
        };
        writeln!(
            out,
            "{:<24} {:<20} {verdict}",
            purpose.id,
            purpose.basis.as_str()
        )?;
    }
    let history = record.map(|r| r.history).unwrap_or_default();
    writeln!(out, "\nhistory ({} events):", history.len())?;
    for e in history {
        writeln!(
            out,
            "  #{} {} {:<8} {:<16} source={} evidence={}",
            e.id,
            clock::rfc3339(e.at),
            e.action.as_str(),
            e.purpose,
            e.source,
            e.evidence
        )?;
    }
    Ok(())
}

fn contact(config: &Config, command: ContactCommand) -> anyhow::Result<()> {
    match command {
        ContactCommand::Set { email, customer } => {
            let address = Address::parse(&email)?;
            open_store(config)?.set_customer(&address, customer)?;
            println!(
                "{address}: customer: {}",
                if customer { "yes" } else { "no" }
            );
        }
        ContactCommand::Unsuppress { email } => {
            let address = Address::parse(&email)?;
            if open_store(config)?.unsuppress(&address)? {
                println!("{address}: removed from the suppression list");
            } else {
                bail!("{address} is not on the suppression list");
            }
        }
        ContactCommand::Export { email } => contact_export(config, &Address::parse(&email)?)?,
        ContactCommand::Forget { email } => {
            let address = Address::parse(&email)?;
            let store = open_store(config)?;
            let already = store
                .consent_facts(std::slice::from_ref(&address), ALL_PURPOSES)?
                .first()
                .is_some_and(|f| f.erased);
            // The confirmation does not repeat the address: it may end up in a log.
            if store.forget(&address, clock::now())? {
                println!(
                    "forgotten: every record of that person was deleted; only a keyed hash of \
                     the address remains, so it is never mailed or imported again"
                );
            } else if already {
                println!("already forgotten: nothing is held about that address");
            } else {
                println!(
                    "nothing was held about that address; its keyed hash is now on the erasure \
                     list, so it is never mailed or imported"
                );
            }
        }
    }
    Ok(())
}

fn queue_list(config: &Config) -> anyhow::Result<()> {
    let entries = open_store(config)?.queue()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{} deliveries waiting", entries.len())?;
    for e in entries {
        writeln!(
            out,
            "{} {} -> {} purpose={} attempts={} next={} {}",
            e.message_id,
            if e.sender.is_empty() { "<>" } else { &e.sender },
            e.recipient,
            e.purpose,
            e.attempts,
            clock::rfc3339(e.next_attempt_at),
            e.last_error.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

/// Reads a password from standard input and prints its argon2id PHC hash.
pub fn hash_password() -> anyhow::Result<()> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("give the password on standard input, e.g. `echo -n secret | optgate hash-password`");
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash: {e}"))?;
    println!("{hash}");
    Ok(())
}
