//! Benchmarks. Each compares the same work direct and through portcullis
//! (and through the tool a user would otherwise pick) in one run, and prints
//! ratios to direct.
use anyhow::{bail, Result};

mod postgres;

pub fn run(which: &str) -> Result<()> {
    const ALL: &[&str] = &["postgres"];
    match which {
        "all" => {
            for b in ALL {
                run(b)?;
            }
            Ok(())
        }
        "postgres" => postgres::run(),
        other => bail!("unknown benchmark `{other}` (available: {})", ALL.join(", ")),
    }
}
