//! Opens N connections to one address at once, keeps them all open, then
//! sends a line on each and checks the echo; prints a JSON summary.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn main() {
    let addr: SocketAddr = std::env::args().nth(1).expect("usage: many-conns ADDR N").parse().expect("address");
    let n: usize = std::env::args().nth(2).and_then(|v| v.parse().ok()).unwrap_or(1000);
    raise_nofile();
    let mut conns = Vec::with_capacity(n);
    let mut connect_errors = Vec::new();
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => conns.push(s),
            Err(e) => connect_errors.push(e.to_string()),
        }
    }
    let mut ok = 0;
    let mut echo_errors = Vec::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let msg = format!("conn-{i}");
        if let Err(e) = s.write_all(format!("{msg}\n").as_bytes()) {
            echo_errors.push(e.to_string());
            continue;
        }
        let mut line = String::new();
        match BufReader::new(&*s).read_line(&mut line) {
            Ok(_) if line.trim_end() == format!("echo:{msg}") => ok += 1,
            Ok(_) => echo_errors.push(format!("bad echo {line:?}")),
            Err(e) => echo_errors.push(e.to_string()),
        }
    }
    connect_errors.truncate(5);
    echo_errors.truncate(5);
    println!(
        "{}",
        serde_json::json!({"opened": conns.len(), "echoed": ok, "connect_errors": connect_errors, "echo_errors": echo_errors})
    );
}

fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain get/setrlimit on our own process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
