//! What portcullis checks and rewrites in a request, as pure functions:
//! the host it is for, its normalised path, the headers that must not cross
//! a proxy, and credential stripping and injection.
use std::{borrow::Cow, net::IpAddr};

use base64::Engine as _;
use http::{
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery},
    HeaderMap, HeaderValue,
};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::{credentials::Secret, policy::HttpInjection};

/// Why a request was refused before the policy saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the client sent no SNI: the host cannot be checked")]
    NoSni,
    #[error("the request names no host (no Host header or :authority)")]
    NoHost,
    #[error("Host `{host}` and :authority `{authority}` differ")]
    HostMismatch { host: String, authority: String },
    #[error("bad host `{0}`")]
    BadHost(String),
    #[error("host `{host}` does not match the TLS server name `{sni}`")]
    NotSni { host: String, sni: String },
    #[error("port {port} is not the port the connection was made to ({expected})")]
    Port { port: u16, expected: u16 },
    #[error("host `{0}` is not one of the target's hosts")]
    UnknownHost(String),
    #[error("path {0}")]
    Path(&'static str),
}

/// Checks the host a request is for: the Host header and the URI's
/// authority (HTTP/2 `:authority`, HTTP/1.1 absolute form) must agree, carry
/// the port the connection was made to if any, equal the SNI under TLS, and
/// be one of the target's hosts (or the address the caller dialled).
/// Returns the normalised host name.
pub fn check_host(
    uri_authority: Option<&Authority>,
    host_header: Option<&HeaderValue>,
    sni: Option<&str>,
    tls: bool,
    hosts: &[String],
    dialled: (IpAddr, u16),
) -> Result<String, RequestError> {
    if tls && sni.is_none() {
        return Err(RequestError::NoSni);
    }
    let header: Option<Authority> = match host_header {
        None => None,
        Some(v) => {
            let s = v.to_str().map_err(|_| RequestError::BadHost(String::from_utf8_lossy(v.as_bytes()).into()))?;
            Some(s.parse::<Authority>().map_err(|_| RequestError::BadHost(s.to_string()))?)
        }
    };
    let authority = match (uri_authority, &header) {
        (Some(a), Some(h)) => {
            if !a.as_str().eq_ignore_ascii_case(h.as_str()) {
                return Err(RequestError::HostMismatch { host: h.to_string(), authority: a.to_string() });
            }
            a
        }
        (Some(a), None) => a,
        (None, Some(h)) => h,
        (None, None) => return Err(RequestError::NoHost),
    };
    if authority.as_str().contains('@') {
        return Err(RequestError::BadHost(authority.to_string()));
    }
    let host = normalise_host(authority.host());
    if host.is_empty() {
        return Err(RequestError::BadHost(authority.to_string()));
    }
    if let Some(port) = authority.port_u16() {
        if port != dialled.1 {
            return Err(RequestError::Port { port, expected: dialled.1 });
        }
    }
    if tls {
        let sni = sni.map(normalise_host).unwrap_or_default();
        if sni != host {
            return Err(RequestError::NotSni { host, sni });
        }
    }
    let is_dialled = host.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical() == dialled.0.to_canonical());
    if is_dialled || hosts.iter().any(|h| host_matches(h, &host)) {
        Ok(host)
    } else {
        Err(RequestError::UnknownHost(host))
    }
}

/// Lower case, no trailing dot, no IPv6 brackets.
pub fn normalise_host(h: &str) -> String {
    h.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

/// A target host entry: an exact name, or `*.domain` for any name below it.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            host.len() > domain.len() + 1 && host.ends_with(domain) && {
                let cut = host.len() - domain.len();
                host.as_bytes()[cut - 1] == b'.'
            }
        }
        None => pattern == host,
    }
}

/// Whether a host a request named may be given a certificate: the
/// target's hosts (an empty list admits any valid name).
pub fn certificate_allowed(hosts: &[String], name: &str) -> bool {
    hosts.is_empty() || hosts.iter().any(|h| host_matches(h, name))
}

/// The path as portcullis decides on it and forwards it: percent-escapes of
/// unreserved characters decoded (RFC 3986 says they are equivalent) and
/// the others in upper case, so one resource has one spelling. `.` and
/// `..` segments, empty segments (`//`), NUL and backslashes are refused:
/// servers disagree on what they mean, and a rule must see what the
/// server will.
pub fn normalise_path(raw: &str) -> Result<Cow<'_, str>, RequestError> {
    if raw == "*" {
        return Ok(Cow::Borrowed("*"));
    }
    if !raw.starts_with('/') {
        return Err(RequestError::Path("must start with `/`"));
    }
    let bytes = raw.as_bytes();
    let mut out: Option<String> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(RequestError::Path("has a broken %-escape"))?;
            // Two hex digits: `from_str_radix` alone also takes a sign
            // (`%+2` would read as 0x02).
            let v = Some(hex)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(RequestError::Path("has a broken %-escape"))?;
            let unreserved = v.is_ascii_alphanumeric() || b"-._~".contains(&v);
            let o = out.get_or_insert_with(|| raw[..i].to_string());
            if unreserved {
                o.push(v as char);
            } else {
                if v == 0 {
                    return Err(RequestError::Path("contains NUL"));
                }
                if v == b'\\' {
                    return Err(RequestError::Path("contains a backslash"));
                }
                o.push('%');
                o.push_str(&format!("{v:02X}"));
            }
            i += 3;
            continue;
        }
        if b == b'\\' {
            return Err(RequestError::Path("contains a backslash"));
        }
        // Copy the whole character: a byte above 0x7F is part of a UTF-8
        // sequence, not a Latin-1 character of its own.
        let ch = raw[i..].chars().next().expect("i is on a character boundary");
        if let Some(o) = out.as_mut() {
            o.push(ch);
        }
        i += ch.len_utf8();
    }
    let path = match out {
        Some(s) => Cow::Owned(s),
        None => Cow::Borrowed(raw),
    };
    // What is decided must be what is forwarded: a path the URI grammar
    // refuses (control characters and the like) could not be sent as it is.
    if path.bytes().any(|b| b.is_ascii_control()) {
        return Err(RequestError::Path("contains a control character"));
    }
    if path.bytes().any(|b| b == b'#' || b == b'?') {
        return Err(RequestError::Path("contains a raw `#` or `?`"));
    }
    if path.parse::<PathAndQuery>().is_err() {
        return Err(RequestError::Path("is not a valid URI path"));
    }
    for (n, seg) in path.split('/').enumerate().skip(1) {
        // Nor behind `;parameters` (which some servers drop before they
        // resolve dot segments) or an encoded slash (which others decode
        // first): `/a/..;/b`, `/a/..%2Fb`.
        for piece in seg.split("%2F") {
            let bare = piece.split(';').next().unwrap_or_default();
            if bare == "." || bare == ".." {
                return Err(RequestError::Path("contains a `.` or `..` segment"));
            }
        }
        let last = n == path.split('/').count() - 1;
        if seg.is_empty() && !last {
            return Err(RequestError::Path("contains an empty segment (`//`)"));
        }
    }
    Ok(path)
}

/// Headers and a query parameter that web frameworks read as the method
/// to run instead of the request's own.
const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// Checks that the method decided on is the one the server will run: an
/// upper-case token (frameworks that upper-case `delete` would run a
/// DELETE a rule for `DELETE` never saw) and no method override.
pub fn plain_method(method: &http::Method, headers: &HeaderMap, query: Option<&str>) -> Result<(), String> {
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!("method `{}` is not upper case", method.as_str()));
    }
    if let Some(h) = METHOD_OVERRIDES.iter().find(|h| headers.contains_key(**h)) {
        return Err(format!("method override header `{h}` is refused"));
    }
    let overridden = query.is_some_and(|q| {
        q.split('&').any(|kv| {
            let name = kv.split('=').next().unwrap_or_default();
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            name.eq_ignore_ascii_case("_method")
        })
    });
    if overridden {
        return Err("method override parameter `_method` is refused".into());
    }
    Ok(())
}

/// Headers that belong to one hop and never cross a proxy (RFC 9110
/// 7.6.1), plus the h2c upgrade's settings.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers, and those the Connection header names.
/// `Upgrade` is kept only for a WebSocket upgrade that is being forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Names listed in Connection are hop-by-hop too, except the ones that
    // describe the content (a body without its Content-Encoding would be
    // read, and masked, as something else).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .filter(|n| !n.as_str().starts_with("content-"))
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// A transfer coding other than `chunked` in Transfer-Encoding, if any.
pub fn transfer_coding_besides_chunked(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .find(|c| !c.is_empty() && c != "chunked")
}

/// An HTTP/1.1 WebSocket upgrade request (`Connection: upgrade`,
/// `Upgrade: websocket`).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// The secrets an injection sends upstream, raw (what to look for in
/// responses and keep out of records).
pub fn injected_secrets(
    spec: HttpInjection<'_>,
    resolve: impl Fn(&crate::policy::SecretRef) -> Result<Secret, crate::credentials::CredentialError>,
) -> Result<Vec<Secret>, crate::credentials::CredentialError> {
    let r = match spec {
        HttpInjection::Bearer(r) => r,
        HttpInjection::Basic { secret, .. } => secret,
        HttpInjection::Header { token, .. } => token,
        HttpInjection::Query { token, .. } => token,
    };
    Ok(vec![resolve(r)?])
}

/// Characters escaped in an injected query value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A target's credential, resolved for a session, ready to inject.
#[derive(Clone)]
pub enum Injection {
    /// `Authorization` set to this value.
    Authorization(HeaderValue),
    Header(HeaderName, HeaderValue),
    /// Query parameter name and its escaped value.
    Query(String, String),
}

impl std::fmt::Debug for Injection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Injection::Authorization(_) => f.write_str("Injection::Authorization(<redacted>)"),
            Injection::Header(n, _) => write!(f, "Injection::Header({n}, <redacted>)"),
            Injection::Query(n, _) => write!(f, "Injection::Query({n}, <redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectionError {
    #[error("credentials: {0}")]
    Spec(String),
    #[error("credentials: {0}")]
    Resolve(#[from] crate::credentials::CredentialError),
    #[error("credentials: the secret is not a valid header value")]
    Value,
}

impl Injection {
    /// Builds the injection from the target's description and a resolver
    /// for its secrets.
    pub fn build(
        spec: HttpInjection<'_>,
        resolve: impl Fn(&crate::policy::SecretRef) -> Result<Secret, crate::credentials::CredentialError>,
    ) -> Result<Injection, InjectionError> {
        let sensitive = |s: String| {
            let mut v = HeaderValue::from_str(&s).map_err(|_| InjectionError::Value)?;
            v.set_sensitive(true);
            Ok::<_, InjectionError>(v)
        };
        Ok(match spec {
            HttpInjection::Bearer(r) => {
                Injection::Authorization(sensitive(format!("Bearer {}", resolve(r)?.expose()))?)
            }
            HttpInjection::Basic { user, secret } => {
                let pair = format!("{user}:{}", resolve(secret)?.expose());
                let enc = base64::engine::general_purpose::STANDARD.encode(pair);
                Injection::Authorization(sensitive(format!("Basic {enc}"))?)
            }
            HttpInjection::Header { name, token } => {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| InjectionError::Spec(e.to_string()))?;
                Injection::Header(name, sensitive(resolve(token)?.expose().to_string())?)
            }
            HttpInjection::Query { name, token } => {
                let value = utf8_percent_encode(resolve(token)?.expose(), QUERY_VALUE).to_string();
                Injection::Query(name.to_string(), value)
            }
        })
    }

    /// Removes any credential the caller sent in the places this injection
    /// (or a bearer/basic one) uses, then sets the target's. Returns the new
    /// path and query.
    pub fn apply(&self, headers: &mut HeaderMap, path: &str, query: Option<&str>) -> PathAndQuery {
        headers.remove(header::AUTHORIZATION);
        let mut query = query.map(Cow::Borrowed);
        match self {
            Injection::Authorization(v) => {
                headers.insert(header::AUTHORIZATION, v.clone());
            }
            Injection::Header(n, v) => {
                headers.remove(n);
                headers.insert(n.clone(), v.clone());
            }
            Injection::Query(name, value) => {
                let kept = strip_query_param(query.as_deref().unwrap_or(""), name);
                let mut q = kept;
                if !q.is_empty() {
                    q.push('&');
                }
                q.push_str(name);
                q.push('=');
                q.push_str(value);
                query = Some(Cow::Owned(q));
            }
        }
        path_and_query(path, query.as_deref())
    }
}

/// The query without any parameter called `name` (compared after
/// percent-decoding, so an escaped spelling is removed too).
pub fn strip_query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            if pair.is_empty() {
                return false;
            }
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let key = key.replace('+', " ");
            percent_decode_str(&key).decode_utf8_lossy() != name
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Bytes a query cannot carry as they are (a `#` would also end it and cut
/// off what follows, an injected credential among them): sent escaped.
const QUERY_UNSAFE: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b' ').add(b'"').add(b'#').add(b'<').add(b'>').add(b'`');

pub fn path_and_query(path: &str, query: Option<&str>) -> PathAndQuery {
    let s = match query {
        Some(q) => format!("{path}?{}", percent_encoding::utf8_percent_encode(q, QUERY_UNSAFE)),
        None => path.to_string(),
    };
    // Both parts come from a parsed URI or were escaped here.
    s.parse().unwrap_or_else(|_| PathAndQuery::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SecretRef;

    const DIALLED: (IpAddr, u16) = (IpAddr::V4(std::net::Ipv4Addr::new(127, 1, 0, 1)), 443);

    fn hosts() -> Vec<String> {
        vec!["api.example.test".into(), "*.cdn.example.test".into()]
    }

    fn check(auth: Option<&str>, host: Option<&str>, sni: Option<&str>, tls: bool) -> Result<String, RequestError> {
        let auth = auth.map(|a| a.parse::<Authority>().unwrap());
        let host = host.map(|h| HeaderValue::from_str(h).unwrap());
        check_host(auth.as_ref(), host.as_ref(), sni, tls, &hosts(), DIALLED)
    }

    #[test]
    fn host_must_agree_with_sni_and_the_target() {
        let sni = Some("api.example.test");
        assert_eq!(check(None, Some("api.example.test"), sni, true).unwrap(), "api.example.test");
        assert_eq!(check(Some("API.example.test:443"), None, sni, true).unwrap(), "api.example.test");
        assert_eq!(check(None, Some("api.example.test."), sni, true).unwrap(), "api.example.test");
        assert_eq!(check(None, Some("api.example.test"), None, true), Err(RequestError::NoSni));
        assert!(matches!(check(None, Some("other.example.test"), sni, true), Err(RequestError::NotSni { .. })));
        assert!(matches!(
            check(Some("api.example.test"), Some("evil.test"), sni, true),
            Err(RequestError::HostMismatch { .. })
        ));
        assert!(matches!(check(None, Some("api.example.test:8443"), sni, true), Err(RequestError::Port { .. })));
        assert_eq!(check(None, None, sni, true), Err(RequestError::NoHost));
        // The SNI itself must be a target host.
        assert!(matches!(check(None, Some("evil.test"), Some("evil.test"), true), Err(RequestError::UnknownHost(_))));
        assert_eq!(
            check(None, Some("a.cdn.example.test"), Some("a.cdn.example.test"), true).unwrap(),
            "a.cdn.example.test"
        );
        assert!(check(None, Some("cdn.example.test"), Some("cdn.example.test"), true).is_err());
        assert!(check(None, Some("xcdn.example.test"), Some("xcdn.example.test"), true).is_err());
        assert!(check(None, Some("user@api.example.test"), sni, true).is_err());
    }

    #[test]
    fn plain_http_checks_the_host_list_or_the_dialled_address() {
        assert!(check(None, Some("api.example.test"), None, false).is_ok());
        assert!(check(None, Some("127.1.0.1"), None, false).is_ok());
        assert!(check(None, Some("127.1.0.1:443"), None, false).is_ok());
        assert!(matches!(check(None, Some("127.1.0.2"), None, false), Err(RequestError::UnknownHost(_))));
        assert!(matches!(check(None, Some("evil.test"), None, false), Err(RequestError::UnknownHost(_))));
    }

    #[test]
    fn content_headers_stay_whatever_connection_lists() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("content-encoding, x-hop"));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get(header::CONTENT_ENCODING).unwrap(), "gzip");
        assert!(h.get("x-hop").is_none() && h.get(header::CONNECTION).is_none());
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
        assert_eq!(transfer_coding_besides_chunked(&h).as_deref(), Some("gzip"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(transfer_coding_besides_chunked(&h), None);
    }

    #[test]
    fn the_method_decided_is_the_method_run() {
        let m = |s: &str| http::Method::from_bytes(s.as_bytes()).unwrap();
        let none = HeaderMap::new();
        assert!(plain_method(&m("DELETE"), &none, Some("a=1")).is_ok());
        assert!(plain_method(&m("delete"), &none, None).unwrap_err().contains("upper case"));
        assert!(plain_method(&m("Trace"), &none, None).is_err());
        let mut h = HeaderMap::new();
        h.insert("X-HTTP-Method-Override", HeaderValue::from_static("DELETE"));
        assert!(plain_method(&m("POST"), &h, None).unwrap_err().contains("x-http-method-override"));
        assert!(plain_method(&m("POST"), &none, Some("a=1&_method=DELETE")).is_err());
        assert!(plain_method(&m("POST"), &none, Some("%5Fmethod=DELETE")).is_err());
        assert!(plain_method(&m("POST"), &none, Some("my_method=x")).is_ok());
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        let n = |p| normalise_path(p).map(|c| c.into_owned());
        assert_eq!(n("/repos/a/issues").unwrap(), "/repos/a/issues");
        assert_eq!(n("/rep%6Fs/%7euser").unwrap(), "/repos/~user");
        assert_eq!(n("/a%2fb").unwrap(), "/a%2Fb", "an escaped slash stays escaped");
        assert_eq!(n("/dir/").unwrap(), "/dir/");
        assert_eq!(n("/").unwrap(), "/");
        assert!(n("/a/../admin").is_err());
        assert!(n("/a/%2e%2e/admin").is_err());
        assert!(n("/a/%2E/admin").is_err());
        assert!(n("/./admin").is_err());
        // Behind `;parameters` or an encoded slash.
        assert!(n("/public/..;/admin/users").is_err());
        assert!(n("/public/.;x/admin").is_err());
        assert!(n("/public/..%2Fadmin%2Fusers").is_err());
        assert!(n("/public/x%2f..%2fadmin").is_err());
        assert_eq!(n("/a;v=1/b").unwrap(), "/a;v=1/b", "parameters stay");
        assert_eq!(n("/a/..x/b..;c").unwrap(), "/a/..x/b..;c", "dots inside a name are fine");
        assert!(n("//admin").is_err());
        assert!(n("/a\\..\\admin").is_err());
        assert!(n("/a%5cadmin").is_err());
        assert!(n("/a%00").is_err());
        assert!(n("/a%zz").is_err());
        assert!(n("/a%4").is_err());
        assert!(n("relative").is_err());
    }

    #[test]
    fn a_hash_in_the_query_cannot_cut_off_the_injected_credential() {
        let inj = Injection::Query("api_key".into(), "S3CRET".into());
        let pq = inj.apply(&mut HeaderMap::new(), "/kkk", Some("a=1#b"));
        assert_eq!(pq.query(), Some("a=1%23b&api_key=S3CRET"));
    }

    #[test]
    fn control_characters_are_refused_not_rewritten() {
        assert!(normalise_path("/v1rc\u{8}\0h").is_err());
        assert!(normalise_path("/a%41\u{7f}").is_err());
        assert!(normalise_path("/a b").is_err());
        assert!(normalise_path("/a#b").is_err());
        assert!(normalise_path("/a?b").is_err());
        assert_eq!(normalise_path("/a%23b%3F").unwrap(), "/a%23b%3F");
    }

    #[test]
    fn utf8_after_an_escape_is_kept_whole() {
        assert_eq!(normalise_path("/a%20\u{50f}b").unwrap(), "/a%20\u{50f}b");
        assert_eq!(normalise_path("/%41\u{e9}").unwrap(), "/A\u{e9}");
    }

    #[test]
    fn a_signed_escape_is_broken_not_decoded() {
        // Found by fuzzing: `%+2` was read as the escape of 0x02.
        assert!(normalise_path("/%+22").is_err());
        assert!(normalise_path("/a%-1b").is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("http2-settings", HeaderValue::from_static("AAA"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic eA=="));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_websocket_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_websocket_upgrade(&h), "Upgrade without Connection: upgrade");
    }

    fn resolve(_: &SecretRef) -> Result<Secret, crate::credentials::CredentialError> {
        Ok(Secret::new("s3cr&t"))
    }

    #[test]
    fn injection_replaces_what_the_caller_sent() {
        let token = SecretRef::Env("T".into());
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer caller"));
        let inj = Injection::build(HttpInjection::Bearer(&token), resolve).unwrap();
        let pq = inj.apply(&mut h, "/x", Some("a=1"));
        assert_eq!(pq.as_str(), "/x?a=1");
        assert_eq!(h.get_all(header::AUTHORIZATION).iter().count(), 1);
        assert_eq!(h.get(header::AUTHORIZATION).unwrap(), "Bearer s3cr&t");
        assert!(h.get(header::AUTHORIZATION).unwrap().is_sensitive());

        let mut h = HeaderMap::new();
        let inj = Injection::build(HttpInjection::Basic { user: "bot", secret: &token }, resolve).unwrap();
        inj.apply(&mut h, "/", None);
        assert_eq!(h.get(header::AUTHORIZATION).unwrap(), "Basic Ym90OnMzY3ImdA==");

        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("caller"));
        h.append("x-api-key", HeaderValue::from_static("caller2"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("token caller"));
        let inj = Injection::build(HttpInjection::Header { name: "X-Api-Key", token: &token }, resolve).unwrap();
        inj.apply(&mut h, "/", None);
        assert_eq!(h.get_all("x-api-key").iter().collect::<Vec<_>>(), vec!["s3cr&t"]);
        assert!(!h.contains_key(header::AUTHORIZATION), "the caller's Authorization is stripped too");

        let mut h = HeaderMap::new();
        let inj = Injection::build(HttpInjection::Query { name: "api_key", token: &token }, resolve).unwrap();
        let pq = inj.apply(&mut h, "/v1/x", Some("api_key=caller&b=2&%61pi_key=sneaky&api_key"));
        assert_eq!(pq.as_str(), "/v1/x?b=2&api_key=s3cr%26t");
        let pq = inj.apply(&mut h, "/v1/x", None);
        assert_eq!(pq.as_str(), "/v1/x?api_key=s3cr%26t");
        assert!(!format!("{inj:?}").contains("s3cr"), "injections never print their secret");
    }
}
