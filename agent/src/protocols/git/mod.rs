//! git over smart HTTP(S), built on the http module: the caller's side
//! (TLS termination, host checks), credential injection and the upstream
//! client are the http module's; this module reads what git says.
//!
//! - `GET <repo>/info/refs?service=...` (ref discovery) and `POST
//!   <repo>/git-upload-pack` (fetch) are decided per repository and their
//!   advertisements checked on the way back.
//! - `POST <repo>/git-receive-pack` (push) is buffered whole (up to the
//!   rule's `max_body`): the commands are read, each ref update is
//!   classified (create, delete, update proven fast-forward by the pack's
//!   commits, or force), decided, and recorded before anything is
//!   forwarded. A refused push is answered with git's own report-status
//!   (`ng <ref> <reason>` for every ref) so `git push` shows
//!   `[remote rejected]`; a held push tells the caller its approval id on
//!   side-band 2 while it waits.
//! - Anything else (dumb HTTP, other paths) is refused.
pub mod pack;
pub mod pktline;
pub mod wire;

use std::{
    convert::Infallible,
    io::Read,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::{net::TcpStream, sync::mpsc};
use tracing::{debug, warn};

use super::{
    http::{
        accept_caller,
        body::{self, Body, BoxError},
        request::{check_host, normalise_path},
        serve_caller, Admitted, Proxy,
    },
    Outcome, Session,
};
use crate::{
    approvals::HoldRequest,
    audit::{CallerInfo, DecisionInfo, Event, RefUpdate, RequestInfo},
    enforcer::Stats,
    policy::{decide_git, Decision, GitRequest, GitService, RefKind, Verdict},
};

use self::wire::{Command, PushRequest};

const RESULT_TYPE: &str = "application/x-git-receive-pack-result";
/// Largest ref advertisement checked on its way back.
const MAX_ADVERTISEMENT: usize = 64 << 20;
/// How often a held push tells the caller it is still waiting.
const HOLD_PROGRESS_EVERY: Duration = Duration::from_secs(20);

/// Serves one caller connection to a git target.
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
    let git = Arc::new(Git { proxy: proxy.clone(), caller: session.caller.clone(), seq: AtomicU64::new(0) });
    let service = hyper::service::service_fn(move |req| {
        let g = git.clone();
        async move { Ok::<_, Infallible>(g.handle(req).await) }
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

/// What a smart-HTTP request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub service: GitService,
    /// `info/refs` (ref discovery) rather than the service itself.
    pub discovery: bool,
    /// The repository path, without the leading `/`.
    pub repo: String,
}

/// Reads the repository and service from a (normalised) path, the query
/// and the method; `Err` says why it is not a smart-HTTP request.
pub fn endpoint(method: &Method, path: &str, query: Option<&str>) -> Result<Endpoint, String> {
    let (repo, discovery, service) = if let Some(repo) = path.strip_suffix("/info/refs") {
        if method != Method::GET {
            return Err(format!("{method} {path}: ref discovery is a GET"));
        }
        let service = query
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("service="))
            .ok_or_else(|| format!("{path} without `?service=`: dumb HTTP is not forwarded"))?;
        let service = GitService::parse(service).ok_or_else(|| format!("{path}: unknown service `{service}`"))?;
        (repo, true, service)
    } else if let Some((repo, svc)) = path.rsplit_once('/').filter(|(_, s)| s.starts_with("git-")) {
        if method != Method::POST {
            return Err(format!("{method} {path}: a git service is a POST"));
        }
        let service = GitService::parse(svc).ok_or_else(|| format!("{path}: unknown service `{svc}`"))?;
        (repo, false, service)
    } else {
        return Err(format!("{method} {path} is not a git smart-HTTP request"));
    };
    let repo = repo.trim_start_matches('/');
    if repo.is_empty() {
        return Err(format!("{path} names no repository"));
    }
    Ok(Endpoint { service, discovery, repo: repo.to_string() })
}

/// One caller connection to a git target.
struct Git {
    proxy: Arc<Proxy>,
    caller: CallerInfo,
    seq: AtomicU64,
}

/// What the audit log says about one git request.
struct Info {
    service: String,
    repo: String,
    classes: Vec<String>,
    refs: Vec<RefUpdate>,
    push_options: Vec<String>,
}

impl Info {
    fn request(&self) -> RequestInfo {
        RequestInfo::Git {
            service: self.service.clone(),
            repo: self.repo.clone(),
            refs: self.refs.clone(),
            classes: self.classes.clone(),
            push_options: self.push_options.clone(),
        }
    }
}

/// A push's command classified: what it does and its decision.
struct Classified {
    command: Command,
    kind: RefKind,
}

impl Git {
    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let p = &self.proxy;
        let raw_path = req.uri().path().to_string();
        let mut info = Info {
            service: String::new(),
            repo: raw_path.clone(),
            classes: Vec::new(),
            refs: Vec::new(),
            push_options: Vec::new(),
        };
        if p.admission.verdict != Verdict::Allow {
            let d = p.admission.clone();
            return self.refuse(&info, &d, StatusCode::FORBIDDEN);
        }
        let policy = p.enforcer.policy();
        let Some(target) = policy.target(&p.target.name).filter(|t| t.protocol == p.target.protocol) else {
            let d = Decision::deny(
                p.role.as_deref(),
                "targets",
                format!("target {} is no longer a git target of the policy in force", p.target.name),
            );
            return self.refuse(&info, &d, StatusCode::FORBIDDEN);
        };
        let host = match check_host(
            req.uri().authority(),
            req.headers().get(header::HOST),
            p.sni.as_deref(),
            p.tls,
            &target.hosts,
            (p.orig_dst.0.ip(), p.orig_dst.0.port()),
        ) {
            Ok(h) => h,
            Err(e) => {
                let d = Decision::deny(p.role.as_deref(), format!("targets.{}.hosts", p.target.name), e.to_string());
                return self.refuse(&info, &d, StatusCode::FORBIDDEN);
            }
        };
        let path = match normalise_path(&raw_path) {
            Ok(x) => x.into_owned(),
            Err(e) => {
                let d = Decision::deny(p.role.as_deref(), "git.path", e.to_string());
                return self.refuse(&info, &d, StatusCode::FORBIDDEN);
            }
        };
        let ep = match endpoint(req.method(), &path, req.uri().query()) {
            Ok(ep) => ep,
            Err(e) => {
                let d = Decision::deny(p.role.as_deref(), "git.path", e);
                return self.refuse(&info, &d, StatusCode::FORBIDDEN);
            }
        };
        info.service = ep.service.name().to_string();
        info.repo.clone_from(&ep.repo);
        info.classes = vec![match (ep.service, ep.discovery) {
            (_, true) => "discovery".to_string(),
            (GitService::UploadPack, false) => "fetch".to_string(),
            (GitService::ReceivePack, false) => "push".to_string(),
        }];
        let base = decide_git(
            &policy,
            p.role.as_deref(),
            target,
            &GitRequest { service: ep.service, repo: &ep.repo, refs: &[], push_options: &[] },
        );
        drop(policy);
        if base.decision.verdict != Verdict::Allow {
            return self.refuse(&info, &base.decision, StatusCode::FORBIDDEN);
        }
        let authority = match req.uri().authority() {
            Some(a) => a.as_str().to_ascii_lowercase(),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| host.clone()),
        };
        let admitted = |decision: Decision, method: Method| Admitted {
            seq,
            method,
            host: host.clone(),
            authority: authority.clone(),
            path: path.clone(),
            decision,
            max_body: None,
            websocket: false,
        };
        let (mut parts, incoming) = req.into_parts();
        // The caller's remote carries no credentials: only the target's go
        // upstream.
        parts.headers.remove(header::AUTHORIZATION);
        if ep.service == GitService::ReceivePack && !ep.discovery {
            return self.push(info, parts, incoming, base.max_body, admitted(base.decision, Method::POST)).await;
        }
        self.allowed(&info, &base.decision, false).await;
        let method = parts.method.clone();
        let resp = p.forward(Request::from_parts(parts, incoming), admitted(base.decision, method)).await;
        if ep.discovery {
            return check_advertisement(resp, ep.service).await;
        }
        resp
    }

    /// Records an allowed request (on disk first when it changes state).
    async fn allowed(&self, info: &Info, d: &Decision, durable: bool) -> bool {
        let e = &self.proxy.enforcer;
        e.stats.decision(d, &self.proxy.target.name, "git");
        let event =
            Event::Decision { session: self.proxy.session, request: info.request(), decision: DecisionInfo::from(d) };
        if durable {
            if let Err(err) = e.audit.record_durable(event).await {
                warn!(session = %self.proxy.session, error = %err, "audit write failed; push refused");
                return false;
            }
        } else {
            e.audit.record(event);
        }
        Stats::inc(&e.stats.allowed);
        true
    }

    /// Records and answers a refusal with a plain-text body (git shows it).
    fn refuse(&self, info: &Info, d: &Decision, status: StatusCode) -> Response<Body> {
        let e = &self.proxy.enforcer;
        Stats::inc(&e.stats.denied);
        e.stats.decision(d, &self.proxy.target.name, "git");
        debug!(session = %self.proxy.session, repo = %info.repo, rule = %d.rule, reason = %d.reason, "git request refused");
        e.audit.record(Event::Decision {
            session: self.proxy.session,
            request: info.request(),
            decision: DecisionInfo::from(d),
        });
        text(status, &format!("portcullis: {} ({} by {})\n", d.reason, d.verdict, d.rule))
    }

    /// A push: buffered, decided ref by ref, then forwarded, held or
    /// refused with a report-status.
    async fn push(
        self: &Arc<Self>,
        mut info: Info,
        parts: http::request::Parts,
        incoming: Incoming,
        max_body: u64,
        admitted: Admitted,
    ) -> Response<Body> {
        let p = &self.proxy;
        let role = p.role.as_deref();
        let raw = match read_body(incoming, max_body).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                let d = Decision::deny(
                    role,
                    admitted.decision.rule.clone(),
                    format!("push is over max_body ({max_body} bytes)"),
                );
                return self.refuse(&info, &d, StatusCode::PAYLOAD_TOO_LARGE);
            }
            Err(BodyError::Read(e)) => {
                let d = Decision::deny(role, "git.body", format!("reading the push failed: {e}"));
                return self.refuse(&info, &d, StatusCode::BAD_REQUEST);
            }
        };
        let decoded = match decode(&parts.headers, &raw, max_body) {
            Ok(d) => d,
            Err(e) => {
                let d = Decision::deny(role, "git.body", e);
                return close(self.refuse(&info, &d, StatusCode::BAD_REQUEST));
            }
        };
        // The upstream gets exactly the bytes that were decided on: a
        // coded body goes on decoded (a server may read a gzip body
        // otherwise than this reader did).
        let mut parts = parts;
        let raw =
            if parts.headers.remove(header::CONTENT_ENCODING).is_some() { Bytes::from(decoded.clone()) } else { raw };
        let req = match wire::parse_push(&decoded) {
            Ok(r) => r,
            Err(e) => {
                let d = Decision::deny(role, "git.receive-pack", format!("malformed push: {e}"));
                return close(self.refuse(&info, &d, StatusCode::BAD_REQUEST));
            }
        };
        let forward_req = |parts: http::request::Parts, raw: Bytes| {
            let mut parts = parts;
            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(raw.len()));
            Request::from_parts(parts, Full::new(raw))
        };
        if req.commands.is_empty() {
            // git's probe before a large push: nothing changes.
            info.classes = vec!["probe".into()];
            self.allowed(&info, &admitted.decision, false).await;
            return p.forward(forward_req(parts, raw), admitted).await;
        }
        let limits = pack::Limits { max_inflated: max_body.saturating_mul(16).max(64 << 20), ..Default::default() };
        let classified = match classify(&req, decoded, limits).await {
            Ok(c) => c,
            Err(e) => {
                let d = Decision::deny(role, admitted.decision.rule.clone(), e);
                let info = Info { refs: refs_of(&req, None), ..info };
                return self.report_refusal(&info, &req, &d, &vec![d.clone(); req.commands.len()]);
            }
        };
        info.refs = classified.iter().map(|c| ref_update(&c.command, c.kind)).collect();
        info.classes = classified.iter().map(|c| c.kind.name().to_string()).collect();
        info.classes.dedup();
        let names: Vec<(&str, RefKind)> = classified.iter().map(|c| (c.command.name.as_str(), c.kind)).collect();
        info.push_options.clone_from(&req.push_options);
        let options: Vec<&str> = req.push_options.iter().map(String::as_str).collect();
        let policy = p.enforcer.policy();
        let Some(target) = policy.target(&p.target.name) else {
            let d = Decision::deny(role, "targets", "the target is gone from the policy in force");
            return self.refuse(&info, &d, StatusCode::FORBIDDEN);
        };
        let gd = decide_git(
            &policy,
            role,
            target,
            &GitRequest { service: GitService::ReceivePack, repo: &info.repo, refs: &names, push_options: &options },
        );
        drop(policy);
        match gd.decision.verdict {
            Verdict::Deny => self.report_refusal(&info, &req, &gd.decision, &gd.refs),
            Verdict::Allow => {
                if !self.record_refs(&info, &gd.refs).await || !self.allowed(&info, &gd.decision, true).await {
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "portcullis: the audit log cannot be written; push refused\n",
                    );
                }
                let admitted = Admitted { decision: gd.decision, ..admitted };
                p.forward(forward_req(parts, raw), admitted).await
            }
            Verdict::Approve => {
                let rebuilt = forward_req(parts, raw);
                self.hold(info, req, gd.decision, gd.refs, rebuilt, admitted)
            }
        }
    }

    /// One record per ref update, with its own decision.
    async fn record_refs(&self, info: &Info, decisions: &[Decision]) -> bool {
        let audit = &self.proxy.enforcer.audit;
        for (u, d) in info.refs.iter().zip(decisions) {
            let event = Event::GitRefUpdate {
                session: self.proxy.session,
                repo: info.repo.clone(),
                update: u.clone(),
                decision: DecisionInfo::from(d),
            };
            if let Err(e) = audit.record_durable(event).await {
                warn!(session = %self.proxy.session, error = %e, "audit write failed; push refused");
                return false;
            }
        }
        true
    }

    /// Refuses a whole push with git's report-status: nothing is forwarded.
    fn report_refusal(&self, info: &Info, req: &PushRequest, d: &Decision, per_ref: &[Decision]) -> Response<Body> {
        let e = &self.proxy.enforcer;
        Stats::inc(&e.stats.denied);
        e.stats.decision(d, &self.proxy.target.name, "git");
        for (u, rd) in info.refs.iter().zip(per_ref) {
            e.audit.record(Event::GitRefUpdate {
                session: self.proxy.session,
                repo: info.repo.clone(),
                update: u.clone(),
                decision: DecisionInfo::from(rd),
            });
        }
        e.audit.record(Event::Decision {
            session: self.proxy.session,
            request: info.request(),
            decision: DecisionInfo::from(d),
        });
        let reasons: Vec<String> = per_ref
            .iter()
            .map(|rd| {
                if rd.verdict == Verdict::Deny {
                    rd.reason.clone()
                } else {
                    "atomic push: another ref was refused".into()
                }
            })
            .collect();
        let mut out = Vec::new();
        report(&mut out, req, &format!("push refused by {}: {}", d.rule, d.reason), &reasons);
        result_response(Body::from_full(out))
    }

    /// Holds a push for approval. The answer starts at once (so side-band
    /// messages reach the caller while it waits) and carries the
    /// upstream's report when approved, or `ng` lines when not.
    fn hold(
        self: &Arc<Self>,
        info: Info,
        req: PushRequest,
        d: Decision,
        per_ref: Vec<Decision>,
        forward: Request<Full<Bytes>>,
        admitted: Admitted,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(16);
        let git = self.clone();
        tokio::spawn(async move { git.held(info, req, d, per_ref, forward, admitted, tx).await });
        result_response(body::boxed(ChannelBody { rx }))
    }

    #[allow(clippy::too_many_arguments)]
    async fn held(
        self: Arc<Self>,
        info: Info,
        req: PushRequest,
        d: Decision,
        per_ref: Vec<Decision>,
        forward: Request<Full<Bytes>>,
        admitted: Admitted,
        tx: mpsc::Sender<Result<Bytes, BoxError>>,
    ) {
        let p = &self.proxy;
        let e = p.enforcer.clone();
        let _ = self.record_refs(&info, &per_ref).await;
        e.audit.record(Event::Decision {
            session: p.session,
            request: info.request(),
            decision: DecisionInfo::from(&d),
        });
        let held: Vec<String> = info
            .refs
            .iter()
            .zip(&per_ref)
            .filter(|(_, rd)| rd.verdict == Verdict::Approve)
            .map(|(u, _)| format!("{} {}", u.kind, u.name))
            .collect();
        let request = format!(
            "git push {}: {}",
            info.repo,
            info.refs
                .iter()
                .map(|u| format!("{} {} {}..{}", u.kind, u.name, short(&u.old), short(&u.new)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let ticket = e.approvals.submit(HoldRequest {
            session: p.session,
            caller: self.caller.clone(),
            role: p.role.clone(),
            target: p.target.name.clone(),
            protocol: "git".into(),
            request,
            shape: format!("git push {} {}", info.repo, held.join(" ")),
            rule: d.rule.clone(),
            timeout: d.approval_timeout,
        });
        let id = ticket.id;
        let band = req.sideband();
        let progress = |msg: String| {
            let mut out = Vec::new();
            if let Some(max) = band {
                pktline::write_band(&mut out, 2, format!("portcullis: {msg}\n").as_bytes(), max);
            }
            Bytes::from(out)
        };
        let _ = tx
            .send(Ok(progress(format!(
                "push held for approval {id}: {} ({}); an approver runs `portcullis approvals approve {id}`",
                d.reason, d.rule
            ))))
            .await;
        Stats::inc(&e.stats.approvals_held);
        let outcome = {
            let wait = e.approvals.wait(ticket, tx.closed());
            tokio::pin!(wait);
            let mut tick = tokio::time::interval(HOLD_PROGRESS_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    o = &mut wait => break o,
                    _ = tick.tick() => {
                        if band.is_some() {
                            let _ = tx.try_send(Ok(progress(format!("still waiting for approval {id}"))));
                        }
                    }
                }
            }
        };
        e.stats.approvals_held.fetch_sub(1, Ordering::Relaxed);
        let approved = outcome.approved();
        let final_d = Decision {
            verdict: if approved { Verdict::Allow } else { Verdict::Deny },
            reason: format!("{}: {}", d.reason, outcome.describe()),
            ..d.clone()
        };
        let finals: Vec<Decision> = per_ref
            .iter()
            .map(|rd| match rd.verdict {
                Verdict::Approve => Decision { verdict: final_d.verdict, reason: final_d.reason.clone(), ..rd.clone() },
                _ => rd.clone(),
            })
            .collect();
        if !approved {
            Stats::inc(&e.stats.denied);
            e.stats.decision(&final_d, &p.target.name, "git");
            for (u, rd) in info.refs.iter().zip(&finals) {
                e.audit.record(Event::GitRefUpdate {
                    session: p.session,
                    repo: info.repo.clone(),
                    update: u.clone(),
                    decision: DecisionInfo::from(rd),
                });
            }
            e.audit.record(Event::Decision {
                session: p.session,
                request: info.request(),
                decision: DecisionInfo::from(&final_d),
            });
            let reasons: Vec<String> = per_ref
                .iter()
                .map(|rd| match rd.verdict {
                    Verdict::Approve => outcome.describe(),
                    _ => "atomic push: another ref was not approved".into(),
                })
                .collect();
            let mut out = Vec::new();
            report(&mut out, &req, &format!("push not approved ({id}): {}", outcome.describe()), &reasons);
            let _ = tx.send(Ok(Bytes::from(out))).await;
            return;
        }
        if !self.record_refs(&info, &finals).await || !self.allowed(&info, &final_d, true).await {
            let mut out = Vec::new();
            let reasons = vec!["the audit log cannot be written".to_string(); req.commands.len()];
            report(&mut out, &req, "push refused: the audit log cannot be written", &reasons);
            let _ = tx.send(Ok(Bytes::from(out))).await;
            return;
        }
        let resp = p.forward(forward, Admitted { decision: final_d, ..admitted }).await;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let mut out = Vec::new();
            let reasons = vec![format!("upstream answered HTTP {}", status.as_u16()); req.commands.len()];
            report(&mut out, &req, &format!("approved, but the upstream answered HTTP {}", status.as_u16()), &reasons);
            let _ = tx.send(Ok(Bytes::from(out))).await;
            return;
        }
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        if tx.send(Ok(data)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        }
    }
}

/// Classifies each command: create, delete, or update, which is a force
/// push unless the pack proves it fast-forward. The pack is read off the
/// runtime threads.
async fn classify(req: &PushRequest, decoded: Vec<u8>, limits: pack::Limits) -> Result<Vec<Classified>, String> {
    let needs_walk = req.commands.iter().any(|c| !c.old.is_null() && !c.new.is_null());
    let commits = if needs_walk && req.expects_pack() {
        let (offset, format) = (req.pack_offset, req.format);
        tokio::task::spawn_blocking(move || pack::read_commits(&decoded[offset..], format, limits))
            .await
            .map_err(|e| format!("reading the pack failed: {e}"))?
            .map_err(|e| e.to_string())?
    } else {
        pack::Commits::default()
    };
    Ok(req
        .commands
        .iter()
        .map(|c| {
            let kind = if c.old.is_null() {
                RefKind::Create
            } else if c.new.is_null() {
                RefKind::Delete
            } else if commits.proves_fast_forward(&c.old, &c.new) {
                RefKind::Update
            } else {
                RefKind::Force
            };
            Classified { command: c.clone(), kind }
        })
        .collect())
}

fn ref_update(c: &Command, kind: RefKind) -> RefUpdate {
    RefUpdate { name: c.name.clone(), old: c.old.to_string(), new: c.new.to_string(), kind: kind.name().into() }
}

/// The refs of a push before they could be classified.
fn refs_of(req: &PushRequest, kind: Option<RefKind>) -> Vec<RefUpdate> {
    req.commands
        .iter()
        .map(|c| RefUpdate {
            name: c.name.clone(),
            old: c.old.to_string(),
            new: c.new.to_string(),
            kind: kind.map_or("unknown", RefKind::name).into(),
        })
        .collect()
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

/// Writes a refusal as git's receive-pack would: a side-band 2 message,
/// then `unpack ok` and `ng <ref> <reason>` for every command (inside
/// band 1 when the client asked for a side-band), then a flush.
pub fn report(out: &mut Vec<u8>, req: &PushRequest, message: &str, reasons: &[String]) {
    let one_line = |s: &str| s.replace(['\n', '\r'], " ");
    let mut status = Vec::new();
    if req.has_cap("report-status") || req.has_cap("report-status-v2") {
        pktline::write(&mut status, b"unpack ok\n");
        for (c, r) in req.commands.iter().zip(reasons) {
            pktline::write(&mut status, format!("ng {} {}\n", c.name, one_line(r)).as_bytes());
        }
        pktline::flush(&mut status);
    }
    match req.sideband() {
        Some(max) => {
            pktline::write_band(out, 2, format!("portcullis: {}\n", one_line(message)).as_bytes(), max);
            if !status.is_empty() {
                pktline::write_band(out, 1, &status, max);
            }
            pktline::flush(out);
        }
        None => out.extend_from_slice(&status),
    }
}

fn result_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(RESULT_TYPE));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(msg.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The connection is closed after this answer (a malformed message).
fn close(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

trait FromFull {
    fn from_full(v: Vec<u8>) -> Body;
}

impl FromFull for Body {
    fn from_full(v: Vec<u8>) -> Body {
        body::full(v)
    }
}

enum BodyError {
    TooLarge,
    Read(String),
}

/// Reads a request body whole, refusing it past `max` bytes.
async fn read_body(mut incoming: Incoming, max: u64) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > max {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// The body as git wrote it: gzip (which git may use for large requests)
/// is undone, every member of it (the decoded body is what is forwarded).
fn decode(headers: &http::HeaderMap, raw: &Bytes, max: u64) -> Result<Vec<u8>, String> {
    let enc = headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match enc.as_deref() {
        None | Some("identity") => Ok(raw.to_vec()),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::new();
            let limit = max.saturating_mul(16).max(64 << 20);
            flate2::read::MultiGzDecoder::new(&raw[..])
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("bad gzip body: {e}"))?;
            if out.len() as u64 > limit {
                return Err("the gzip body inflates too far".into());
            }
            Ok(out)
        }
        Some(other) => Err(format!("unsupported Content-Encoding `{other}`")),
    }
}

/// Checks a ref advertisement on its way back: a 200 answer must be a
/// well-formed advertisement for the service asked for; anything else
/// from the upstream is passed on as is.
async fn check_advertisement(resp: Response<Body>, service: GitService) -> Response<Body> {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let mut buf = BytesMut::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    if buf.len() + d.len() > MAX_ADVERTISEMENT {
                        return text(
                            StatusCode::BAD_GATEWAY,
                            "portcullis: the upstream's ref advertisement is too large\n",
                        );
                    }
                    buf.extend_from_slice(&d);
                }
            }
            Err(e) => return text(StatusCode::BAD_GATEWAY, &format!("portcullis: upstream body: {e}\n")),
        }
    }
    let bytes = buf.freeze();
    let plain = match parts.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None => bytes.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            if flate2::read::GzDecoder::new(&bytes[..]).take(MAX_ADVERTISEMENT as u64).read_to_end(&mut out).is_err() {
                return text(StatusCode::BAD_GATEWAY, "portcullis: bad gzip advertisement from the upstream\n");
            }
            out
        }
        Some(other) => {
            return text(
                StatusCode::BAD_GATEWAY,
                &format!("portcullis: unsupported Content-Encoding `{other}` upstream\n"),
            )
        }
    };
    match wire::parse_advertisement(&plain) {
        Ok(adv) if adv.service == service.name() || (adv.version == 2 && adv.service.is_empty()) => {
            Response::from_parts(parts, body::full(bytes))
        }
        Ok(adv) => text(
            StatusCode::BAD_GATEWAY,
            &format!("portcullis: the upstream advertised `{}` for `{}`\n", adv.service, service.name()),
        ),
        Err(e) => {
            text(StatusCode::BAD_GATEWAY, &format!("portcullis: malformed ref advertisement from the upstream: {e}\n"))
        }
    }
}

/// A response body fed from a channel (a held push's answer).
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::git::pktline::{read, Pkt};

    #[test]
    fn endpoints_are_read_from_the_path() {
        let ep = endpoint(&Method::GET, "/org/app.git/info/refs", Some("service=git-receive-pack")).unwrap();
        assert_eq!(ep, Endpoint { service: GitService::ReceivePack, discovery: true, repo: "org/app.git".into() });
        let ep = endpoint(&Method::POST, "/org/app.git/git-upload-pack", None).unwrap();
        assert_eq!((ep.service, ep.discovery, ep.repo.as_str()), (GitService::UploadPack, false, "org/app.git"));
        assert!(endpoint(&Method::GET, "/org/app.git/info/refs", None).unwrap_err().contains("dumb HTTP"));
        assert!(endpoint(&Method::GET, "/org/app.git/info/refs", Some("service=git-shell")).is_err());
        assert!(endpoint(&Method::GET, "/org/app.git/git-upload-pack", None).is_err());
        assert!(endpoint(&Method::POST, "/org/app.git/info/refs", Some("service=git-upload-pack")).is_err());
        assert!(endpoint(&Method::GET, "/org/app.git/objects/ab/cdef", None).is_err());
        assert!(endpoint(&Method::GET, "/org/app.git/HEAD", None).is_err());
        assert!(endpoint(&Method::POST, "/git-receive-pack", None).is_err());
    }

    fn push(caps: &str, names: &[&str]) -> PushRequest {
        let a = "1".repeat(40);
        let b = "2".repeat(40);
        let mut buf = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let line = if i == 0 { format!("{a} {b} {n}\0{caps}") } else { format!("{a} {b} {n}") };
            pktline::write(&mut buf, line.as_bytes());
        }
        pktline::flush(&mut buf);
        wire::parse_push(&buf).unwrap()
    }

    #[test]
    fn refusals_are_report_status_in_side_band() {
        let req = push("report-status side-band-64k", &["refs/heads/main", "refs/heads/x"]);
        let mut out = Vec::new();
        report(&mut out, &req, "push refused\nby rule", &["main is protected".into(), "atomic".into()]);
        let mut pos = 0;
        let mut band2 = Vec::new();
        let mut band1 = Vec::new();
        loop {
            match read(&out, &mut pos).unwrap() {
                Some(Pkt::Data(d)) if d[0] == 2 => band2.extend_from_slice(&d[1..]),
                Some(Pkt::Data(d)) if d[0] == 1 => band1.extend_from_slice(&d[1..]),
                Some(Pkt::Flush) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(pos, out.len());
        assert_eq!(band2, b"portcullis: push refused by rule\n");
        let mut lines = Vec::new();
        let mut pos = 0;
        while let Some(p) = read(&band1, &mut pos).unwrap() {
            lines.push(match p {
                Pkt::Data(d) => String::from_utf8(d.to_vec()).unwrap(),
                other => format!("{other:?}"),
            });
        }
        assert_eq!(
            lines,
            ["unpack ok\n", "ng refs/heads/main main is protected\n", "ng refs/heads/x atomic\n", "Flush"]
        );
    }

    #[test]
    fn refusals_without_side_band_are_plain_report_status() {
        let req = push("report-status", &["refs/heads/main"]);
        let mut out = Vec::new();
        report(&mut out, &req, "m", &["no".into()]);
        assert_eq!(out, b"000eunpack ok\n001ang refs/heads/main no\n0000".to_vec());
    }

    #[test]
    fn gzip_bodies_are_decoded_for_reading() {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b"0000").unwrap();
        let gz = Bytes::from(e.finish().unwrap());
        let mut h = http::HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(decode(&h, &gz, 100).unwrap(), b"0000");
        // Members joined end to end are all read (an empty first member
        // must not hide the commands after it).
        let member = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let two = Bytes::from([member(b""), member(b"0000")].concat());
        assert_eq!(decode(&h, &two, 100).unwrap(), b"0000");
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert!(decode(&h, &gz, 100).is_err());
        assert_eq!(decode(&http::HeaderMap::new(), &Bytes::from_static(b"x"), 100).unwrap(), b"x");
    }
}
