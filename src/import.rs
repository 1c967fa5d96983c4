//! Consent rows from outside — a CSV file or the admin API — checked one by one and
//! turned into history events, so that both paths accept and refuse the same things.
//! The CSV layout lives here too, for reading imports and writing exports alike.

use std::io::Read;

use serde::Deserialize;

use crate::address::Address;
use crate::clock;
use crate::config::Config;
use crate::store::{ALL_PURPOSES, ConsentAction, ConsentEvent, NewConsentEvent};

/// The CSV columns, in the order exports write them; `source` and `evidence` may be
/// left out of an import.
pub const CSV_COLUMNS: [&str; 6] = [
    "email",
    "purpose",
    "status",
    "timestamp",
    "source",
    "evidence",
];
const REQUIRED_COLUMNS: usize = 4;

/// What makes a whole file unreadable, as opposed to one bad row.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "line 1: the header has no '{0}' column (needed: email, purpose, status, \
         timestamp; optional: source, evidence)"
    )]
    MissingColumn(&'static str),
    #[error("line {line}: {message}")]
    Csv { line: u64, message: String },
}

/// A row that was not imported: its line in the file (the header is line 1) and
/// why, as `field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub line: u64,
    pub reason: String,
}

/// What [`read_csv`] reports as it goes, for a progress bar.
pub enum Progress<'a> {
    /// One more row read; `bytes` of the input consumed so far.
    Row {
        bytes: u64,
    },
    Rejected(&'a Rejected),
}

/// A CSV file read and checked, nothing written yet.
#[derive(Debug, Default)]
pub struct CsvRows {
    /// The valid rows, in file order.
    pub events: Vec<NewConsentEvent>,
    /// The line of each valid row, for reporting what the store refuses.
    pub lines: Vec<u64>,
    pub rejected: Vec<Rejected>,
    /// Every data row read, valid or not.
    pub rows: u64,
}

/// Reads a consent CSV with a header line, checking each row with [`validate`].
/// Columns are found by name (any order, any case; unknown ones are ignored).
pub fn read_csv(
    config: &Config,
    input: impl Read,
    now: i64,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<CsvRows, FileError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(Tail::new(input));
    let header = reader.headers().map_err(|e| file_error(e, 1))?.clone();
    let mut index = [None; CSV_COLUMNS.len()];
    for (i, name) in header.iter().enumerate() {
        // Spreadsheets put a byte-order mark before the first name.
        let name = name.trim_start_matches('\u{feff}').trim();
        if let Some(c) = CSV_COLUMNS
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
        {
            index[c].get_or_insert(i);
        }
    }
    if let Some(c) = (0..REQUIRED_COLUMNS).find(|&c| index[c].is_none()) {
        return Err(FileError::MissingColumn(CSV_COLUMNS[c]));
    }
    let mut out = CsvRows::default();
    let mut record = csv::StringRecord::new();
    loop {
        let line;
        let outcome = match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let end = reader.position();
                let unterminated = reader.get_ref().unterminated_end() == Some(end.byte());
                line = first_line(&record, end.line(), unterminated);
                check_record(config, &record, &index, header.len(), now)
            }
            Err(e) => match e.kind() {
                csv::ErrorKind::Utf8 { pos, err } => {
                    line = pos.as_ref().map_or(0, |p| p.line());
                    Err(format!("row: field {} is not UTF-8 text", err.field() + 1))
                }
                _ => {
                    let line = e.position().map_or(0, |p| p.line());
                    return Err(file_error(e, line));
                }
            },
        };
        out.rows += 1;
        match outcome {
            Ok(event) => {
                out.events.push(event);
                out.lines.push(line);
            }
            Err(reason) => {
                out.rejected.push(Rejected { line, reason });
                if let Some(r) = out.rejected.last() {
                    progress(Progress::Rejected(r));
                }
            }
        }
        progress(Progress::Row {
            bytes: reader.position().byte(),
        });
    }
    Ok(out)
}

/// The line a record starts on. csv's own start position still counts the blank
/// lines it skipped before the record, so count back from where the record ended
/// (`end_line`, the line after its terminator, or its own last line when the file
/// ended it) over the line breaks inside its quoted fields.
fn first_line(record: &csv::StringRecord, end_line: u64, ended_by_eof: bool) -> u64 {
    let breaks: usize = record.iter().map(|f| f.matches('\n').count()).sum();
    let last_line = if ended_by_eof {
        end_line
    } else {
        end_line.saturating_sub(1)
    };
    last_line.saturating_sub(breaks as u64)
}

/// Passes the input through, noting where it ends and whether with a line break:
/// what [`first_line`] needs to know about the last record.
struct Tail<R> {
    inner: R,
    read: u64,
    last: Option<u8>,
    ended: bool,
}

impl<R> Tail<R> {
    fn new(inner: R) -> Tail<R> {
        Tail {
            inner,
            read: 0,
            last: None,
            ended: false,
        }
    }

    /// The input's length, once it is all read, if its last byte is no line break.
    fn unterminated_end(&self) -> Option<u64> {
        (self.ended && !matches!(self.last, None | Some(b'\n' | b'\r'))).then_some(self.read)
    }
}

impl<R: Read> Read for Tail<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        match buf[..n].last() {
            Some(&b) => {
                self.last = Some(b);
                self.read += n as u64;
            }
            None => self.ended = !buf.is_empty(),
        }
        Ok(n)
    }
}

fn file_error(e: csv::Error, line: u64) -> FileError {
    let message = e.to_string();
    match e.into_kind() {
        csv::ErrorKind::Io(e) => FileError::Io(e),
        _ => FileError::Csv { line, message },
    }
}

fn check_record(
    config: &Config,
    record: &csv::StringRecord,
    index: &[Option<usize>; CSV_COLUMNS.len()],
    columns: usize,
    now: i64,
) -> Result<NewConsentEvent, String> {
    if record.len() > columns {
        return Err(format!(
            "row: {} fields where the header names {columns} (a field with a comma must be \
             in double quotes)",
            record.len()
        ));
    }
    let field = |c: usize| index[c].and_then(|i| record.get(i)).unwrap_or("");
    let evidence = field(5);
    let row = ConsentRow {
        email: field(0).to_string(),
        purpose: field(1).to_string(),
        status: field(2).to_string(),
        timestamp: field(3).to_string(),
        source: field(4).to_string(),
        evidence: (!evidence.trim().is_empty())
            .then(|| serde_json::Value::String(evidence.to_string())),
    };
    validate(config, &row, now)
}

/// One history event as a CSV row of [`CSV_COLUMNS`], as an import reads it back.
pub fn csv_row(event: &ConsentEvent) -> [String; CSV_COLUMNS.len()] {
    let purpose = match event.purpose.as_str() {
        ALL_PURPOSES => "*".to_string(),
        p => p.to_string(),
    };
    let status = match event.action {
        ConsentAction::Grant => "granted",
        ConsentAction::Withdraw => "withdrawn",
    };
    let evidence = match &event.evidence {
        serde_json::Value::Object(o) if o.is_empty() => String::new(),
        other => other.to_string(),
    };
    [
        event.address.clone(),
        purpose,
        status.to_string(),
        clock::rfc3339(event.at),
        event.source.clone(),
        evidence,
    ]
}

/// One row as written: the CSV columns, or the API's JSON fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsentRow {
    pub email: String,
    /// A purpose id, or `*` for every purpose (withdrawals only).
    pub purpose: String,
    /// `granted` or `withdrawn`.
    pub status: String,
    /// RFC 3339: when the person gave or withdrew consent.
    pub timestamp: String,
    #[serde(default)]
    pub source: String,
    /// A JSON object, as text (CSV) or inline (API); empty for none.
    #[serde(default)]
    pub evidence: Option<serde_json::Value>,
}

/// Checks a row; the error says which field is wrong and why.
pub fn validate(config: &Config, row: &ConsentRow, now: i64) -> Result<NewConsentEvent, String> {
    let address = Address::parse(&row.email).map_err(|e| format!("email: {e}"))?;
    let action = match row.status.trim() {
        "granted" => ConsentAction::Grant,
        "withdrawn" => ConsentAction::Withdraw,
        other => {
            return Err(format!(
                "status: '{other}' is not \"granted\" or \"withdrawn\""
            ));
        }
    };
    let purpose = match row.purpose.trim() {
        "*" if action == ConsentAction::Grant => {
            return Err(
                "purpose: consent is given per purpose; '*' is only for withdrawals".into(),
            );
        }
        "*" => ALL_PURPOSES.to_string(),
        id if config.purpose(id).is_some() => id.to_string(),
        other => return Err(format!("purpose: unknown purpose '{other}'")),
    };
    let at = clock::parse_rfc3339(row.timestamp.trim()).ok_or_else(|| {
        format!(
            "timestamp: '{}' is not RFC 3339 (e.g. 2024-05-01T12:00:00Z)",
            row.timestamp
        )
    })?;
    if at > now + 300 {
        return Err(format!("timestamp: '{}' is in the future", row.timestamp));
    }
    let evidence = match &row.evidence {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => serde_json::json!({}),
        Some(serde_json::Value::String(s)) => serde_json::from_str::<serde_json::Value>(s)
            .ok()
            .filter(|v| v.is_object())
            .ok_or("evidence: not a JSON object")?,
        Some(v @ serde_json::Value::Object(_)) => v.clone(),
        Some(_) => return Err("evidence: not a JSON object".into()),
    };
    let source = match row.source.trim() {
        "" => "import".to_string(),
        s => s.to_string(),
    };
    Ok(NewConsentEvent {
        address,
        purpose,
        action,
        at,
        source,
        evidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/optgate.toml");
        Config::load(&path).unwrap()
    }

    fn row(
        email: &str,
        purpose: &str,
        status: &str,
        timestamp: &str,
        evidence: Option<&str>,
    ) -> ConsentRow {
        ConsentRow {
            email: email.into(),
            purpose: purpose.into(),
            status: status.into(),
            timestamp: timestamp.into(),
            source: String::new(),
            evidence: evidence.map(|e| serde_json::Value::String(e.into())),
        }
    }

    #[test]
    fn good_rows_become_events() {
        let c = config();
        let e = validate(
            &c,
            &row(
                "A@Example.COM",
                "newsletter",
                "granted",
                "2024-05-01T12:00:00Z",
                Some(r#"{"ip":"192.0.2.1"}"#),
            ),
            clock::now(),
        )
        .unwrap();
        assert_eq!(e.address.as_str(), "A@example.com");
        assert_eq!(
            (e.purpose.as_str(), e.action, e.at),
            ("newsletter", ConsentAction::Grant, 1_714_564_800)
        );
        assert_eq!(e.source, "import");
        assert_eq!(e.evidence["ip"], "192.0.2.1");
        let all = validate(
            &c,
            &row(
                "a@example.com",
                "*",
                "withdrawn",
                "2024-05-01T12:00:00+02:00",
                None,
            ),
            clock::now(),
        )
        .unwrap();
        assert_eq!(all.purpose, ALL_PURPOSES);
    }

    fn read(text: &[u8]) -> Result<CsvRows, FileError> {
        read_csv(&config(), text, clock::now(), |_| {})
    }

    #[test]
    fn a_csv_file_is_read_by_column_name_with_the_line_of_each_rejection() {
        let text = "\u{feff}Timestamp,email,purpose,status,notes,evidence,source\n\
            2024-05-01T12:00:00Z,a@example.com,newsletter,granted,x,\"{\"\"ip\"\":\"\"192.0.2.1\"\"}\",form\n\
            2024-05-01T12:00:00Z,nope,newsletter,granted,,,\n\
            \n\
            2024-05-02T12:00:00Z,b@example.com,*,withdrawn,\"two\nlines\",,\n\
            2024-05-02T12:00:00Z,c@example.com,newsletter,maybe,,,\n\
            2024-05-02T12:00:00Z,d@example.com,newsletter,granted,,{\"a\":1,\"b\":2},x\n\
            2024-05-02T12:00:00Z,e@example.com,newsletter,granted\n";
        let mut seen = Vec::new();
        let rows = read_csv(&config(), text.as_bytes(), clock::now(), |p| {
            if let Progress::Rejected(r) = p {
                seen.push(r.line);
            }
        })
        .unwrap();
        assert_eq!(rows.rows, 6);
        assert_eq!(rows.lines, vec![2, 5, 9]);
        let a = &rows.events[0];
        assert_eq!(
            (a.address.as_str(), a.purpose.as_str(), a.source.as_str()),
            ("a@example.com", "newsletter", "form")
        );
        assert_eq!(a.evidence["ip"], "192.0.2.1");
        assert_eq!(rows.events[1].purpose, ALL_PURPOSES);
        assert_eq!(rows.events[1].source, "import");
        assert_eq!(rows.events[2].address.as_str(), "e@example.com");
        let lines: Vec<u64> = rows.rejected.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![3, 7, 8]);
        assert_eq!(seen, lines);
        assert!(
            rows.rejected[0].reason.starts_with("email: 'nope'"),
            "{:?}",
            rows.rejected
        );
        assert!(rows.rejected[1].reason.starts_with("status: 'maybe'"));
        assert!(rows.rejected[2].reason.contains("double quotes"));
    }

    #[test]
    fn an_unreadable_file_is_one_error() {
        let missing = read(b"email,purpose,status\na@example.com,newsletter,granted\n");
        assert!(matches!(
            missing,
            Err(FileError::MissingColumn("timestamp"))
        ));
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .starts_with("line 1: the header has no 'timestamp' column")
        );
        let empty = read(b"").unwrap_err();
        assert!(
            matches!(empty, FileError::MissingColumn("email")),
            "{empty}"
        );
        // Bytes that are not UTF-8 spoil one row, not the file.
        let latin1 = read(
            b"email,purpose,status,timestamp\n\
            caf\xe9@example.com,newsletter,granted,2024-05-01T12:00:00Z\n\
            ok@example.com,newsletter,granted,2024-05-01T12:00:00Z\n",
        )
        .unwrap();
        assert_eq!(latin1.lines, vec![3]);
        // Blank lines before a last row with no line break: still its own line.
        let last = read(
            b"email,purpose,status,timestamp\n\n\nnope,newsletter,granted,2024-05-01T12:00:00Z",
        )
        .unwrap();
        assert_eq!(last.rejected[0].line, 4);
        assert_eq!(
            latin1.rejected,
            vec![Rejected {
                line: 2,
                reason: "row: field 1 is not UTF-8 text".into()
            }]
        );
    }

    #[test]
    fn an_exported_row_reads_back_as_the_same_event() {
        let c = config();
        let event = ConsentEvent {
            id: 9,
            address: "A@example.com".into(),
            purpose: ALL_PURPOSES.into(),
            action: ConsentAction::Withdraw,
            at: 1_714_564_800,
            recorded_at: 1_714_564_900,
            source: "page, footer".into(),
            evidence: serde_json::json!({ "ip": "192.0.2.1", "ua": "a \"quoted\" agent" }),
        };
        let mut out = csv::Writer::from_writer(Vec::new());
        out.write_record(CSV_COLUMNS).unwrap();
        out.write_record(csv_row(&event)).unwrap();
        let mut plain = event.clone();
        plain.action = ConsentAction::Grant;
        plain.purpose = "newsletter".into();
        plain.evidence = serde_json::json!({});
        out.write_record(csv_row(&plain)).unwrap();
        let text = out.into_inner().unwrap();
        let back = read_csv(&c, text.as_slice(), clock::now(), |_| {}).unwrap();
        assert!(back.rejected.is_empty(), "{:?}", back.rejected);
        let e = &back.events[0];
        assert_eq!(
            (
                e.address.as_str(),
                e.purpose.as_str(),
                e.action,
                e.at,
                e.source.as_str()
            ),
            (
                "A@example.com",
                ALL_PURPOSES,
                ConsentAction::Withdraw,
                1_714_564_800,
                "page, footer"
            )
        );
        assert_eq!(e.evidence, event.evidence);
        assert_eq!(back.events[1].evidence, serde_json::json!({}));
        assert_eq!(csv_row(&plain)[5], "");
    }

    #[test]
    fn bad_rows_name_the_field() {
        let c = config();
        let now = clock::now();
        let err = |r: ConsentRow| validate(&c, &r, now).unwrap_err();
        assert!(
            err(row(
                "nope",
                "newsletter",
                "granted",
                "2024-05-01T12:00:00Z",
                None
            ))
            .starts_with("email:")
        );
        assert!(
            err(row(
                "a@example.com",
                "spam",
                "granted",
                "2024-05-01T12:00:00Z",
                None
            ))
            .contains("unknown purpose 'spam'")
        );
        assert!(
            err(row(
                "a@example.com",
                "*",
                "granted",
                "2024-05-01T12:00:00Z",
                None
            ))
            .starts_with("purpose:")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "yes",
                "2024-05-01T12:00:00Z",
                None
            ))
            .starts_with("status:")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "granted",
                "yesterday",
                None
            ))
            .starts_with("timestamp:")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "granted",
                "2999-01-01T00:00:00Z",
                None
            ))
            .contains("future")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "granted",
                "2024-05-01T12:00:00Z",
                Some("[1]")
            ))
            .starts_with("evidence:")
        );
    }
}
