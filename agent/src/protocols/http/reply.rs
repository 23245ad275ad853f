//! portcullis' own answers: JSON bodies that say what was decided, by which
//! rule, and why.
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::body::{full, Body};
use crate::{approvals::ApprovalId, ids::SessionId, policy::Decision};

#[derive(Serialize)]
struct Denied<'a> {
    error: &'a str,
    verdict: String,
    rule: &'a str,
    reason: &'a str,
    role: Option<&'a str>,
    session: String,
    request: u64,
    /// Id of the approval request, once requests can be held.
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<String>,
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A request the policy refused (403), or whose body is too large (413).
pub fn denied(status: StatusCode, d: &Decision, session: SessionId, seq: u64) -> Response<Body> {
    json(
        status,
        &Denied {
            error: if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "denied" },
            verdict: d.verdict.to_string(),
            rule: &d.rule,
            reason: &d.reason,
            role: d.role.as_deref(),
            session: session.to_string(),
            request: seq,
            approval: None,
        },
    )
}

/// A request its rule holds for a human: refused until approvals exist.
pub fn approval_required(d: &Decision, session: SessionId, seq: u64) -> Response<Body> {
    json(
        StatusCode::FORBIDDEN,
        &Denied {
            error: "approval_required",
            verdict: d.verdict.to_string(),
            rule: &d.rule,
            reason: &format!("{}; approval is required and this request was not held", d.reason),
            role: d.role.as_deref(),
            session: session.to_string(),
            request: seq,
            approval: None,
        },
    )
}

/// A held request that was not approved (denied by a human, or its
/// approval timed out): 403 naming the rule and the approval id.
pub fn approval_refused(d: &Decision, session: SessionId, seq: u64, approval: ApprovalId) -> Response<Body> {
    json(
        StatusCode::FORBIDDEN,
        &Denied {
            error: "denied",
            verdict: d.verdict.to_string(),
            rule: &d.rule,
            reason: &d.reason,
            role: d.role.as_deref(),
            session: session.to_string(),
            request: seq,
            approval: Some(approval.to_string()),
        },
    )
}

/// The early answer to a request held for approval: 403
/// `approval_required` with the id to approve; once approved, the same
/// request again goes through.
pub fn approval_pending(d: &Decision, session: SessionId, seq: u64, approval: ApprovalId) -> Response<Body> {
    json(
        StatusCode::FORBIDDEN,
        &Denied {
            error: "approval_required",
            verdict: d.verdict.to_string(),
            rule: &d.rule,
            reason: &format!("{}; waiting for approval {approval}: retry once it is approved", d.reason),
            role: d.role.as_deref(),
            session: session.to_string(),
            request: seq,
            approval: Some(approval.to_string()),
        },
    )
}

#[derive(Serialize)]
struct Failure<'a> {
    error: &'a str,
    reason: &'a str,
}

/// A request portcullis could not carry out (upstream down, no audit).
pub fn error(status: StatusCode, error: &str, reason: &str) -> Response<Body> {
    json(status, &Failure { error, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn denials_name_the_rule() {
        let d = Decision::deny(Some("agent"), "roles.agent.rules[0]", "DELETE /x is in deny");
        let resp = denied(StatusCode::FORBIDDEN, &d, SessionId::random(), 4);
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "denied");
        assert_eq!(v["rule"], "roles.agent.rules[0]");
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["request"], 4);
    }
}
