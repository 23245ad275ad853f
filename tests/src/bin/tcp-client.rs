//! A minimal TCP/UDP client for the end-to-end tests, run inside guarded
//! cgroups: connects, optionally sends a line and reads the reply, and prints
//! what happened as one JSON object (including the peer address the socket
//! reports, which the kernel programs rewrite).
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("tcp");
    let addr: SocketAddr = args.get(2).expect("usage: tcp-client tcp|udp ADDR [MESSAGE]").parse().expect("address");
    let msg = args.get(3).cloned();
    let out = match mode {
        "udp" => udp(addr, msg.as_deref().unwrap_or("ping")),
        "line" => line(addr, msg.as_deref().unwrap_or("ping")),
        "interactive" => interactive(addr),
        "loop" => repeat(addr, msg.as_deref().and_then(|m| m.parse().ok()).unwrap_or(100)),
        "raw" => raw(addr),
        _ => tcp(addr, msg.as_deref()),
    };
    println!("{out}");
}

fn tcp(addr: SocketAddr, msg: Option<&str>) -> serde_json::Value {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"connected": false, "error": e.to_string(), "errno": e.raw_os_error()}),
    };
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reply = String::new();
    let mut error = None;
    if let Some(m) = msg {
        if let Err(e) = s.write_all(m.as_bytes()) {
            error = Some(e.to_string());
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => reply = String::from_utf8_lossy(&buf).into_owned(),
            Err(e) => error = Some(e.to_string()),
        }
    }
    serde_json::json!({"connected": true, "peer": peer, "reply": reply, "error": error})
}

/// Sends one line and reads one line back without half-closing first (a
/// caller that keeps its connection open while it waits).
fn line(addr: SocketAddr, msg: &str) -> serde_json::Value {
    use std::io::BufRead;
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"connected": false, "error": e.to_string(), "errno": e.raw_os_error()}),
    };
    let timeout = std::env::var("TCP_CLIENT_TIMEOUT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let _ = s.set_read_timeout(Some(Duration::from_secs(timeout)));
    if let Err(e) = s.write_all(format!("{msg}\n").as_bytes()) {
        return serde_json::json!({"connected": true, "reply": "", "error": e.to_string()});
    }
    let mut reply = String::new();
    let r = std::io::BufReader::new(&s).read_line(&mut reply);
    serde_json::json!({"connected": true, "reply": reply.trim_end(), "error": r.err().map(|e| e.to_string())})
}

/// One connection, kept open: each stdin line is sent and the reply line
/// printed as JSON, until stdin ends or the connection fails.
fn interactive(addr: SocketAddr) -> serde_json::Value {
    use std::io::BufRead;
    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"connected": false, "error": e.to_string()}),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    println!("{}", serde_json::json!({"connected": true}));
    for msg in std::io::stdin().lock().lines().map_while(Result::ok) {
        let sent = w.write_all(format!("{msg}\n").as_bytes());
        let mut reply = String::new();
        let read = r.read_line(&mut reply);
        let closed = matches!(read, Ok(0)) || read.is_err() || sent.is_err();
        println!("{}", serde_json::json!({"reply": reply.trim_end(), "closed": closed}));
        if closed {
            break;
        }
    }
    serde_json::json!({"done": true})
}

/// `n` sequential connections, each one line echoed; counts what happened.
fn repeat(addr: SocketAddr, n: usize) -> serde_json::Value {
    use std::io::BufRead;
    let (mut ok, mut refused, mut broken) = (0, 0, 0);
    for i in 0..n {
        let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(_) => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut w = &s;
        let mut line = String::new();
        let good = w.write_all(format!("n{i}\n").as_bytes()).is_ok()
            && std::io::BufReader::new(&s).read_line(&mut line).is_ok()
            && line.trim_end() == format!("echo:n{i}");
        if good {
            ok += 1;
        } else {
            broken += 1;
        }
    }
    serde_json::json!({"ok": ok, "refused": refused, "broken": broken})
}

fn udp(addr: SocketAddr, msg: &str) -> serde_json::Value {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind).expect("bind");
    match s.send_to(msg.as_bytes(), addr) {
        Ok(_) => serde_json::json!({"sent": true}),
        Err(e) => serde_json::json!({"sent": false, "error": e.to_string(), "errno": e.raw_os_error()}),
    }
}

/// A raw ICMP socket, and an echo request sent with it to `addr` (no
/// connect, no UDP: what the egress programs never see).
fn raw(addr: SocketAddr) -> serde_json::Value {
    let (family, proto, ty) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
        SocketAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
    };
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, proto) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return serde_json::json!({"created": false, "error": e.to_string(), "errno": e.raw_os_error()});
    }
    // An echo request (the kernel fills the ICMPv6 checksum; for ICMP a
    // zero-payload header's checksum is computed here).
    let mut pkt = [ty, 0, 0, 0, 0, 1, 0, 1];
    if family == libc::AF_INET {
        let sum: u32 = pkt.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum();
        let sum = !(((sum >> 16) + (sum & 0xffff)) as u16);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let sa = socket2_addr(addr);
    // SAFETY: pkt and sa outlive the call; the length is sa's own.
    let n = unsafe { libc::sendto(fd, pkt.as_ptr().cast(), pkt.len(), 0, sa.0.as_ptr().cast(), sa.1) };
    let sent = n == pkt.len() as isize;
    let error = (!sent).then(|| std::io::Error::last_os_error().to_string());
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    serde_json::json!({"created": true, "sent": sent, "error": error})
}

/// `addr` as a sockaddr_in/sockaddr_in6 in a byte buffer, with its length.
fn socket2_addr(addr: SocketAddr) -> (Vec<u8>, libc::socklen_t) {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in is plain data.
            let bytes = unsafe {
                std::slice::from_raw_parts((&sin as *const libc::sockaddr_in).cast::<u8>(), size_of_val(&sin))
            };
            (bytes.to_vec(), size_of_val(&sin) as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 is plain data.
            let bytes = unsafe {
                std::slice::from_raw_parts((&sin6 as *const libc::sockaddr_in6).cast::<u8>(), size_of_val(&sin6))
            };
            (bytes.to_vec(), size_of_val(&sin6) as libc::socklen_t)
        }
    }
}
