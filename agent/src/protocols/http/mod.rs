//! HTTP and HTTPS targets: HTTP/1.1 and HTTP/2 toward the caller (TLS
//! terminated with a certificate the local CA mints for the SNI), a pooled
//! client upstream, and a decision per request from the current policy.
//!
//! The pieces are separate so that protocols carried over HTTP (git) reuse
//! them: [`accept_caller`] and [`serve_caller`] run the caller's side,
//! [`Proxy::admit`] checks and decides a request, [`Proxy::forward`] sends it
//! upstream with the target's credentials and streams the answer back, and
//! [`reply`] builds portcullis' own answers.
pub mod body;
pub mod hold;
pub mod mask;
pub mod reply;
pub mod request;
pub mod upstream;

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::{server::Acceptor, sign::CertifiedKey, ServerConfig};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{server::TlsStream, LazyConfigAcceptor};
use tracing::{debug, warn};

use self::{
    body::{Body, Exchange, OnEnd, RequestBody, ResponseBody},
    request::{check_host, normalise_path, Injection},
    upstream::{client_for, Endpoint, PooledClient},
};
use super::{Outcome, Session};
use crate::{
    audit::{Audit, DecisionInfo, Event, RequestInfo, ResponseSummary},
    enforcer::{Enforcer, Stats},
    ids::{OrigDst, SessionId},
    masking::{spec::DEFAULT_MAX_JSON_BODY, Plan, SessionMasker},
    policy::{decide_http, is_read_method, Decision, HttpRequest, Target, Verdict},
    tls::{LocalCa, TlsError},
};

/// ALPN offered to callers.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves one caller connection to an HTTP target.
pub async fn serve(session: &Session, client: TcpStream, admission: Decision) -> Outcome {
    let _ = client.set_nodelay(true);
    let conn = match accept_caller(&session.enforcer.ca, &session.target, session.orig_dst, client).await {
        Ok(c) => c,
        Err(e) => {
            debug!(session = %session.id, error = %e, "caller TLS handshake failed");
            return Outcome::reason(format!("caller TLS handshake failed: {e}"));
        }
    };
    let proxy = Arc::new(Proxy::new(session, admission, conn.sni.clone(), conn.tls));
    let p = proxy.clone();
    let service = hyper::service::service_fn(move |req| {
        let p = p.clone();
        async move { Ok::<_, Infallible>(p.handle(req).await) }
    });
    let reason = match serve_caller(conn.io, service).await {
        Ok(()) => "closed".to_string(),
        Err(e) => format!("caller connection: {e}"),
    };
    let (up, down) = (proxy.bytes_up.load(Ordering::Relaxed), proxy.bytes_down.load(Ordering::Relaxed));
    Stats::add(&session.enforcer.stats.bytes_up, up);
    Stats::add(&session.enforcer.stats.bytes_down, down);
    Outcome { reason, bytes_up: up, bytes_down: down }
}

/// The caller's side of a connection, TLS terminated if the target says so.
pub struct CallerConn {
    pub io: CallerIo,
    /// The server name the caller sent (TLS only), normalised.
    pub sni: Option<String>,
    pub tls: bool,
}

pub enum CallerIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Terminates the caller's TLS when the target has `tls.client`: reads the
/// ClientHello first, then presents a certificate the local CA minted for
/// the SNI (when it is one of the target's hosts) or else for the dialled
/// address; requests on such a connection are then refused by the host
/// check.
pub async fn accept_caller(
    ca: &LocalCa,
    target: &Target,
    orig_dst: OrigDst,
    stream: TcpStream,
) -> Result<CallerConn, io::Error> {
    if !target.tls.client {
        return Ok(CallerConn { io: CallerIo::Plain(stream), sni: None, tls: false });
    }
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        let sni = start.client_hello().server_name().map(request::normalise_host);
        let name = match &sni {
            Some(n) if request::certificate_allowed(&target.hosts, n) => n.clone(),
            _ => orig_dst.0.ip().to_canonical().to_string(),
        };
        let cfg = server_config(ca, &name).map_err(io::Error::other)?;
        let tls = start.into_stream(cfg).await?;
        Ok::<_, io::Error>(CallerConn { io: CallerIo::Tls(Box::new(tls)), sni, tls: true })
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Server configurations by name, rebuilt when the CA re-mints the leaf.
fn server_config(ca: &LocalCa, name: &str) -> Result<Arc<ServerConfig>, TlsError> {
    type Cache = Mutex<HashMap<String, (Arc<CertifiedKey>, Arc<ServerConfig>)>>;
    static CONFIGS: OnceLock<Cache> = OnceLock::new();
    let ck = ca.certified_key(name)?;
    let configs = CONFIGS.get_or_init(Default::default);
    if let Some((k, cfg)) = configs.lock().expect("configs").get(name) {
        if Arc::ptr_eq(k, &ck) {
            return Ok(cfg.clone());
        }
    }
    let cfg = ca.server_config(name, ALPN)?;
    let mut map = configs.lock().expect("configs");
    if map.len() >= 1024 {
        map.clear();
    }
    map.insert(name.to_string(), (ck, cfg.clone()));
    Ok(cfg)
}

/// Runs HTTP/1.1 or HTTP/2 (by ALPN or the connection preface) on the
/// caller's connection until it closes, with upgrades. A caller that just
/// goes away is not an error.
pub async fn serve_caller<S>(io: CallerIo, service: S) -> Result<(), body::BoxError>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30)).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    match builder.serve_connection_with_upgrades(TokioIo::new(io), service).await {
        Ok(()) => Ok(()),
        Err(e) => match e.downcast_ref::<hyper::Error>() {
            Some(h) if h.is_incomplete_message() || h.is_canceled() || h.is_closed() => Ok(()),
            _ if e.downcast_ref::<io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
                )
            }) =>
            {
                Ok(())
            }
            _ => Err(e),
        },
    }
}

/// A session's masker for one plan, or why it could not start.
type CachedMasker = (Arc<Plan>, Result<SessionMasker, String>);

/// One caller connection: what requests are decided against and sent with.
pub struct Proxy {
    pub session: SessionId,
    pub target: Target,
    pub role: Option<String>,
    pub orig_dst: OrigDst,
    pub enforcer: Arc<Enforcer>,
    /// The session-level decision: when not `Allow`, every request gets it.
    pub admission: Decision,
    pub sni: Option<String>,
    pub tls: bool,
    /// Who is calling (for held requests).
    caller: crate::audit::CallerInfo,
    /// The injected secrets, raw: masked in every response.
    secrets: Vec<crate::credentials::Secret>,
    /// This session's masker for the plan of its rule (rebuilt when a
    /// reload brings another plan), or why there is none.
    masker: Mutex<Option<CachedMasker>>,
    /// The target's credential, resolved for this session (or why not).
    injection: Result<Option<Injection>, String>,
    seq: AtomicU64,
    pub bytes_up: Arc<AtomicU64>,
    pub bytes_down: Arc<AtomicU64>,
    /// The worker's pooled client for the target, looked up at the first
    /// request (a session stays on its worker).
    client: std::sync::OnceLock<PooledClient>,
}

/// A request that passed the checks and the policy, ready to forward.
#[derive(Debug)]
pub struct Admitted {
    pub seq: u64,
    pub method: Method,
    /// Normalised host, as checked.
    pub host: String,
    /// The authority to send upstream (host and the port if one was given).
    pub authority: String,
    /// Normalised path (what the rules matched).
    pub path: String,
    pub decision: Decision,
    pub max_body: Option<u64>,
    pub websocket: bool,
}

impl Proxy {
    pub fn new(session: &Session, admission: Decision, sni: Option<String>, tls: bool) -> Proxy {
        // The secret is read once: what is injected and what is masked and
        // kept out of the audit log are the same value (a rotation or a
        // failed second read could otherwise inject one and mask none).
        let read = std::cell::RefCell::new(None::<crate::credentials::Secret>);
        let resolve_once = |r: &crate::policy::SecretRef| {
            if let Some(s) = read.borrow().as_ref() {
                return Ok(s.clone());
            }
            let s = crate::credentials::resolve(r)?;
            *read.borrow_mut() = Some(s.clone());
            Ok(s)
        };
        let injection = match &session.target.credentials {
            None => Ok(None),
            Some(c) => c
                .http_injection()
                .map_err(|e| format!("credentials: {e}"))
                .and_then(|spec| Injection::build(spec, resolve_once).map_err(|e| e.to_string()))
                .map(Some),
        };
        if let Err(e) = &injection {
            warn!(session = %session.id, target = %session.target.name, error = %e, "credentials unavailable");
        }
        let secrets = match (&session.target.credentials, &injection) {
            (Some(c), Ok(Some(_))) => c
                .http_injection()
                .ok()
                .and_then(|spec| request::injected_secrets(spec, resolve_once).ok())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        for s in &secrets {
            session.enforcer.audit.register_secret(s);
        }
        Proxy {
            session: session.id,
            target: session.target.clone(),
            role: session.role.clone(),
            orig_dst: session.orig_dst,
            enforcer: session.enforcer.clone(),
            admission,
            sni,
            tls,
            caller: session.caller.clone(),
            secrets,
            masker: Mutex::new(None),
            injection,
            seq: AtomicU64::new(0),
            bytes_up: Arc::new(AtomicU64::new(0)),
            bytes_down: Arc::new(AtomicU64::new(0)),
            client: std::sync::OnceLock::new(),
        }
    }

    /// Decides and, if allowed, forwards one request. A request held for
    /// approval has its body read (up to a bound) while it waits, so that a
    /// caller that goes away is noticed.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let head = Request::from_parts(parts, ());
        let mut watch = hold::BodyWatch::new(body);
        let admitted = self.admit_watching(&head, watch.gone()).await;
        let req = Request::from_parts(head.into_parts().0, watch.into_body());
        match admitted {
            Ok(admitted) => self.forward(req, admitted).await,
            Err(resp) => resp,
        }
    }

    /// Checks the request's host and path, decides it with the current
    /// policy and records the decision (on disk before anything that may
    /// change state is forwarded). `Err` is the answer to send instead.
    /// A request its rule holds for approval waits here (until this future
    /// is dropped: the caller is then taken as gone).
    pub async fn admit<B>(&self, req: &Request<B>) -> Result<Admitted, Response<Body>> {
        self.admit_watching(req, std::future::pending()).await
    }

    /// [`Proxy::admit`], where `gone` resolves if the caller goes away while
    /// its request is held.
    pub async fn admit_watching<B>(
        &self,
        req: &Request<B>,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<Admitted, Response<Body>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let method = req.method().clone();
        let raw_path = req.uri().path();
        let policy = self.enforcer.policy();
        let target = policy.target(&self.target.name).filter(|t| t.protocol == self.target.protocol);
        let hosts = target.map_or(&self.target.hosts, |t| &t.hosts);
        let host = check_host(
            req.uri().authority(),
            req.headers().get(header::HOST),
            self.sni.as_deref(),
            self.tls,
            hosts,
            (self.orig_dst.0.ip(), self.orig_dst.0.port()),
        );
        let shown_host = match &host {
            Ok(h) => h.clone(),
            Err(_) => req
                .uri()
                .authority()
                .map(|a| a.host().to_string())
                .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
                .unwrap_or_default(),
        };
        let mut info = HttpInfo {
            seq,
            method: method.as_str().to_string(),
            host: shown_host,
            path: raw_path.to_string(),
            query: req.uri().query().map(str::to_string),
        };

        if self.admission.verdict != Verdict::Allow {
            return Err(self.refuse(&info, &self.admission, StatusCode::FORBIDDEN));
        }
        let host = match host {
            Ok(h) => h,
            Err(e) => {
                let d =
                    Decision::deny(self.role.as_deref(), format!("targets.{}.hosts", self.target.name), e.to_string());
                return Err(self.refuse(&info, &d, StatusCode::FORBIDDEN));
            }
        };
        let path = match normalise_path(raw_path) {
            Ok(p) => p.into_owned(),
            Err(e) => {
                let d = Decision::deny(self.role.as_deref(), "http.path", e.to_string());
                return Err(self.refuse(&info, &d, StatusCode::FORBIDDEN));
            }
        };
        info.path.clone_from(&path);
        if let Err(reason) = request::plain_method(&method, req.headers(), req.uri().query()) {
            let d = Decision::deny(self.role.as_deref(), "http.method", reason);
            return Err(self.refuse(&info, &d, StatusCode::FORBIDDEN));
        }
        let Some(target) = target else {
            let d = Decision::deny(
                self.role.as_deref(),
                "targets",
                format!(
                    "target {} is no longer a {} target of the policy in force",
                    self.target.name, self.target.protocol
                ),
            );
            return Err(self.refuse(&info, &d, StatusCode::FORBIDDEN));
        };
        let websocket = request::is_websocket_upgrade(req.headers());
        let content_length =
            req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let hd = decide_http(
            &policy,
            self.role.as_deref(),
            target,
            &HttpRequest { method: method.as_str(), path: &path, content_length, websocket },
        );
        drop(policy);
        let mut decision = match hd.decision.verdict {
            Verdict::Deny => {
                let status = if hd.too_large { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::FORBIDDEN };
                return Err(self.refuse(&info, &hd.decision, status));
            }
            // Held here until a human answers; approved, it goes on as an
            // allow, else the answer is the denial.
            Verdict::Approve => self.hold(&info, &hd, gone).await?,
            Verdict::Allow => hd.decision.clone(),
        };
        let authority = match req.uri().authority() {
            Some(a) => a.as_str().to_ascii_lowercase(),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| host.clone()),
        };
        info.host.clone_from(&host);
        decision.verdict = Verdict::Allow;
        let event = Event::Decision {
            session: self.session,
            request: info.request_info(None, 0, 0),
            decision: DecisionInfo::from(&decision),
        };
        if is_read_method(method.as_str()) {
            self.enforcer.audit.record(event);
        } else if let Err(e) = self.enforcer.audit.record_durable(event).await {
            warn!(session = %self.session, error = %e, "audit write failed; request refused");
            return Err(reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the audit log cannot be written; state-changing requests are refused",
            ));
        }
        Stats::inc(&self.enforcer.stats.allowed);
        Ok(Admitted { seq, method, host, authority, path, decision, max_body: hd.max_body, websocket })
    }

    /// Records and answers a denial.
    fn refuse(&self, info: &HttpInfo, d: &Decision, status: StatusCode) -> Response<Body> {
        Stats::inc(&self.enforcer.stats.denied);
        debug!(session = %self.session, method = %info.method, host = %info.host, path = %info.path,
               rule = %d.rule, reason = %d.reason, "request denied");
        self.enforcer.audit.record(Event::Decision {
            session: self.session,
            request: info.request_info(Some(status.as_u16()), 0, 0),
            decision: DecisionInfo::from(d),
        });
        reply::denied(status, d, self.session, info.seq)
    }

    /// Holds a request its rule marks `approve` until a human answers
    /// (`approval_response = "hold"`), or answers at once with the id to
    /// approve (`"early"`, where an approved id lets one retry of the same
    /// request from the same caller through). `Ok` is the decision to forward under; `Err` the
    /// answer (recorded) to send instead.
    async fn hold(
        &self,
        info: &HttpInfo,
        hd: &crate::policy::HttpDecision,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<Decision, Response<Body>> {
        use crate::{approvals::HoldRequest, policy::ApprovalResponse};
        let d = &hd.decision;
        let shape = hold::shape(&info.method, &info.path, hd.matched.as_deref());
        let early = hd.approval_response == ApprovalResponse::Early;
        // An early approval lets through a retry of the request the approver
        // saw, from the same caller: not another request its entry covers.
        let key = hold::EarlyKey {
            target: self.target.name.clone(),
            role: self.role.clone(),
            caller: self.caller.cgroup.clone(),
            request: info.shown(),
        };
        if early {
            match hold::EarlyAnswers::global().take(&key) {
                Some(hold::Early::Approved { id, by, .. }) => {
                    return Ok(Decision {
                        verdict: Verdict::Allow,
                        reason: format!("{}: approval {id} ({by}), answered early", d.reason),
                        ..d.clone()
                    });
                }
                Some(hold::Early::Pending(id)) => {
                    self.record_held(info, d, StatusCode::FORBIDDEN);
                    return Err(reply::approval_pending(d, self.session, info.seq, id));
                }
                None => {}
            }
        }
        let approvals = self.enforcer.approvals.clone();
        let ticket = approvals.submit(HoldRequest {
            session: self.session,
            caller: self.caller.clone(),
            role: self.role.clone(),
            target: self.target.name.clone(),
            protocol: "http".into(),
            request: info.shown(),
            shape,
            rule: d.rule.clone(),
            timeout: d.approval_timeout,
        });
        let id = ticket.id;
        // A standing approval answers at once: nothing is pending.
        let standing = approvals.get(id).is_none();
        if early && !standing {
            hold::EarlyAnswers::global().pending(key.clone(), id);
            let valid = d.approval_timeout;
            tokio::spawn(async move {
                let outcome = approvals.wait(ticket, std::future::pending()).await;
                let by = outcome.approved().then(|| outcome.describe());
                hold::EarlyAnswers::global().resolved(&key, id, by, valid);
            });
            self.record_held(info, d, StatusCode::FORBIDDEN);
            return Err(reply::approval_pending(d, self.session, info.seq, id));
        }
        // The wait runs on its own task so that it ends (cancelled, and
        // recorded) even when this future is dropped with the caller.
        let (stay, left) = tokio::sync::oneshot::channel::<()>();
        let mut waiter = tokio::spawn(async move {
            approvals
                .wait(ticket, async move {
                    let _ = left.await;
                })
                .await
        });
        let held = &self.enforcer.stats.approvals_held;
        held.fetch_add(1, Ordering::Relaxed);
        let outcome = tokio::select! {
            o = &mut waiter => o,
            _ = gone => {
                drop(stay);
                waiter.await
            }
        };
        held.fetch_sub(1, Ordering::Relaxed);
        let outcome = outcome.unwrap_or(crate::approvals::Outcome::Cancelled);
        let reason = format!("{}: approval {id}: {}", d.reason, outcome.describe());
        if outcome.approved() {
            return Ok(Decision { verdict: Verdict::Allow, reason, ..d.clone() });
        }
        let refused = Decision { verdict: Verdict::Deny, reason, ..d.clone() };
        self.record_held(info, &refused, StatusCode::FORBIDDEN);
        Err(reply::approval_refused(&refused, self.session, info.seq, id))
    }

    /// Records a held request's refusal (or early answer).
    fn record_held(&self, info: &HttpInfo, d: &Decision, status: StatusCode) {
        Stats::inc(&self.enforcer.stats.denied);
        debug!(session = %self.session, method = %info.method, host = %info.host, path = %info.path,
               rule = %d.rule, reason = %d.reason, "held request not forwarded");
        self.enforcer.audit.record(Event::Decision {
            session: self.session,
            request: info.request_info(Some(status.as_u16()), 0, 0),
            decision: DecisionInfo::from(d),
        });
    }

    /// Sends an admitted request upstream with the target's credentials and
    /// streams the response back.
    /// The body may be the caller's as received or one rebuilt by a module
    /// that inspected it (git reads the head of a push).
    pub async fn forward<B>(self: &Arc<Self>, mut req: Request<B>, a: Admitted) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<body::BoxError>,
    {
        let exchange = Arc::new(Exchange::default());
        let info =
            HttpInfo { seq: a.seq, method: a.method.as_str().to_string(), host: a.host, path: a.path, query: None };
        let injection = match &self.injection {
            Ok(i) => i.clone(),
            Err(e) => {
                let e = e.clone();
                self.end(&info, &exchange, StatusCode::BAD_GATEWAY, Some(e.clone()));
                return reply::error(StatusCode::BAD_GATEWAY, "credentials_unavailable", &e);
            }
        };
        let masker = match self.masker_for(&a.decision) {
            Ok(m) => m,
            Err(e) => {
                let e = format!("masking: {e}");
                self.end(&info, &exchange, StatusCode::BAD_GATEWAY, Some(e.clone()));
                return reply::error(StatusCode::BAD_GATEWAY, "masking_unavailable", &e);
            }
        };
        let caller_upgrade = a.websocket.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        request::strip_hop_by_hop(&mut parts.headers, a.websocket);
        parts.headers.remove(header::HOST);
        // The body is streamed as soon as the upstream takes it.
        parts.headers.remove(header::EXPECT);
        if masker.is_some() {
            // Only codings that can be taken off, and whole bodies.
            mask::accept_encoding(&mut parts.headers);
            parts.headers.remove(header::RANGE);
            parts.headers.remove(header::IF_RANGE);
        }
        let query = parts.uri.query();
        let pq = match &injection {
            Some(i) => i.apply(&mut parts.headers, &info.path, query),
            None => request::path_and_query(&info.path, query),
        };
        let scheme = if self.target.tls.upstream { "https" } else { "http" };
        let uri = match Uri::builder().scheme(scheme).authority(a.authority.as_str()).path_and_query(pq).build() {
            Ok(u) => u,
            Err(e) => {
                self.end(&info, &exchange, StatusCode::BAD_REQUEST, Some(e.to_string()));
                return reply::error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string());
            }
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let body = body::boxed(RequestBody::new(incoming, a.max_body, exchange.clone()));
        let upstream_req = Request::from_parts(parts, body);

        let sent = match caller_upgrade {
            None => match self.client() {
                Ok(client) => client.request(upstream_req).await.map_err(|e| error_chain(&e)),
                Err(e) => Err(e),
            },
            Some(_) => self.send_upgrade(upstream_req).await,
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                if exchange.over_limit.load(Ordering::Relaxed) {
                    let limit = a.max_body.unwrap_or(0);
                    let reason = format!("request body is over max_body ({limit} bytes); cut");
                    self.end(&info, &exchange, StatusCode::PAYLOAD_TOO_LARGE, Some(reason.clone()));
                    let d = Decision { verdict: Verdict::Deny, reason, ..a.decision };
                    return reply::denied(StatusCode::PAYLOAD_TOO_LARGE, &d, self.session, info.seq);
                }
                Stats::inc(&self.enforcer.stats.upstream_failures);
                warn!(session = %self.session, target = %self.target.name, error = %e, "upstream request failed");
                self.end(&info, &exchange, StatusCode::BAD_GATEWAY, Some(e.clone()));
                return reply::error(StatusCode::BAD_GATEWAY, "upstream_error", &e);
            }
        };
        let status = resp.status();
        if let (Some(caller_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (caller_upgrade, status) {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let proxy = self.clone();
            tokio::spawn(async move {
                let result: Result<(u64, u64), body::BoxError> = async {
                    let (c, u) = tokio::try_join!(caller_upgrade, upstream_upgrade)?;
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    Ok(tokio::io::copy_bidirectional(&mut c, &mut u).await?)
                }
                .await;
                let error = match result {
                    Ok((up, down)) => {
                        exchange.bytes_up.fetch_add(up, Ordering::Relaxed);
                        exchange.bytes_down.fetch_add(down, Ordering::Relaxed);
                        None
                    }
                    Err(e) => Some(format!("upgraded connection: {e}")),
                };
                proxy.end(&info, &exchange, status, error);
            });
            let (mut parts, _) = resp.into_parts();
            request::strip_hop_by_hop(&mut parts.headers, true);
            // The tunnel's bytes are not masked, its answer's headers are.
            if let Some((mut m, _)) = masker {
                mask::mask_headers(&mut m, &mut parts.headers);
            }
            return Response::from_parts(parts, body::empty());
        }
        let (mut parts, incoming) = resp.into_parts();
        if masker.is_some() {
            // A transfer coding besides chunked (gzip) is lost with the
            // hop-by-hop headers, and the body would be scanned coded.
            if let Some(te) = request::transfer_coding_besides_chunked(&parts.headers) {
                let e = format!("transfer coding `{te}` cannot be masked");
                self.end(&info, &exchange, StatusCode::BAD_GATEWAY, Some(e.clone()));
                return reply::error(StatusCode::BAD_GATEWAY, "masking_failed", &e);
            }
        }
        request::strip_hop_by_hop(&mut parts.headers, false);
        // The caller's side writes its own version.
        parts.version = Version::HTTP_11;
        let body = match masker {
            None => {
                let on_end = Box::new(EndRecorder { proxy: self.clone(), info, status });
                body::boxed(ResponseBody::new(incoming, exchange, on_end))
            }
            Some((m, cap)) => match self.masked_body(&mut parts, incoming, m, cap) {
                Ok(masked) => {
                    let on_end = Box::new(EndRecorder { proxy: self.clone(), info, status });
                    body::boxed(ResponseBody::new(masked, exchange, on_end))
                }
                Err(e) => {
                    warn!(session = %self.session, target = %self.target.name, error = %e, "response not masked; refused");
                    self.end(&info, &exchange, StatusCode::BAD_GATEWAY, Some(e.clone()));
                    return reply::error(StatusCode::BAD_GATEWAY, "masking_failed", &e);
                }
            },
        };
        Response::from_parts(parts, body)
    }

    /// The masker for an admitted request's rule, with the JSON size cap;
    /// `None` when there is nothing to mask (no `mask` entries and no
    /// injected credential).
    fn masker_for(&self, d: &Decision) -> Result<Option<(SessionMasker, usize)>, String> {
        let policy = self.enforcer.policy();
        let rule = d.role.as_deref().and_then(|r| policy.role(r)).and_then(|r| r.rule_for(&self.target.name));
        let has_masks = rule.is_some_and(|r| !r.masks.is_empty());
        if !has_masks && self.secrets.is_empty() {
            return Ok(None);
        }
        let plan = match rule {
            Some(r) => r.mask_plan.clone(),
            None => Arc::new(Plan::credentials_only()),
        };
        let cap = usize::try_from(policy.masking.max_json_body.unwrap_or(DEFAULT_MAX_JSON_BODY)).unwrap_or(usize::MAX);
        let mut cache = self.masker.lock().expect("masker");
        if let Some((p, m)) = cache.as_ref() {
            if Arc::ptr_eq(p, &plan) {
                return m.clone().map(|m| Some((m, cap)));
            }
        }
        let refs: Vec<&crate::credentials::Secret> = self.secrets.iter().collect();
        let m = SessionMasker::start(plan.clone(), &policy.masking, &refs).map_err(|e| e.to_string());
        *cache = Some((plan, m.clone()));
        m.map(|m| Some((m, cap)))
    }

    /// Masks a response's headers and wraps its body in the masker its
    /// content type calls for; `Err` when the body cannot be masked.
    fn masked_body(
        &self,
        parts: &mut http::response::Parts,
        incoming: Incoming,
        mut m: SessionMasker,
        cap: usize,
    ) -> Result<Body, String> {
        mask::mask_headers(&mut m, &mut parts.headers);
        let kind = mask::classify(parts.headers.get(header::CONTENT_TYPE));
        if kind == mask::Kind::Binary {
            if self.secrets.is_empty() {
                return Ok(body::boxed(incoming));
            }
            let raw: Vec<&[u8]> = self.secrets.iter().map(|s| s.expose().as_bytes()).collect();
            // A coded body is decoded to be searched, and sent decoded.
            let coding = mask::coding(&parts.headers)?;
            let decoder = (coding != mask::Coding::Identity).then(|| {
                for h in
                    [header::CONTENT_ENCODING, header::CONTENT_LENGTH, header::ACCEPT_RANGES, header::CONTENT_RANGE]
                {
                    parts.headers.remove(h);
                }
                for name in ["content-md5", "digest", "content-digest", "repr-digest"] {
                    parts.headers.remove(name);
                }
                mask::Decoder::new(coding)
            });
            return Ok(body::boxed(mask::MaskedBody::binary(incoming, &raw, decoder.flatten())));
        }
        let coding = mask::coding(&parts.headers)?;
        let h = &mut parts.headers;
        h.remove(header::CONTENT_LENGTH);
        h.remove(header::ACCEPT_RANGES);
        h.remove(header::CONTENT_RANGE);
        for name in ["content-md5", "digest", "content-digest", "repr-digest"] {
            h.remove(name);
        }
        if coding != mask::Coding::Identity {
            h.remove(header::CONTENT_ENCODING);
        }
        let decoder = mask::Decoder::new(coding);
        let window = crate::masking::stream::DEFAULT_WINDOW;
        Ok(match kind {
            mask::Kind::Json => body::boxed(mask::MaskedBody::json(incoming, m, cap, window, decoder)),
            _ => body::boxed(mask::MaskedBody::text(incoming, &m, window, decoder)),
        })
    }

    fn client(&self) -> Result<PooledClient, String> {
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        // Without injected credentials each caller authenticates itself, and
        // some schemes (NTLM, Negotiate) bind to the connection: its pooled
        // connections are its own.
        let owner = self
            .target
            .credentials
            .is_none()
            .then(|| format!("{}:{}", self.caller.cgroup.as_deref().unwrap_or_default(), self.caller.uid));
        let c = client_for(&self.target, self.orig_dst, &self.enforcer.settings, owner).map_err(|e| e.to_string())?;
        Ok(self.client.get_or_init(|| c).clone())
    }

    /// A WebSocket upgrade goes over a connection of its own, HTTP/1.1 only.
    async fn send_upgrade(&self, mut req: Request<Body>) -> Result<Response<Incoming>, String> {
        let ep = Endpoint::new(&self.target, self.orig_dst, &self.enforcer.settings, &[b"http/1.1"])
            .map_err(|e| e.to_string())?;
        let conn = ep.connect().await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(conn).await.map_err(|e| error_chain(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
        if let Ok(v) = HeaderValue::from_str(&authority) {
            req.headers_mut().insert(header::HOST, v);
        }
        sender.send_request(req).await.map_err(|e| error_chain(&e))
    }

    /// Records the end of a forwarded request.
    fn end(&self, info: &HttpInfo, exchange: &Exchange, status: StatusCode, error: Option<String>) {
        let up = exchange.bytes_up.load(Ordering::Relaxed);
        let down = exchange.bytes_down.load(Ordering::Relaxed);
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
        record_end(&self.enforcer.audit, self.session, info, status, up, down, error);
    }
}

fn record_end(
    audit: &Audit,
    session: SessionId,
    info: &HttpInfo,
    status: StatusCode,
    up: u64,
    down: u64,
    error: Option<String>,
) {
    audit.record(Event::RequestEnd { session, request: info.request_info(Some(status.as_u16()), up, down), error });
}

/// What the audit log says about a request.
#[derive(Debug, Clone)]
struct HttpInfo {
    seq: u64,
    method: String,
    host: String,
    path: String,
    /// As the caller sent it (shown to approvers; not in the audit log).
    query: Option<String>,
}

impl HttpInfo {
    /// The request as an approver sees it: method, host, path and query.
    fn shown(&self) -> String {
        match &self.query {
            Some(q) => format!("{} {}{}?{q}", self.method, self.host, self.path),
            None => format!("{} {}{}", self.method, self.host, self.path),
        }
    }

    fn request_info(&self, status: Option<u16>, bytes_up: u64, bytes_down: u64) -> RequestInfo {
        RequestInfo::Http {
            seq: self.seq,
            method: self.method.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            status,
            bytes_up,
            bytes_down,
        }
    }
}

/// Records a forwarded request's end when its response body is done.
struct EndRecorder {
    proxy: Arc<Proxy>,
    info: HttpInfo,
    status: StatusCode,
}

impl OnEnd for EndRecorder {
    fn on_end(self: Box<Self>, exchange: &Exchange, error: Option<String>) {
        let bytes = exchange.bytes_down.load(Ordering::Relaxed);
        self.proxy.end(&self.info, exchange, self.status, error);
        // What the caller got, after masking (no content is recorded).
        self.proxy.enforcer.audit.record(Event::Response {
            session: self.proxy.session,
            summary: ResponseSummary {
                status: Some(self.status.as_u16().to_string()),
                bytes,
                ..ResponseSummary::default()
            },
        });
    }
}

/// An error and its causes on one line (hyper's errors keep the useful
/// part in their sources).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl AsyncRead for CallerIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            CallerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            CallerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for CallerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            CallerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            CallerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            CallerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            CallerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            CallerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            CallerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            CallerIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            CallerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            CallerIo::Plain(s) => s.is_write_vectored(),
            CallerIo::Tls(s) => s.is_write_vectored(),
        }
    }
}
