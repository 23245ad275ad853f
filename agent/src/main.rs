use clap::Parser;
use portcullis::cli::{dispatch, Cli};
use tracing_subscriber::EnvFilter;

// Many small, short-lived allocations cross threads (audit records are made
// on the workers and freed by the writer); mimalloc keeps those off glibc's
// arena locks.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async {
        match dispatch(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("portcullis: {e:#}");
                1
            }
        }
    });
    std::process::exit(code);
}
