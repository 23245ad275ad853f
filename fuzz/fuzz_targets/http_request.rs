//! What the HTTP module checks in a request head before the policy sees it:
//! the path's normal form, the host check (Host, :authority, SNI, target
//! hosts), hop-by-hop header stripping and query credential injection.
//!
//! Invariants: no panic; a normalised path means the same bytes as the raw
//! one, is its own normal form and has no `.`/`..` segment; an accepted
//! host is the dialled address or one of the target's hosts (and the SNI
//! under TLS); after injection the query carries the credential parameter
//! exactly once, whatever the caller sent.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::{header, uri::Authority, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;
use portcullis::protocols::http::request::{
    check_host, host_matches, normalise_host, normalise_path, strip_hop_by_hop, Injection,
};

fn path(raw: &str) {
    let Ok(p) = normalise_path(raw) else { return };
    if p == "*" {
        return;
    }
    assert_eq!(
        percent_decode_str(&p).collect::<Vec<u8>>(),
        percent_decode_str(raw).collect::<Vec<u8>>(),
        "normalising changed what {raw:?} means: {p:?}"
    );
    assert_eq!(normalise_path(&p).as_deref(), Ok(&*p), "not a normal form: {raw:?} -> {p:?}");
    for seg in p.split('/') {
        assert!(seg != "." && seg != "..", "{raw:?} -> {p:?}");
    }
}

fn host(fields: &[&str], tls: bool) {
    let [authority, host_header, sni, hosts @ ..] = fields else { return };
    let authority = (!authority.is_empty()).then(|| authority.parse::<Authority>().ok()).flatten();
    let host_header = (!host_header.is_empty()).then(|| HeaderValue::from_str(host_header).ok()).flatten();
    let sni = (!sni.is_empty()).then_some(*sni);
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let dialled = (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), 443);
    if let Ok(h) = check_host(authority.as_ref(), host_header.as_ref(), sni, tls, &hosts, dialled) {
        let is_dialled = h.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical() == dialled.0);
        assert!(is_dialled || hosts.iter().any(|p| host_matches(p, &h)), "{h:?} accepted for {hosts:?}");
        if tls {
            assert_eq!(normalise_host(sni.expect("TLS needs an SNI")), h);
        }
    }
}

fn headers(fields: &[&str]) {
    let mut map = HeaderMap::new();
    for f in fields {
        let (n, v) = f.split_once(':').unwrap_or((f, ""));
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.trim().as_bytes()), HeaderValue::from_str(v.trim())) {
            map.append(n, v);
        }
    }
    let upgrade = fields.len() % 2 == 0;
    strip_hop_by_hop(&mut map, upgrade);
    for n in [header::TRANSFER_ENCODING, header::TE, header::TRAILER, header::PROXY_AUTHORIZATION] {
        assert!(!map.contains_key(&n));
    }
    if !upgrade {
        assert!(!map.contains_key(header::UPGRADE) && !map.contains_key(header::CONNECTION));
    }
}

fn query(path: &str, query: &str) {
    const NAME: &str = "api_key";
    let injection = Injection::Query(NAME.into(), "S3CRET".into());
    let mut map = HeaderMap::new();
    map.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer caller"));
    let Ok(p) = normalise_path(path) else { return };
    if p == "*" || query.parse::<http::uri::PathAndQuery>().is_err() {
        return;
    }
    let pq = injection.apply(&mut map, &p, Some(query));
    assert!(!map.contains_key(header::AUTHORIZATION));
    let q = pq.query().unwrap_or_else(|| panic!("no query after injection into {path:?} ? {query:?}: {pq}"));
    let named: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k).replace('+', " ");
            percent_decode_str(&key).decode_utf8_lossy() == NAME
        })
        .collect();
    assert_eq!(named, [format!("{NAME}=S3CRET")], "{path:?} ? {query:?} -> {pq}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let fields: Vec<&str> = text.split('\n').collect();
    match mode % 5 {
        0 => path(text),
        1 => host(&fields, false),
        2 => host(&fields, true),
        3 => headers(&fields),
        _ => query(fields[0], fields.get(1).copied().unwrap_or("")),
    }
});
