//! Webhook notifications of held requests: an HTTP(S) POST with a JSON
//! body, retried with backoff until the request expires, every attempt
//! recorded. A webhook is told, never asked: its answer is ignored.
use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tracing::warn;

use super::PendingView;
use crate::audit::{now_ms, Audit, Event};

#[derive(Clone)]
pub struct Notifier {
    url: Option<Uri>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Notifier {
    pub fn disabled() -> Notifier {
        Notifier { url: None, tls: None }
    }

    /// `url` is `http://host:port/path` or `https://...` (verified against
    /// the system roots).
    pub fn new(url: &str) -> Result<Notifier, String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad webhook URL {url}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(crate::tls::client_config(None, &[b"http/1.1"]).map_err(|e| e.to_string())?),
            _ => return Err(format!("webhook URL {url} must start with http:// or https://")),
        };
        if uri.host().is_none() {
            return Err(format!("webhook URL {url} has no host"));
        }
        Ok(Notifier { url: Some(uri), tls })
    }

    pub fn url(&self) -> Option<String> {
        self.url.as_ref().map(ToString::to_string)
    }

    /// Sends the notification in the background.
    pub fn notify(&self, view: &PendingView, audit: Audit) {
        let Some(url) = self.url.clone() else { return };
        let body = json!({
            "id": view.id,
            "subject": {
                "session": view.request.session,
                "role": view.request.role,
                "caller": view.request.caller,
            },
            "target": view.request.target,
            "protocol": view.request.protocol,
            "request": view.request.request,
            "rule": view.request.rule,
            "requested_ms": view.requested_ms,
            "expiry_ms": view.expires_ms,
            "approve": format!("portcullis approvals approve {}", view.id),
        });
        let tls = self.tls.clone();
        let (id, expires) = (view.id.0, view.expires_ms);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            for attempt in 1u32.. {
                let result = post(&url, tls.clone(), body.to_string()).await;
                let ok = result.is_ok();
                audit.record(Event::ApprovalNotified {
                    id,
                    url: url.to_string(),
                    attempt,
                    ok,
                    error: result.as_ref().err().cloned(),
                });
                if ok {
                    return;
                }
                warn!(approval = id, url = %url, attempt, error = %result.unwrap_err(), "webhook notification failed");
                if now_ms() + delay.as_millis() as u64 >= expires || attempt >= 10 {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        });
    }
}

async fn post(url: &Uri, tls: Option<Arc<rustls::ClientConfig>>, body: String) -> Result<u16, String> {
    let host = url.host().ok_or("no host")?.trim_matches(['[', ']']).to_string();
    let port = url.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let req = Request::post(path)
        .header("host", url.authority().map_or(host.clone(), |a| a.to_string()))
        .header("content-type", "application/json")
        .header("user-agent", concat!("portcullis/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let status = match tls {
        None => send(TokioIo::new(tcp), req).await?,
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
            let stream =
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| format!("tls: {e}"))?;
            send(TokioIo::new(stream), req).await?
        }
    };
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(format!("HTTP {status}"))
    }
}

async fn send<T>(io: T, req: Request<Full<Bytes>>) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    // Drain the body; its content is ignored (a webhook cannot approve).
    let _ = resp.into_body().collect().await;
    Ok(status)
}
