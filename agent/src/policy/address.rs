//! Address syntax of the policy: `ip:port`, `[v6]:port`, `cidr:port`,
//! `[v6cidr]:port`, `host:port` (resolved at load), `*` for any address and
//! `*` for any port, and for egress exceptions an optional `/tcp` or `/udp`.
use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    sync::atomic::{AtomicBool, Ordering},
};

use ipnet::IpNet;

use super::model::{AddrPattern, Transport, Upstream};

static RESOLVE: AtomicBool = AtomicBool::new(true);

/// Turns host name resolution off for this process: host names in a policy
/// then fail to load instead of being looked up (for fuzzing the loader,
/// which must not send arbitrary names to a resolver).
#[doc(hidden)]
pub fn disable_name_resolution() {
    RESOLVE.store(false, Ordering::Relaxed);
}

/// Parses a target or exception address into one or more patterns (a host
/// name may resolve to several addresses; `*` is both families).
pub fn parse_patterns(text: &str) -> Result<Vec<AddrPattern>, String> {
    let text = text.trim();
    if text == "*" {
        return Ok(vec![any(IpNet::V4(Default::default()), None, text), any_v6(None, text)]);
    }
    let (host, port) = split_host_port(text)?;
    let port = parse_port(port)?;
    if host == "*" {
        return Ok(vec![any(IpNet::V4(Default::default()), port, text), any_v6(port, text)]);
    }
    if let Ok(net) = host.parse::<IpNet>() {
        return Ok(vec![AddrPattern { net: canonical_net(net), port, text: text.to_string() }]);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![AddrPattern { net: IpNet::from(ip.to_canonical()), port, text: text.to_string() }]);
    }
    if host.contains('/') {
        return Err(format!("`{host}` is not a valid network (CIDR)"));
    }
    validate_hostname(host)?;
    let Some(port_num) = port else {
        return Err(format!("host name `{host}` needs an explicit port"));
    };
    if !RESOLVE.load(Ordering::Relaxed) {
        return Err(format!("cannot resolve `{host}`: name resolution is turned off"));
    }
    let addrs: Vec<SocketAddr> =
        (host, port_num).to_socket_addrs().map_err(|e| format!("cannot resolve `{host}`: {e}"))?.collect();
    if addrs.is_empty() {
        return Err(format!("`{host}` resolves to no address"));
    }
    let mut out: Vec<AddrPattern> = Vec::new();
    for a in addrs {
        let p = AddrPattern { net: IpNet::from(a.ip().to_canonical()), port, text: text.to_string() };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// An egress exception: an address pattern with an optional `/tcp` or `/udp`.
pub fn parse_exception(text: &str) -> Result<(Vec<AddrPattern>, Vec<Transport>), String> {
    let text = text.trim();
    let (addr, transports) = if let Some(a) = text.strip_suffix("/udp") {
        (a, vec![Transport::Udp])
    } else if let Some(a) = text.strip_suffix("/tcp") {
        (a, vec![Transport::Tcp])
    } else {
        (text, vec![])
    };
    // A bare address or network (no port) means any port.
    let patterns = if addr.parse::<IpNet>().is_ok() || addr.parse::<IpAddr>().is_ok() {
        let net = addr
            .parse::<IpNet>()
            .map(canonical_net)
            .unwrap_or_else(|_| IpNet::from(addr.parse::<IpAddr>().expect("checked").to_canonical()));
        vec![AddrPattern { net, port: None, text: text.to_string() }]
    } else {
        parse_patterns(addr)?
    };
    Ok((patterns, transports))
}

/// `host:port` or `ip:port` for an upstream.
pub fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let (host, port) = split_host_port(text.trim())?;
    let Some(port) = parse_port(port)? else {
        return Err("an upstream needs a port, not `*`".into());
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Upstream::Addr(SocketAddr::new(ip.to_canonical(), port)));
    }
    validate_hostname(host)?;
    Ok(Upstream::Host { host: host.to_string(), port })
}

fn split_host_port(text: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(format!("`{text}`: missing `]`"));
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!("`{text}`: expected `:port` after `]`"));
        };
        return Ok((host, port));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("`{text}`: expected address:port"));
    };
    if host.contains(':') {
        return Err(format!("`{text}`: write IPv6 addresses in brackets, as `[::1]:5432`"));
    }
    if host.is_empty() {
        return Err(format!("`{text}`: missing address"));
    }
    Ok((host, port))
}

fn parse_port(p: &str) -> Result<Option<u16>, String> {
    if p == "*" {
        return Ok(None);
    }
    match p.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid destination; use `*` for any port".into()),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(format!("`{p}` is not a port (1-65535 or `*`)")),
    }
}

fn validate_hostname(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is neither an IP address, a network, nor a host name"))
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    // Mapped IPv6 networks are IPv4 networks in disguise.
    if let IpNet::V6(n) = net {
        if let Some(v4) = n.network().to_ipv4_mapped() {
            if n.prefix_len() >= 96 {
                return IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96).expect("valid prefix");
            }
        }
    }
    net.trunc()
}

fn any(net: IpNet, port: Option<u16>, text: &str) -> AddrPattern {
    AddrPattern { net, port, text: text.to_string() }
}

fn any_v6(port: Option<u16>, text: &str) -> AddrPattern {
    AddrPattern { net: "::/0".parse().expect("valid"), port, text: text.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_port() {
        let p = parse_patterns("127.0.0.53:5432").unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].port, Some(5432));
        assert!(p[0].matches("127.0.0.53".parse().unwrap(), 5432));
        assert!(!p[0].matches("127.0.0.54".parse().unwrap(), 5432));
        assert!(!p[0].matches("127.0.0.53".parse().unwrap(), 5433));
        // The v4-mapped form of the same address matches too.
        assert!(p[0].matches("::ffff:127.0.0.53".parse().unwrap(), 5432));
        assert_eq!(p[0].mapped_prefix_len(), 128);
    }

    #[test]
    fn ipv6_cidr_and_any_port() {
        let p = parse_patterns("[::1]:*").unwrap();
        assert_eq!(p[0].port, None);
        assert!(p[0].matches("::1".parse().unwrap(), 1));
        let p = parse_patterns("127.0.0.0/8:443").unwrap();
        assert!(p[0].matches("127.9.9.9".parse().unwrap(), 443));
        assert_eq!(p[0].mapped_prefix_len(), 104);
        let p = parse_patterns("[::ffff:127.0.0.0/104]:443").unwrap();
        assert_eq!(p[0].net, "127.0.0.0/8".parse::<IpNet>().unwrap());
    }

    #[test]
    fn wildcard_covers_both_families() {
        let p = parse_patterns("*").unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().any(|x| x.matches("10.1.2.3".parse().unwrap(), 80)));
        assert!(p.iter().any(|x| x.matches("2001:db8::1".parse().unwrap(), 80)));
    }

    #[test]
    fn bad_addresses_are_refused_with_a_reason() {
        assert!(parse_patterns("127.0.0.1").unwrap_err().contains("address:port"));
        assert!(parse_patterns("::1:5432").unwrap_err().contains("brackets"));
        assert!(parse_patterns("127.0.0.1:99999").unwrap_err().contains("not a port"));
        assert!(parse_patterns("127.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(parse_patterns("300.1.1.1/8:1").unwrap_err().contains("CIDR"));
        assert!(parse_patterns("bad_host!:1").unwrap_err().contains("neither"));
    }

    #[test]
    fn host_names_resolve_at_load() {
        let p = parse_patterns("localhost:8080").unwrap();
        assert!(p.iter().any(|x| x.net.addr().is_loopback()));
    }

    #[test]
    fn exceptions_take_a_transport() {
        let (p, t) = parse_exception("127.0.0.53:53/udp").unwrap();
        assert_eq!(t, vec![Transport::Udp]);
        assert_eq!(p[0].port, Some(53));
        let (p, t) = parse_exception("127.0.0.0/8").unwrap();
        assert!(t.is_empty());
        assert_eq!(p[0].port, None);
    }

    #[test]
    fn upstreams() {
        assert_eq!(parse_upstream("127.0.0.1:5432").unwrap(), Upstream::Addr("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(
            parse_upstream("db.internal:5432").unwrap(),
            Upstream::Host { host: "db.internal".into(), port: 5432 }
        );
        assert!(parse_upstream("db:*").is_err());
    }
}
