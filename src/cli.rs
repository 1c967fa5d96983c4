//! The command line: what an operator types, parsed by clap, each command a short
//! function over the config and the store. Errors come back as one line.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::address::Address;
use crate::clock;
use crate::config::Config;
use crate::policy::{Decision, decide};
use crate::store::{ALL_PURPOSES, ConsentAction, NewConsentEvent, SqliteStore, Store};

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
    /// Contact attributes and the suppression list.
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
            std::fs::create_dir_all(&config.storage.data_dir)?;
            let id = crate::token::TokenKeys::rotate(
                &config.storage.data_dir,
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
    }
}

fn show(config: &Config, address: &Address) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let record = store.contact(address)?;
    let now = clock::now();
    let mut out = std::io::stdout().lock();
    match &record {
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
