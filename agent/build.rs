//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so the
//! `portcullis` binary is self-contained. Without it (a plain `cargo build`
//! on a fresh checkout) the binary still builds, and `portcullis run`
//! explains how to build the probes.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("portcullis.bpf.o");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let src = env::var_os("PORTCULLIS_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../ebpf/target/bpfel-unknown-none/release/portcullis-ebpf"));
    println!("cargo:rerun-if-env-changed=PORTCULLIS_BPF_OBJECT");
    println!("cargo:rerun-if-changed={}", src.display());
    match fs::read(&src) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded object"),
        Err(_) => {
            println!("cargo:warning=eBPF object {} not found; run `cargo xtask build-ebpf` first", src.display());
            fs::write(&out, []).expect("write empty object");
        }
    }
}
