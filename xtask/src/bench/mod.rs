//! Benchmarks. Each compares the same work direct and through portcullis
//! (and through the tool a user would otherwise pick) in one run, and prints
//! ratios to direct.
use anyhow::{bail, Result};

mod audit;
mod http;
mod masking;
mod postgres;
pub mod soak;
mod support;
mod tcp;

pub fn run(which: &str) -> Result<()> {
    const ALL: &[&str] = &["tcp", "postgres", "http", "audit", "masking"];
    match which {
        "all" => {
            for b in ALL {
                run(b)?;
            }
            Ok(())
        }
        "audit" => audit::run(),
        "tcp" => tcp::run(),
        "http" => http::run(),
        "masking" => masking::run(),
        "postgres" => postgres::run(),
        other => bail!("unknown benchmark `{other}` (available: {})", ALL.join(", ")),
    }
}
