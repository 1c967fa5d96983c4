//! The operator's TOML file, read into typed and validated settings. Every error names
//! the file and the key (and, for syntax errors, the line), so a typo is found at once.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::{Basis, Purpose};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole validated configuration, with every path made absolute.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub smtp: SmtpConfig,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub upstream: UpstreamConfig,
    pub queue: QueueConfig,
    pub dkim: DkimConfig,
    pub tokens: TokensConfig,
    pub unsubscribe: UnsubscribeConfig,
    pub api: ApiConfig,
    pub webhooks: Vec<WebhookConfig>,
    pub double_opt_in: DoubleOptInConfig,
    pub default_purpose: String,
    pub purposes: Vec<Purpose>,
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    /// Listeners where TLS starts with the connection (RFC 8314 implicit TLS, the
    /// `submissions` port 465 of mailers set to "SSL"/`secure: true`).
    pub listen_implicit_tls: Vec<SocketAddr>,
    /// The name optgate gives itself in the greeting and in Received/DSN headers.
    pub hostname: String,
    pub trusted_networks: Vec<IpNet>,
    pub max_message_size: usize,
    pub max_recipients: usize,
    /// Longest data line accepted, in octets without CRLF (RFC 5322 says 998).
    pub max_line_length: usize,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Certificate and key for STARTTLS; None means a self-signed pair is generated
    /// into the data directory on first start.
    pub tls: Option<TlsFiles>,
    pub accounts: Vec<Account>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Account {
    pub username: String,
    /// A PHC string (`$argon2id$…`), as printed by `optgate hash-password`.
    pub password_hash: String,
    /// If set, the only purposes this account may send for.
    pub purposes: Option<Vec<String>>,
    pub default_purpose: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub public_url: String,
    /// Reverse proxies (TLS terminators) whose `X-Forwarded-For` names the client: the
    /// address the evidence records and the rate limits count. Empty: the TCP peer.
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// fsync every commit (the default). Off only for throwaway test instances.
    pub fsync: bool,
}

impl StorageConfig {
    pub fn database(&self) -> PathBuf {
        self.data_dir.join("optgate.db")
    }
}

#[derive(Debug, Clone)]
pub enum UpstreamConfig {
    /// Write every outgoing copy as an .eml file into a folder.
    File {
        path: PathBuf,
    },
    Smtp(SmtpUpstream),
}

#[derive(Debug, Clone)]
pub struct SmtpUpstream {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Accept an upstream certificate that does not verify (self-signed test relays).
    pub accept_invalid_certs: bool,
    /// Connections kept open to the upstream.
    pub pool_size: u32,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Delay before each retry of a transient failure; the last one repeats.
    pub retry_schedule: Vec<Duration>,
    /// Past this age a message that still cannot be delivered is bounced.
    pub max_age: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// New SMTP sessions wait for their greeting while this many copies wait to be
    /// made, counting those expected from the sessions let in (0: never).
    pub backpressure_copies: usize,
    /// The longest such a wait lasts; the session is then served anyway.
    pub backpressure_max_wait: Duration,
}

#[derive(Debug, Clone)]
pub struct DkimConfig {
    pub keys: Vec<DkimKeyConfig>,
    /// Make (once, into the data directory) a key for a From domain that has none.
    pub generate_missing: bool,
}

#[derive(Debug, Clone)]
pub struct DkimKeyConfig {
    pub domain: String,
    pub selector: String,
    pub algorithm: crate::dkim::Algorithm,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct TokensConfig {
    /// The signing keys (created on first start; share it between nodes).
    pub keys_file: PathBuf,
    /// How long links signed with a retired key keep working after `optgate tokens rotate`.
    pub retired_key_validity: Duration,
}

#[derive(Debug, Clone)]
pub struct UnsubscribeConfig {
    /// A mailbox offered second in List-Unsubscribe (`mailto:`), for clients without HTTP.
    pub mailto: Option<String>,
    /// Requests per minute one IP may make to the unsubscribe pages.
    pub rate_limit_per_minute: u32,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Bearer tokens accepted by /api/v1 (and /metrics); none means the API is off.
    pub tokens: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    /// Signs each delivery (HMAC-SHA256), so the receiver knows it came from us.
    pub secret: String,
    pub start: WebhookStart,
}

/// Where a webhook URL never seen before starts in the events feed. Only its first
/// start counts: from then on its cursor says where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookStart {
    /// With the oldest event held: the receiver learns the whole history (a CRM
    /// being brought in sync).
    #[default]
    Oldest,
    /// After the newest event held: only the changes from then on (a receiver that
    /// has no use for years of imports replayed one request at a time).
    Now,
}

#[derive(Debug, Clone)]
pub struct DoubleOptInConfig {
    /// How long a confirmation link works.
    pub link_validity: Duration,
    /// The From of the confirmation mail.
    pub from: String,
    /// The envelope sender of the confirmation mail (bounces go there); empty: null.
    pub sender: String,
    /// Sign-ups accepted per address per day, and per IP per hour (beyond: no mail).
    pub max_per_address_per_day: u32,
    pub max_per_ip_per_hour: u32,
}

// ---- the file as written ---------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    smtp: RawSmtp,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    dkim: RawDkim,
    #[serde(default)]
    tokens: RawTokens,
    #[serde(default)]
    unsubscribe: RawUnsubscribe,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    #[serde(default)]
    double_opt_in: RawDoubleOptIn,
    #[serde(default)]
    purpose: Vec<RawPurpose>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    #[serde(default)]
    tokens: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret: String,
    #[serde(default)]
    start: WebhookStart,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDoubleOptIn {
    link_validity: String,
    from: String,
    sender: String,
    max_per_address_per_day: u32,
    max_per_ip_per_hour: u32,
}

impl Default for RawDoubleOptIn {
    fn default() -> Self {
        RawDoubleOptIn {
            link_validity: "7d".into(),
            from: "optgate <noreply@localhost>".into(),
            sender: String::new(),
            max_per_address_per_day: 3,
            max_per_ip_per_hour: 30,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDkim {
    key: Vec<RawDkimKey>,
    generate_missing: bool,
}

impl Default for RawDkim {
    fn default() -> Self {
        RawDkim {
            key: Vec::new(),
            generate_missing: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDkimKey {
    domain: String,
    selector: String,
    algorithm: crate::dkim::Algorithm,
    private_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTokens {
    keys_file: Option<String>,
    retired_key_validity: String,
}

impl Default for RawTokens {
    fn default() -> Self {
        RawTokens {
            keys_file: None,
            retired_key_validity: "180d".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUnsubscribe {
    mailto: Option<String>,
    rate_limit_per_minute: u32,
}

impl Default for RawUnsubscribe {
    fn default() -> Self {
        RawUnsubscribe {
            mailto: None,
            rate_limit_per_minute: 60,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSmtp {
    listen: Vec<String>,
    listen_implicit_tls: Vec<String>,
    hostname: Option<String>,
    trusted_networks: Vec<String>,
    max_message_size: usize,
    max_recipients: usize,
    max_line_length: usize,
    idle_timeout: String,
    max_connections: usize,
    max_connections_per_ip: usize,
    tls: Option<RawTls>,
    account: Vec<RawAccount>,
}

impl Default for RawSmtp {
    fn default() -> Self {
        RawSmtp {
            listen: vec!["127.0.0.1:2525".into()],
            listen_implicit_tls: Vec::new(),
            hostname: None,
            trusted_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_line_length: 998,
            idle_timeout: "5m".into(),
            max_connections: 1024,
            max_connections_per_ip: 128,
            tls: None,
            account: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    username: String,
    password_hash: String,
    purposes: Option<Vec<String>>,
    default_purpose: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    listen: String,
    public_url: String,
    trusted_proxies: Vec<String>,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: "127.0.0.1:8080".into(),
            public_url: "http://127.0.0.1:8080".into(),
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStorage {
    data_dir: String,
    fsync: bool,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            data_dir: "data".into(),
            fsync: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    kind: String,
    path: String,
    host: Option<String>,
    port: Option<u16>,
    tls: Option<UpstreamTls>,
    username: Option<String>,
    password: Option<String>,
    accept_invalid_certs: bool,
    pool_size: u32,
    timeout: String,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            kind: "file".into(),
            path: "data/outbox".into(),
            host: None,
            port: None,
            tls: None,
            username: None,
            password: None,
            accept_invalid_certs: false,
            pool_size: 16,
            timeout: "60s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQueue {
    retry_schedule: Vec<String>,
    max_age: String,
    concurrency: usize,
    backpressure_copies: usize,
    backpressure_max_wait: String,
}

impl Default for RawQueue {
    fn default() -> Self {
        RawQueue {
            retry_schedule: ["1m", "5m", "15m", "1h", "4h"].map(String::from).to_vec(),
            max_age: "5d".into(),
            concurrency: 64,
            backpressure_copies: 16,
            backpressure_max_wait: "20s".into(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default_purpose: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPurpose {
    id: String,
    name: String,
    basis: Basis,
    expires_after_days: Option<u32>,
    #[serde(default)]
    description: String,
    #[serde(default = "default_locale")]
    locale: String,
    footer_text: Option<String>,
    footer_html: Option<String>,
    #[serde(default)]
    public: bool,
}

fn default_locale() -> String {
    "en".into()
}

// ---- reading and validating ------------------------------------------------------

impl Config {
    /// Reads, parses and validates `path`. Relative paths inside are taken from the
    /// folder that holds the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text as if read from `path` (which anchors relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        Validator { path, base: &base }.config(raw)
    }

    pub fn purpose(&self, id: &str) -> Option<&Purpose> {
        self.purposes.iter().find(|p| p.id == id)
    }

    /// The purpose a token's scope names (see [`crate::token::purpose_tag`]).
    pub fn purpose_by_tag(&self, tag: u32) -> Option<&Purpose> {
        self.purposes
            .iter()
            .find(|p| crate::token::purpose_tag(&p.id) == tag)
    }

    /// Whether `ip` belongs to a network that may relay without AUTH.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.smtp.trusted_networks.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4 clients reaching a dual-stack socket appear as `::ffff:a.b.c.d`.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Purpose ids with a meaning of their own: "all" in the consent history, and the
/// purposes of optgate's own mail (bounce reports, double opt-in confirmations),
/// which are sent as they are, with no unsubscribe link.
const RESERVED_PURPOSES: [&str; 3] = [
    crate::store::ALL_PURPOSES,
    crate::delivery::DSN_PURPOSE,
    crate::web::CONFIRMATION_PURPOSE,
];

struct Validator<'a> {
    path: &'a Path,
    base: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn duration(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        humantime::parse_duration(value).map_err(|e| {
            self.err(
                key,
                format!(
                    "'{value}' is not a duration ({e}); write e.g. \"90s\", \"5m\", \"4h\", \"5d\""
                ),
            )
        })
    }

    fn socket(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.err(
                key,
                format!("'{value}' is not an address:port such as \"127.0.0.1:2525\""),
            )
        })
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let purposes = self.purposes(raw.purpose)?;
        let known = |id: &str| purposes.iter().any(|p| p.id == id);
        let default_purpose = match raw.policy.default_purpose {
            Some(id) if known(&id) => id,
            Some(id) => {
                return Err(self.err("policy.default_purpose", format!("unknown purpose '{id}'")));
            }
            None => purposes[0].id.clone(),
        };
        let smtp = self.smtp(raw.smtp, &known)?;
        let http = raw.http;
        let http = HttpConfig {
            listen: self.socket("http.listen", &http.listen)?,
            public_url: http.public_url.trim_end_matches('/').to_string(),
            trusted_proxies: self.networks("http.trusted_proxies", &http.trusted_proxies)?,
        };
        if !(http.public_url.starts_with("http://") || http.public_url.starts_with("https://")) {
            return Err(self.err("http.public_url", "must start with http:// or https://"));
        }
        let storage = StorageConfig {
            data_dir: self.resolve(&raw.storage.data_dir),
            fsync: raw.storage.fsync,
        };
        let upstream = self.upstream(raw.upstream)?;
        let queue = self.queue(raw.queue)?;
        let dkim = self.dkim(raw.dkim)?;
        let tokens = TokensConfig {
            keys_file: raw
                .tokens
                .keys_file
                .as_deref()
                .map(|f| self.resolve(f))
                .unwrap_or_else(|| storage.data_dir.join("token-keys")),
            retired_key_validity: self.duration(
                "tokens.retired_key_validity",
                &raw.tokens.retired_key_validity,
            )?,
        };
        if let Some(m) = &raw.unsubscribe.mailto
            && crate::address::Address::parse(m).is_err()
        {
            return Err(self.err(
                "unsubscribe.mailto",
                format!("'{m}' is not an email address"),
            ));
        }
        let api = self.api(raw.api)?;
        let webhooks = self.webhooks(raw.webhook)?;
        let double_opt_in = self.double_opt_in(raw.double_opt_in)?;
        if raw.unsubscribe.rate_limit_per_minute == 0 {
            return Err(self.err(
                "unsubscribe.rate_limit_per_minute",
                "must be greater than 0",
            ));
        }
        Ok(Config {
            path: self.path.to_path_buf(),
            smtp,
            http,
            storage,
            upstream,
            queue,
            dkim,
            tokens,
            unsubscribe: UnsubscribeConfig {
                mailto: raw.unsubscribe.mailto,
                rate_limit_per_minute: raw.unsubscribe.rate_limit_per_minute,
            },
            api,
            webhooks,
            double_opt_in,
            default_purpose,
            purposes,
        })
    }

    fn purposes(&self, raw: Vec<RawPurpose>) -> Result<Vec<Purpose>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err("purpose", "at least one [[purpose]] is needed"));
        }
        let mut out: Vec<Purpose> = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let key = format!("purpose[{i}].id");
            if p.id.is_empty()
                || RESERVED_PURPOSES.contains(&p.id.as_str())
                || !p
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(self.err(
                    key,
                    format!(
                        "'{}' must be lower-case letters, digits, '-' or '_', and none of {}",
                        p.id,
                        RESERVED_PURPOSES.join(", ")
                    ),
                ));
            }
            if out.iter().any(|q| q.id == p.id) {
                return Err(self.err(key, format!("purpose '{}' is defined twice", p.id)));
            }
            for (key, template) in [
                ("footer_text", &p.footer_text),
                ("footer_html", &p.footer_html),
            ] {
                if let Some(t) = template
                    && !t.contains("{unsubscribe_url}")
                {
                    return Err(self.err(
                        format!("purpose[{i}].{key}"),
                        "must contain {unsubscribe_url}: every message offers a way to object",
                    ));
                }
            }
            if p.expires_after_days.is_some() && p.basis != Basis::Consent {
                return Err(self.err(
                    format!("purpose[{i}].expires_after_days"),
                    "only purposes with basis = \"consent\" expire",
                ));
            }
            out.push(Purpose {
                id: p.id,
                name: p.name,
                basis: p.basis,
                expires_after_days: p.expires_after_days,
                description: p.description,
                locale: p.locale,
                footer_text: p.footer_text,
                footer_html: p.footer_html,
                public: p.public,
            });
        }
        Ok(out)
    }

    /// Networks ("10.0.0.0/8") or single addresses.
    fn networks(&self, key: &str, raw: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        raw.iter()
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        self.err(
                            key,
                            format!("'{n}' is not a network such as \"10.0.0.0/8\""),
                        )
                    })
            })
            .collect()
    }

    fn smtp(&self, raw: RawSmtp, known: &dyn Fn(&str) -> bool) -> Result<SmtpConfig, ConfigError> {
        if raw.listen.is_empty() {
            return Err(self.err("smtp.listen", "give at least one address:port"));
        }
        let listen = raw
            .listen
            .iter()
            .map(|l| self.socket("smtp.listen", l))
            .collect::<Result<Vec<_>, _>>()?;
        let listen_implicit_tls = raw
            .listen_implicit_tls
            .iter()
            .map(|l| self.socket("smtp.listen_implicit_tls", l))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(both) = listen_implicit_tls.iter().find(|a| listen.contains(a)) {
            return Err(self.err(
                "smtp.listen_implicit_tls",
                format!("{both} is in smtp.listen too: one port cannot both start in TLS and offer STARTTLS"),
            ));
        }
        let trusted_networks = self.networks("smtp.trusted_networks", &raw.trusted_networks)?;
        for (key, v) in [
            ("smtp.max_message_size", raw.max_message_size),
            ("smtp.max_recipients", raw.max_recipients),
            ("smtp.max_connections", raw.max_connections),
            ("smtp.max_connections_per_ip", raw.max_connections_per_ip),
        ] {
            if v == 0 {
                return Err(self.err(key, "must be greater than 0"));
            }
        }
        if raw.max_line_length < 78 {
            return Err(self.err("smtp.max_line_length", "must be at least 78"));
        }
        let mut accounts: Vec<Account> = Vec::new();
        for (i, a) in raw.account.into_iter().enumerate() {
            let key = |k: &str| format!("smtp.account[{i}].{k}");
            if a.username.is_empty() || accounts.iter().any(|b| b.username == a.username) {
                return Err(self.err(key("username"), "must be non-empty and unique"));
            }
            if argon2::PasswordHash::new(&a.password_hash).is_err() {
                return Err(self.err(
                    key("password_hash"),
                    "is not a PHC hash string; make one with `optgate hash-password`",
                ));
            }
            for p in a.purposes.iter().flatten().chain(a.default_purpose.iter()) {
                if !known(p) {
                    return Err(self.err(key("purposes"), format!("unknown purpose '{p}'")));
                }
            }
            if let (Some(list), Some(d)) = (&a.purposes, &a.default_purpose)
                && !list.contains(d)
            {
                return Err(self.err(
                    key("default_purpose"),
                    format!("'{d}' is not in this account's purposes"),
                ));
            }
            accounts.push(Account {
                username: a.username,
                password_hash: a.password_hash,
                purposes: a.purposes,
                default_purpose: a.default_purpose,
            });
        }
        Ok(SmtpConfig {
            listen,
            listen_implicit_tls,
            hostname: raw.hostname.unwrap_or_else(|| "localhost".into()),
            trusted_networks,
            max_message_size: raw.max_message_size,
            max_recipients: raw.max_recipients,
            max_line_length: raw.max_line_length,
            idle_timeout: self.duration("smtp.idle_timeout", &raw.idle_timeout)?,
            max_connections: raw.max_connections,
            max_connections_per_ip: raw.max_connections_per_ip,
            tls: raw.tls.map(|t| TlsFiles {
                cert: self.resolve(&t.cert),
                key: self.resolve(&t.key),
            }),
            accounts,
        })
    }

    fn upstream(&self, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        match raw.kind.as_str() {
            "file" => Ok(UpstreamConfig::File {
                path: self.resolve(&raw.path),
            }),
            "smtp" => {
                let host = raw
                    .host
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| self.err("upstream.host", "is required when kind = \"smtp\""))?;
                let tls = raw.tls.unwrap_or(UpstreamTls::Starttls);
                if raw.username.is_some() != raw.password.is_some() {
                    return Err(self.err("upstream.password", "username and password go together"));
                }
                if raw.pool_size == 0 {
                    return Err(self.err("upstream.pool_size", "must be greater than 0"));
                }
                Ok(UpstreamConfig::Smtp(SmtpUpstream {
                    host,
                    port: raw.port.unwrap_or(match tls {
                        UpstreamTls::Tls => 465,
                        _ => 25,
                    }),
                    tls,
                    username: raw.username,
                    password: raw.password,
                    accept_invalid_certs: raw.accept_invalid_certs,
                    pool_size: raw.pool_size,
                    timeout: self.duration("upstream.timeout", &raw.timeout)?,
                }))
            }
            other => Err(self.err(
                "upstream.kind",
                format!("'{other}' is not \"file\" or \"smtp\""),
            )),
        }
    }

    fn dkim(&self, raw: RawDkim) -> Result<DkimConfig, ConfigError> {
        let mut keys = Vec::with_capacity(raw.key.len());
        for (i, k) in raw.key.into_iter().enumerate() {
            if crate::address::Address::parse(&format!("x@{}", k.domain)).is_err() {
                return Err(self.err(
                    format!("dkim.key[{i}].domain"),
                    format!("'{}' is not a domain", k.domain),
                ));
            }
            if k.selector.is_empty()
                || !k
                    .selector
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(self.err(
                    format!("dkim.key[{i}].selector"),
                    format!("'{}' is not a DNS label", k.selector),
                ));
            }
            keys.push(DkimKeyConfig {
                domain: k.domain.to_ascii_lowercase(),
                selector: k.selector,
                algorithm: k.algorithm,
                private_key: self.resolve(&k.private_key),
            });
        }
        Ok(DkimConfig {
            keys,
            generate_missing: raw.generate_missing,
        })
    }

    fn api(&self, raw: RawApi) -> Result<ApiConfig, ConfigError> {
        if let Some(i) = raw.tokens.iter().position(|t| t.len() < 24) {
            return Err(self.err(
                format!("api.tokens[{i}]"),
                "a token needs at least 24 characters (e.g. `openssl rand -hex 24`)",
            ));
        }
        Ok(ApiConfig { tokens: raw.tokens })
    }

    fn webhooks(&self, raw: Vec<RawWebhook>) -> Result<Vec<WebhookConfig>, ConfigError> {
        raw.into_iter()
            .enumerate()
            .map(|(i, w)| {
                if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                    return Err(self.err(
                        format!("webhook[{i}].url"),
                        format!("'{}' is not an http(s) URL", w.url),
                    ));
                }
                if w.secret.len() < 16 {
                    return Err(self.err(
                        format!("webhook[{i}].secret"),
                        "a secret needs at least 16 characters",
                    ));
                }
                Ok(WebhookConfig {
                    url: w.url,
                    secret: w.secret,
                    start: w.start,
                })
            })
            .collect()
    }

    fn double_opt_in(&self, raw: RawDoubleOptIn) -> Result<DoubleOptInConfig, ConfigError> {
        if !raw.sender.is_empty() && crate::address::Address::parse(&raw.sender).is_err() {
            return Err(self.err(
                "double_opt_in.sender",
                format!("'{}' is not an email address", raw.sender),
            ));
        }
        if !raw.from.contains('@') {
            return Err(self.err(
                "double_opt_in.from",
                format!("'{}' has no address", raw.from),
            ));
        }
        Ok(DoubleOptInConfig {
            link_validity: self.duration("double_opt_in.link_validity", &raw.link_validity)?,
            from: raw.from,
            sender: raw.sender,
            max_per_address_per_day: raw.max_per_address_per_day,
            max_per_ip_per_hour: raw.max_per_ip_per_hour,
        })
    }

    fn queue(&self, raw: RawQueue) -> Result<QueueConfig, ConfigError> {
        if raw.retry_schedule.is_empty() {
            return Err(self.err("queue.retry_schedule", "give at least one delay"));
        }
        if raw.concurrency == 0 {
            return Err(self.err("queue.concurrency", "must be greater than 0"));
        }
        Ok(QueueConfig {
            retry_schedule: raw
                .retry_schedule
                .iter()
                .map(|d| self.duration("queue.retry_schedule", d))
                .collect::<Result<_, _>>()?,
            max_age: self.duration("queue.max_age", &raw.max_age)?,
            concurrency: raw.concurrency,
            backpressure_copies: raw.backpressure_copies,
            backpressure_max_wait: self
                .duration("queue.backpressure_max_wait", &raw.backpressure_max_wait)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[purpose]]\nid = \"news\"\nname = \"News\"\nbasis = \"consent\"\n";

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/optgate.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert!(
            c.storage.data_dir.ends_with("config/../data") || c.storage.data_dir.ends_with("data")
        );
        assert!(c.purposes.iter().any(|p| p.basis == Basis::Transactional));
    }

    #[test]
    fn defaults_fill_a_minimal_file_and_paths_are_relative_to_it() {
        let c = Config::parse(MINIMAL, Path::new("/etc/optgate/optgate.toml")).unwrap();
        assert_eq!(c.default_purpose, "news");
        assert_eq!(c.storage.data_dir, PathBuf::from("/etc/optgate/data"));
        assert!(c.is_trusted("127.0.0.1".parse().unwrap()));
        assert!(c.is_trusted("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.is_trusted("192.0.2.1".parse().unwrap()));
        assert_eq!(c.queue.retry_schedule[0], Duration::from_secs(60));
    }

    /// The error `Config::parse` gives for `section` laid before [`MINIMAL`].
    fn error_of(section: &str) -> String {
        Config::parse(&format!("{section}\n{MINIMAL}"), Path::new("x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_key() {
        for (section, named) in [
            (
                "[policy]\ndefault_purpose = \"nope\"",
                &["policy.default_purpose", "nope"][..],
            ),
            ("[queue]\nmax_age = \"soon\"", &["queue.max_age"]),
            ("[smtp]\nlisten = [\"nowhere\"]", &["smtp.listen"]),
            (
                "[smtp]\nlisten = [\"127.0.0.1:465\"]\nlisten_implicit_tls = [\"127.0.0.1:465\"]",
                &["smtp.listen_implicit_tls"],
            ),
            (
                "[http]\ntrusted_proxies = [\"the nginx box\"]",
                &["http.trusted_proxies", "the nginx box"],
            ),
        ] {
            let e = error_of(section);
            assert!(named.iter().all(|n| e.contains(n)), "{section}: {e}");
        }
        let good = format!("[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n{MINIMAL}");
        let proxies = Config::parse(&good, Path::new("x.toml"))
            .unwrap()
            .http
            .trusted_proxies;
        assert_eq!(
            proxies,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_webhook_starts_with_the_oldest_event_unless_told_now() {
        let hook = |start: &str| {
            let section = format!(
                "[[webhook]]\nurl = \"https://crm.example/h\"\nsecret = \"0123456789abcdef\"\n{start}\n{MINIMAL}"
            );
            Config::parse(&section, Path::new("x.toml")).map(|c| c.webhooks[0].start)
        };
        assert_eq!(hook("").unwrap(), WebhookStart::Oldest);
        assert_eq!(hook("start = \"oldest\"").unwrap(), WebhookStart::Oldest);
        assert_eq!(hook("start = \"now\"").unwrap(), WebhookStart::Now);
        let e = hook("start = \"yesterday\"").unwrap_err().to_string();
        assert!(e.contains("yesterday") && e.contains("now"), "{e}");
    }

    #[test]
    fn syntax_errors_and_unknown_keys_give_the_line() {
        let e = Config::parse("[smtp]\nlisten = [\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("line"), "{e}");
        let e = Config::parse(
            &format!("[smtp]\nlisen = []\n{MINIMAL}"),
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lisen") && e.contains("line 2"), "{e}");
    }
}
