//! Prometheus metrics: the text exposition format (0.0.4) served over HTTP
//! on a loopback address (`--metrics-addr`, default `127.0.0.1:7441`).
//!
//! Everything is read at scrape time from the counters the enforcer keeps
//! anyway (`enforcer::Stats`, the audit writer's `AuditMetrics`) and from
//! the pinned eBPF maps, so serving metrics costs nothing between scrapes.
//! Names and labels are listed in the README ("Metrics").
use std::{
    convert::Infallible,
    fmt::{Display, Write as _},
    io,
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use portcullis_common::{MAP_CONNS, MAP_EGRESS, MAP_PENDING, MAP_SCOPES, MAP_TARGETS};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{enforcer::Enforcer, intercept::probes::maps_dir, intercept::sys};

pub const DEFAULT_ADDR: &str = "127.0.0.1:7441";
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {0} is not a loopback address (metrics name roles and targets; keep them on the host)")]
    NotLoopback(SocketAddr),
    #[error("metrics address `{0}`: expected ip:port (e.g. 127.0.0.1:7441) or `off`")]
    BadAddr(String),
    #[error("cannot serve metrics on {0}: {1}")]
    Bind(SocketAddr, io::Error),
}

/// Parses `--metrics-addr`: a loopback `ip:port`, or `off`.
pub fn parse_addr(s: &str) -> Result<Option<SocketAddr>, MetricsError> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let addr: SocketAddr = s.parse().map_err(|_| MetricsError::BadAddr(s.to_string()))?;
    if !addr.ip().to_canonical().is_loopback() {
        return Err(MetricsError::NotLoopback(addr));
    }
    Ok(Some(addr))
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|e| MetricsError::Bind(addr, e))
}

/// Upper bounds (seconds) of the audit write-duration histogram.
pub const WRITE_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A fixed-bucket histogram of durations, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket of `WRITE_BUCKETS`; the last slot
    /// holds what exceeds every bound.
    buckets: [AtomicU64; WRITE_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = WRITE_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(WRITE_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Cumulative (upper bound, count) pairs, `+Inf` last, the sum in
    /// seconds and the total count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(WRITE_BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            out.push((WRITE_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), acc));
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (out, sum, acc)
    }
}

/// What the audit writer reports: records queued and written, failures,
/// and how long each batch took to reach the disk.
#[derive(Debug, Default)]
pub struct AuditMetrics {
    queued: AtomicU64,
    written: AtomicU64,
    failed: AtomicU64,
    pub write_duration: Histogram,
}

impl AuditMetrics {
    pub fn queued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// One batch of `records` went to the file (and to disk when it held a
    /// durable record) in `took`.
    pub fn written(&self, records: u64, took: Duration, ok: bool) {
        let c = if ok { &self.written } else { &self.failed };
        c.fetch_add(records, Ordering::Relaxed);
        self.write_duration.observe(took);
    }

    pub fn records_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn records_failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records queued but not yet written.
    pub fn backlog(&self) -> u64 {
        // Read the finished counts first: a record counted as written is
        // always already counted as queued, so this never underflows.
        let done = self.records_written() + self.records_failed();
        self.queued.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// Everything a scrape reads.
pub struct Exporter {
    pub enforcer: Arc<Enforcer>,
    pub pin_dir: PathBuf,
    pub started_ms: u64,
    /// (scopes attached, scopes whose cgroup could not be found), now.
    pub scopes: Box<dyn Fn() -> (usize, usize) + Send + Sync>,
}

/// The maps whose occupancy is exported (the ring buffer and socket
/// storage have no countable entries).
const COUNTED_MAPS: [&str; 5] = [MAP_SCOPES, MAP_TARGETS, MAP_EGRESS, MAP_PENDING, MAP_CONNS];

/// Entries and capacity of one pinned map.
pub fn map_occupancy(pin_dir: &Path, name: &str) -> io::Result<(u64, u64)> {
    let path = maps_dir(pin_dir).join(name);
    let info = aya::maps::MapInfo::from_pin(&path).map_err(io::Error::other)?;
    let fd = sys::obj_get(&path)?;
    let max = u64::from(info.max_entries());
    let n = sys::map_count_keys(fd.as_fd(), info.key_size() as usize, max)?;
    Ok((n, max))
}

impl Exporter {
    /// The whole exposition, rendered now.
    pub fn render(&self) -> String {
        let e = &self.enforcer;
        let s = &e.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut t = Text::default();

        t.header("portcullis_build_info", "gauge", "Version of the running portcullis.");
        t.sample("portcullis_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
        t.header("portcullis_start_time_seconds", "gauge", "When portcullis started (Unix time).");
        t.sample("portcullis_start_time_seconds", &[], self.started_ms as f64 / 1000.0);

        t.counter(
            "portcullis_connections_accepted_total",
            "Connections the kernel redirected to portcullis.",
            l(&s.accepted),
        );
        t.counter(
            "portcullis_connections_unattributed_total",
            "Connections closed because no kernel record named their caller.",
            l(&s.unattributed),
        );
        t.header("portcullis_connections_open", "gauge", "Sessions in progress.");
        t.sample("portcullis_connections_open", &[], e.live_sessions().len());

        t.header(
            "portcullis_decisions_total",
            "counter",
            "Decisions (session-level and per request) by verdict, role, target and protocol.",
        );
        for (k, n) in s.decisions() {
            t.sample(
                "portcullis_decisions_total",
                &[("verdict", &k.verdict), ("role", &k.role), ("target", &k.target), ("protocol", &k.protocol)],
                n,
            );
        }
        t.header("portcullis_approvals_held", "gauge", "Requests held for a human's approval now.");
        t.sample("portcullis_approvals_held", &[], l(&s.approvals_held));

        t.counter(
            "portcullis_kernel_refusals_total",
            "Connects refused in the kernel (egress deny, non-TCP to a target, enforcer port dialled directly).",
            l(&s.kernel_refusals),
        );
        t.counter("portcullis_upstream_failures_total", "Upstream connects that failed.", l(&s.upstream_failures));
        t.header("portcullis_relay_bytes_total", "counter", "Bytes relayed, by direction (up: caller to upstream).");
        t.sample("portcullis_relay_bytes_total", &[("direction", "up")], l(&s.bytes_up));
        t.sample("portcullis_relay_bytes_total", &[("direction", "down")], l(&s.bytes_down));

        let am = &e.audit.metrics;
        t.counter("portcullis_audit_records_total", "Audit records written to the log.", am.records_written());
        t.counter("portcullis_audit_write_failures_total", "Audit records whose write failed.", am.records_failed());
        t.counter(
            "portcullis_audit_records_lost_total",
            "Audit records never written: their write failed, or they came while the writer was behind.",
            e.audit.stats().lost.load(Ordering::Relaxed),
        );
        t.header("portcullis_audit_backlog", "gauge", "Audit records queued and not yet written.");
        t.sample("portcullis_audit_backlog", &[], e.audit.stats().queued.load(Ordering::Relaxed));
        let (buckets, sum, count) = am.write_duration.snapshot();
        t.histogram(
            "portcullis_audit_write_duration_seconds",
            "Time to write one batch of audit records (with fsync when it holds a durable record).",
            &buckets,
            sum,
            count,
        );

        t.counter("portcullis_policy_reloads_total", "Policy reloads that took effect.", l(&s.reloads));
        t.counter(
            "portcullis_policy_reload_failures_total",
            "Policy reloads refused (invalid file, or the kernel refused it); the previous policy stayed.",
            l(&s.reload_failures),
        );
        let (attached, unresolved) = (self.scopes)();
        t.header("portcullis_scopes_attached", "gauge", "Scopes whose cgroup has the probes attached.");
        t.sample("portcullis_scopes_attached", &[], attached);
        t.header("portcullis_scopes_unresolved", "gauge", "Scopes whose unit has no cgroup now (not running).");
        t.sample("portcullis_scopes_unresolved", &[], unresolved);
        t.counter(
            "portcullis_scope_reattachments_total",
            "Times a scope's cgroup was recreated or appeared and the probes were attached to it.",
            l(&s.reattachments),
        );

        let occupancy: Vec<(&str, u64, u64)> = COUNTED_MAPS
            .iter()
            .filter_map(|m| match map_occupancy(&self.pin_dir, m) {
                Ok((n, max)) => Some((*m, n, max)),
                Err(err) => {
                    debug!(map = m, error = %err, "cannot read map occupancy");
                    None
                }
            })
            .collect();
        t.header("portcullis_bpf_map_entries", "gauge", "Entries in each eBPF map.");
        for (m, n, _) in &occupancy {
            t.sample("portcullis_bpf_map_entries", &[("map", m)], n);
        }
        t.header("portcullis_bpf_map_capacity", "gauge", "Maximum entries of each eBPF map.");
        for (m, _, max) in &occupancy {
            t.sample("portcullis_bpf_map_capacity", &[("map", m)], max);
        }
        t.0
    }
}

/// Serves `GET /metrics` until the listener fails.
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let exporter = exporter.clone();
                async move { Ok::<_, Infallible>(respond(exporter, req).await) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                debug!(error = %e, "metrics connection failed");
            }
        });
    }
}

async fn respond(exporter: Arc<Exporter>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    // Map iteration is a series of syscalls: keep it off the runtime threads.
    let body = match tokio::task::spawn_blocking(move || exporter.render()).await {
        Ok(b) => b,
        Err(e) => return reply(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering failed: {e}\n")),
    };
    let mut r = reply(StatusCode::OK, body);
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(CONTENT_TYPE));
    r
}

/// A writer of the text exposition format.
#[derive(Default)]
struct Text(String);

impl Text {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, buckets: &[(f64, u64)], sum: f64, count: u64) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (le, n) in buckets {
            let le = if le.is_infinite() { "+Inf".to_string() } else { le.to_string() };
            self.sample(&bucket, &[("le", &le)], n);
        }
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count);
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_loopback() {
        assert_eq!(parse_addr("127.0.0.1:7441").unwrap(), Some("127.0.0.1:7441".parse().unwrap()));
        assert_eq!(parse_addr("[::1]:9000").unwrap(), Some("[::1]:9000".parse().unwrap()));
        assert_eq!(parse_addr("off").unwrap(), None);
        assert!(matches!(parse_addr("0.0.0.0:7441"), Err(MetricsError::NotLoopback(_))));
        assert!(matches!(parse_addr("[::]:7441"), Err(MetricsError::NotLoopback(_))));
        assert!(matches!(parse_addr("localhost"), Err(MetricsError::BadAddr(_))));
    }

    #[test]
    fn labels_and_help_are_escaped() {
        let mut t = Text::default();
        t.header("m", "counter", "a \\ b\nc");
        t.sample("m", &[("role", "a\"b\\c\nd")], 3);
        assert_eq!(t.0, "# HELP m a \\\\ b\\nc\n# TYPE m counter\nm{role=\"a\\\"b\\\\c\\nd\"} 3\n");
    }

    #[test]
    fn histogram_is_cumulative_and_ends_in_inf() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let (b, sum, count) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(b.first().unwrap(), &(0.0001, 1));
        assert_eq!(b.iter().find(|(le, _)| *le == 0.005).unwrap().1, 2);
        assert_eq!(b.iter().find(|(le, _)| *le == 2.5).unwrap().1, 2);
        assert_eq!(b.last().unwrap(), &(f64::INFINITY, 3));
        assert!((sum - 10.00305).abs() < 1e-9, "{sum}");
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn audit_backlog_is_queued_minus_done() {
        let m = AuditMetrics::default();
        for _ in 0..5 {
            m.queued();
        }
        m.written(3, Duration::from_millis(1), true);
        assert_eq!(m.backlog(), 2);
        m.written(1, Duration::from_millis(1), false);
        assert_eq!((m.backlog(), m.records_written(), m.records_failed()), (1, 3, 1));
    }
}
