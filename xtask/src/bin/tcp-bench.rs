//! Load generator and upstream server for `cargo xtask bench tcp`.
//!
//! `serve ADDR` runs the upstream: each connection opens with a one-byte mode
//! and an 8-byte big-endian parameter, then
//! - `E`: echo everything back until the client's half-close;
//! - `S`: sink: read until the client's half-close, answer the byte count;
//! - `D`: source: send `param` bytes, then half-close.
//!
//! The other subcommands are the load, run against the server directly or
//! through a relay (portcullis, haproxy); each prints one line of
//! `key=value` pairs for the bench to read. They check what they get back
//! (byte counts, echoed contents), so a relay that loses or reorders bytes
//! fails the benchmark instead of looking fast.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};

const CHUNK: usize = 256 * 1024;

#[derive(Parser)]
#[command(name = "tcp-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the upstream server; prints `listening=ADDR` once bound.
    Serve { addr: SocketAddr },
    /// Request/response round trips: `size` bytes out, the same back.
    Rr {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
    },
    /// Bulk transfer on one connection, `up` (client to server) or `down`.
    Bulk {
        addr: SocketAddr,
        #[arg(long)]
        dir: String,
        #[arg(long)]
        bytes: u64,
    },
    /// New connection, then one small round trip, `count` times in a row.
    Setup {
        addr: SocketAddr,
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    /// connect() latency to a listener of its own on 127.0.0.1.
    Connect {
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { addr } => serve(addr),
        Cmd::Rr { addr, conns, size, secs } => rr(addr, conns, size, Duration::from_secs_f64(secs)),
        Cmd::Bulk { addr, dir, bytes } => bulk(addr, &dir, bytes),
        Cmd::Setup { addr, count } => setup(addr, count),
        Cmd::Connect { count } => connect(count),
    }
}

fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening={}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            if let Err(e) = serve_one(stream) {
                // Clients that only connect and close are expected.
                if !matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) {
                    eprintln!("tcp-bench serve: {e}");
                }
            }
        });
    }
    Ok(())
}

fn serve_one(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let param = u64::from_be_bytes(head[1..].try_into().expect("8 bytes"));
    let mut buf = vec![0u8; CHUNK];
    match head[0] {
        b'E' => loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        },
        b'S' => {
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes())
        }
        b'D' => {
            let mut left = param;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)
        }
        m => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown mode {m}"))),
    }
}

fn open(addr: SocketAddr, mode: u8, param: u64) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = [0u8; 9];
    head[0] = mode;
    head[1..].copy_from_slice(&param.to_be_bytes());
    s.write_all(&head)?;
    Ok(s)
}

/// One round trip: `out` goes out, the same bytes must come back.
fn round_trip(s: &mut TcpStream, out: &[u8], back: &mut [u8]) -> Result<()> {
    s.write_all(out)?;
    s.read_exact(back).context("echo cut short")?;
    ensure!(out == back, "echo came back different");
    Ok(())
}

fn rr(addr: SocketAddr, conns: usize, size: usize, secs: Duration) -> Result<()> {
    ensure!(conns > 0 && size > 0, "conns and size must be positive");
    // Every connection is open and has done one round trip (set-up costs
    // stay out of the figure) before the clock starts.
    let start = Arc::new(Barrier::new(conns + 1));
    let mut workers = Vec::new();
    for c in 0..conns {
        let start = start.clone();
        let mut s = open(addr, b'E', 0)?;
        workers.push(thread::spawn(move || -> Result<(Vec<u32>, Duration)> {
            let out: Vec<u8> = (0..size).map(|i| (i + c) as u8).collect();
            let mut back = vec![0u8; size];
            round_trip(&mut s, &out, &mut back)?;
            start.wait();
            let t0 = Instant::now();
            let mut lat = Vec::with_capacity(1 << 16);
            loop {
                let t = Instant::now();
                round_trip(&mut s, &out, &mut back)?;
                let now = Instant::now();
                lat.push((now - t).as_nanos().min(u32::MAX as u128) as u32);
                if now - t0 >= secs {
                    return Ok((lat, now - t0));
                }
            }
        }));
    }
    start.wait();
    let mut all = Vec::new();
    let mut elapsed = Duration::ZERO;
    for w in workers {
        let (lat, took) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        all.extend(lat);
        elapsed = elapsed.max(took);
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize];
    println!("count={} secs={:.6} p50_ns={} p99_ns={}", all.len(), elapsed.as_secs_f64(), pct(0.50), pct(0.99));
    Ok(())
}

fn bulk(addr: SocketAddr, dir: &str, bytes: u64) -> Result<()> {
    let buf = vec![0x5au8; CHUNK];
    let (moved, took) = match dir {
        "up" => {
            let mut s = open(addr, b'S', 0)?;
            let t0 = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            // The half-close travels through the relay; the server's count
            // arrives only after every byte did.
            s.shutdown(Shutdown::Write)?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count).context("no byte count from the server")?;
            (u64::from_be_bytes(count), t0.elapsed())
        }
        "down" => {
            let mut s = open(addr, b'D', bytes)?;
            let mut buf = buf;
            let t0 = Instant::now();
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            (total, t0.elapsed())
        }
        other => bail!("--dir is up or down, not {other}"),
    };
    ensure!(moved == bytes, "moved {moved} bytes of {bytes}");
    println!("bytes={moved} secs={:.6}", took.as_secs_f64());
    Ok(())
}

fn setup(addr: SocketAddr, count: usize) -> Result<()> {
    let mut lat = Vec::with_capacity(count);
    let out = [0x42u8; 16];
    let mut back = [0u8; 16];
    for _ in 0..count {
        let t = Instant::now();
        let mut s = open(addr, b'E', 0)?;
        round_trip(&mut s, &out, &mut back)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    println!("count={count} p50_ns={} p99_ns={}", lat[count / 2], lat[(count - 1) * 99 / 100]);
    Ok(())
}

fn connect(count: usize) -> Result<()> {
    ensure!(count > 0, "count must be positive");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        lat.push(t.elapsed().as_nanos() as u64);
        drop(s);
    }
    lat.sort_unstable();
    println!("count={count} p50_ns={} p99_ns={}", lat[count / 2], lat[(count - 1) * 99 / 100]);
    Ok(())
}
