//! Access log in Envoy's default format, or JSON, to stdout or a file.
//!
//! Text lines follow Envoy's default format:
//!
//! ```text
//! [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
//! %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
//! "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
//! ```
//!
//! followed by two fields of ours, the SPIFFE IDs of both peers (Envoy's command
//! operators, quoted like the others):
//!
//! ```text
//! "%DOWNSTREAM_PEER_URI_SAN%" "%UPSTREAM_PEER_URI_SAN%"
//! ```
//!
//! (one line; absent values are `-`). Envoy's default format has no identities; we append
//! them after its fields, so a parser of the default format still finds every field where
//! it expects it. The downstream peer is the client of an mTLS connection the request
//! arrived on (inbound); the upstream peer is the server whose certificate the outbound
//! mTLS connection verified. Every field a client controls (method, path,
//! headers, authority) is escaped: bytes outside printable ASCII become `\xHH`, and `"` and
//! `\` are backslash-escaped, so no request can forge or split log lines (SECURITY.md §2.2,
//! Envoy CVE-2024-45808); the identities are escaped the same way. JSON lines carry the
//! same fields (the identities as `downstream_peer_uri_san` and `upstream_peer_uri_san`,
//! `null` when absent), escaped by the JSON encoder.
//!
//! Lines go through a bounded queue to one writer task; when the writer falls behind,
//! entries are dropped and counted (`mesh_access_log_dropped_total`) rather than slowing
//! requests.
//!
//! # Example
//!
//! ```
//! use mesh_telemetry::access_log::{AccessLog, Format};
//! use mesh_telemetry::{MetricsRegistry, Telemetry, Workload};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let metrics = MetricsRegistry::new();
//! let log = AccessLog::stdout(Format::Text, metrics.proxy().access_log_dropped.clone());
//! let telemetry = Telemetry::builder(Workload::new("reviews-v1", "default"))
//!     .metrics(metrics)
//!     .access_log(log)
//!     .build();
//! # drop(telemetry);
//! # }
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use mesh_core::{Identity, ResponseFlags};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// One finished request, as the access log sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessEntry {
    /// Wall-clock start.
    pub start: SystemTime,
    /// Request method.
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, …
    pub protocol: http::Version,
    /// Final status, `0` if none was sent.
    pub response_code: u16,
    /// Response flags.
    pub flags: ResponseFlags,
    /// Request body bytes received.
    pub bytes_received: u64,
    /// Response body bytes sent.
    pub bytes_sent: u64,
    /// Duration to the end of the response.
    pub duration: Duration,
    /// Response `x-envoy-upstream-service-time`.
    pub upstream_service_time: Option<HeaderValue>,
    /// Request `x-forwarded-for`.
    pub forwarded_for: Option<HeaderValue>,
    /// Request `user-agent`.
    pub user_agent: Option<HeaderValue>,
    /// Request `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// Request authority (`:authority` or `host`).
    pub authority: Option<String>,
    /// The upstream that answered.
    pub upstream_host: Option<SocketAddr>,
    /// The verified SPIFFE ID of the downstream peer (`%DOWNSTREAM_PEER_URI_SAN%`).
    pub downstream_peer_uri_san: Option<Identity>,
    /// The verified SPIFFE ID of the upstream peer (`%UPSTREAM_PEER_URI_SAN%`).
    pub upstream_peer_uri_san: Option<Identity>,
}

/// Line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Envoy's default text format.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Appends `bytes` escaped for a quoted text field.
fn escape_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02X}");
            }
        }
    }
}

fn field(out: &mut String, v: Option<&[u8]>) {
    match v {
        Some(b) if !b.is_empty() => escape_into(out, b),
        _ => out.push('-'),
    }
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// `2016-04-15T20:17:00.310Z`.
pub fn format_start_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian, era-based arithmetic).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl AccessEntry {
    /// The entry in Envoy's default text format, with a trailing newline.
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push('[');
        out.push_str(&format_start_time(self.start));
        out.push_str("] \"");
        escape_into(&mut out, self.method.as_str().as_bytes());
        out.push(' ');
        field(&mut out, Some(self.path.as_bytes()));
        out.push(' ');
        out.push_str(protocol(self.protocol));
        let _ = write!(
            out,
            "\" {} {} {} {} {} ",
            self.response_code,
            self.flags,
            self.bytes_received,
            self.bytes_sent,
            self.duration.as_millis()
        );
        field(
            &mut out,
            self.upstream_service_time
                .as_ref()
                .map(HeaderValue::as_bytes),
        );
        for v in [
            self.forwarded_for.as_ref().map(HeaderValue::as_bytes),
            self.user_agent.as_ref().map(HeaderValue::as_bytes),
            self.request_id.as_ref().map(HeaderValue::as_bytes),
            self.authority.as_deref().map(str::as_bytes),
        ] {
            out.push_str(" \"");
            field(&mut out, v);
            out.push('"');
        }
        out.push_str(" \"");
        match self.upstream_host {
            Some(a) => {
                let _ = write!(out, "{a}");
            }
            None => out.push('-'),
        }
        out.push('"');
        for id in [&self.downstream_peer_uri_san, &self.upstream_peer_uri_san] {
            out.push_str(" \"");
            field(&mut out, id.as_ref().map(|i| i.as_str().as_bytes()));
            out.push('"');
        }
        out.push('\n');
        out
    }

    /// The entry as one JSON object, with a trailing newline.
    pub fn to_json(&self) -> String {
        let s = |v: Option<&[u8]>| match v {
            Some(b) if !b.is_empty() => {
                serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
            }
            _ => serde_json::Value::Null,
        };
        let v = serde_json::json!({
            "start_time": format_start_time(self.start),
            "method": self.method.as_str(),
            "path": self.path,
            "protocol": protocol(self.protocol),
            "response_code": self.response_code,
            "response_flags": self.flags.to_string(),
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "duration": u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            "upstream_service_time": s(self.upstream_service_time.as_ref().map(HeaderValue::as_bytes)),
            "x_forwarded_for": s(self.forwarded_for.as_ref().map(HeaderValue::as_bytes)),
            "user_agent": s(self.user_agent.as_ref().map(HeaderValue::as_bytes)),
            "request_id": s(self.request_id.as_ref().map(HeaderValue::as_bytes)),
            "authority": s(self.authority.as_deref().map(str::as_bytes)),
            "upstream_host": self.upstream_host.map(|a| a.to_string()),
            "downstream_peer_uri_san": self.downstream_peer_uri_san.as_ref().map(Identity::as_str),
            "upstream_peer_uri_san": self.upstream_peer_uri_san.as_ref().map(Identity::as_str),
        });
        let mut line = v.to_string();
        line.push('\n');
        line
    }

    /// The entry in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Text => self.to_text(),
            Format::Json => self.to_json(),
        }
    }
}

enum Msg {
    Line(String),
    Flush(oneshot::Sender<()>),
}

/// The access log: a bounded queue to one writer task; cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    format: Format,
    dropped: Counter,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// Entries held while the writer is busy.
pub const QUEUE_CAPACITY: usize = 4096;

impl AccessLog {
    /// Writes to any async writer (spawns the writer task on the current runtime).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn to_writer<W>(writer: W, format: Format, dropped: Counter) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE_CAPACITY);
        tokio::spawn(async move {
            let mut w = tokio::io::BufWriter::new(writer);
            while let Some(msg) = rx.recv().await {
                match msg {
                    Msg::Line(line) => {
                        if w.write_all(line.as_bytes()).await.is_err() {
                            continue;
                        }
                        // Flush when the queue is empty so lines appear promptly.
                        if rx.is_empty() {
                            let _ = w.flush().await;
                        }
                    }
                    Msg::Flush(done) => {
                        let _ = w.flush().await;
                        let _ = done.send(());
                    }
                }
            }
            let _ = w.flush().await;
        });
        Self {
            tx,
            format,
            dropped,
        }
    }

    /// Writes to standard output.
    pub fn stdout(format: Format, dropped: Counter) -> Self {
        Self::to_writer(tokio::io::stdout(), format, dropped)
    }

    /// Appends to a file, creating it if needed.
    pub async fn file(
        path: impl AsRef<Path>,
        format: Format,
        dropped: Counter,
    ) -> std::io::Result<Self> {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(Self::to_writer(f, format, dropped))
    }

    /// Queues one entry without waiting; a full queue drops it (counted).
    pub fn log(&self, entry: &AccessEntry) {
        if self
            .tx
            .try_send(Msg::Line(entry.render(self.format)))
            .is_err()
        {
            self.dropped.inc();
        }
    }

    /// Waits until everything queued so far is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> AccessEntry {
        AccessEntry {
            start: UNIX_EPOCH + Duration::from_millis(1_460_751_420_310),
            method: http::Method::GET,
            path: "/productpage?x=1".into(),
            protocol: http::Version::HTTP_11,
            response_code: 503,
            flags: ResponseFlags::UPSTREAM_OVERFLOW,
            bytes_received: 0,
            bytes_sent: 81,
            duration: Duration::from_micros(12_900),
            upstream_service_time: None,
            forwarded_for: None,
            user_agent: Some(HeaderValue::from_static("curl/8.5.0")),
            request_id: Some(HeaderValue::from_static(
                "4f1c5e9e-4c37-4a4e-9c3e-2d1a8b6f1f11",
            )),
            authority: Some("reviews:9080".into()),
            upstream_host: Some("10.0.0.7:9080".parse().unwrap()),
            downstream_peer_uri_san: None,
            upstream_peer_uri_san: Some(
                Identity::parse("spiffe://cluster.local/ns/default/sa/bookinfo-reviews").unwrap(),
            ),
        }
    }

    #[test]
    fn text_matches_envoys_default_format() {
        assert_eq!(
            entry().to_text(),
            "[2016-04-15T20:17:00.310Z] \"GET /productpage?x=1 HTTP/1.1\" 503 UO 0 81 12 - \"-\" \
             \"curl/8.5.0\" \"4f1c5e9e-4c37-4a4e-9c3e-2d1a8b6f1f11\" \"reviews:9080\" \"10.0.0.7:9080\" \"-\" \
             \"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"\n"
        );
    }

    #[test]
    fn json_carries_both_peer_identities_or_null() {
        let mut e = entry();
        e.downstream_peer_uri_san =
            Some(Identity::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap());
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v["downstream_peer_uri_san"],
            "spiffe://cluster.local/ns/default/sa/productpage"
        );
        assert_eq!(
            v["upstream_peer_uri_san"],
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        );
        e.upstream_peer_uri_san = None;
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert!(v["upstream_peer_uri_san"].is_null());
        let text = e.to_text();
        assert!(
            text.ends_with(" \"spiffe://cluster.local/ns/default/sa/productpage\" \"-\"\n"),
            "{text}"
        );
    }

    #[test]
    fn start_time_handles_leap_years_and_epoch() {
        assert_eq!(format_start_time(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let feb29 = UNIX_EPOCH + Duration::from_secs(1_709_164_800 + 3_723);
        assert_eq!(format_start_time(feb29), "2024-02-29T01:02:03.000Z");
    }

    #[test]
    fn attacker_controlled_fields_cannot_forge_lines() {
        let mut e = entry();
        e.user_agent = Some(HeaderValue::from_bytes(b"x\" 200 \"\tfake\xff").unwrap());
        e.path = "/a\r\n[2016-04-15T20:17:00.310Z] \x1b[31m".into();
        e.authority = Some("evil\\host".into());
        let line = e.to_text();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains("\"x\\\" 200 \\\"\\x09fake\\xFF\""), "{line}");
        assert!(
            line.contains("/a\\x0D\\x0A[2016-04-15T20:17:00.310Z] \\x1B[31m HTTP/1.1"),
            "{line}"
        );
        assert!(line.contains("\"evil\\\\host\""), "{line}");
        assert!(!line.bytes().any(|b| b < 0x20 && b != b'\n'));
        let json = e.to_json();
        assert_eq!(json.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["response_flags"], "UO");
        assert_eq!(v["user_agent"], "x\" 200 \"\tfake\u{fffd}");
        assert_eq!(v["path"], "/a\r\n[2016-04-15T20:17:00.310Z] \u{1b}[31m");
    }
}
