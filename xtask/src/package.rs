//! `cargo xtask package`: a Debian package of portcullis, built with
//! `dpkg-deb` from a staged tree:
//!
//! | path | what |
//! | --- | --- |
//! | `/usr/bin/portcullis` | the agent, eBPF object embedded |
//! | `/lib/systemd/system/portcullis.service` | the hardened `Type=notify` unit |
//! | `/lib/systemd/system/portcullis.slice` | the slice for guarded workloads |
//! | `/etc/portcullis/policy.toml` | the default policy (a conffile) |
//! | `/usr/share/man/man1/portcullis*.1.gz` | man pages (clap_mangen) |
//! | `/usr/share/bash-completion/completions/portcullis`, zsh, fish | completions (clap_complete) |
//! | `/usr/share/doc/portcullis/` | copyright, README, the example drop-in |
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{root, run};

pub struct Options {
    /// Package this binary instead of building a release one.
    pub binary: Option<PathBuf>,
    pub out: PathBuf,
}

/// Builds the package; returns the path of the `.deb`.
pub fn package(opts: &Options) -> Result<PathBuf> {
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => {
            crate::setup(false)?;
            crate::build_ebpf()?;
            crate::cargo(&["build", "--release", "-p", "portcullis"])?;
            root().join("target/release/portcullis")
        }
    };
    if !binary.is_file() {
        bail!("{} does not exist", binary.display());
    }
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let name = format!("portcullis_{version}_{arch}");
    fs::create_dir_all(&opts.out)?;
    let out = fs::canonicalize(&opts.out)?;
    let stage = out.join(format!(".stage-{name}"));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let pkg = root().join("packaging");

    install(&binary, &stage.join("usr/bin/portcullis"), 0o755)?;
    // As Debian packages do: no debug sections in the installed binary.
    run(Command::new("strip").arg("--strip-debug").arg(stage.join("usr/bin/portcullis")))?;
    for unit in ["portcullis.service", "portcullis.slice"] {
        install(&pkg.join(unit), &stage.join("lib/systemd/system").join(unit), 0o644)?;
    }
    install(&pkg.join("policy.toml"), &stage.join("etc/portcullis/policy.toml"), 0o644)?;
    let doc = stage.join("usr/share/doc/portcullis");
    install(&pkg.join("guard-unit.conf"), &doc.join("examples/guard-unit.conf"), 0o644)?;
    install(&root().join("README.md"), &doc.join("README.md"), 0o644)?;
    write(&doc.join("copyright"), COPYRIGHT, 0o644)?;

    // Completions and man pages come from the binary's own command line.
    let bin = stage.join("usr/bin/portcullis");
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/portcullis"),
        ("zsh", "usr/share/zsh/vendor-completions/_portcullis"),
        ("fish", "usr/share/fish/vendor_completions.d/portcullis.fish"),
    ] {
        let script = Command::new(&bin).args(["completions", shell]).output().context("running portcullis")?;
        if !script.status.success() || script.stdout.is_empty() {
            bail!("`portcullis completions {shell}` failed: {}", String::from_utf8_lossy(&script.stderr));
        }
        write(&stage.join(path), &String::from_utf8(script.stdout)?, 0o644)?;
    }
    let man = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    run(Command::new(&bin).arg("manpages").arg(&man))?;
    for page in fs::read_dir(&man)? {
        let page = page?.path();
        run(Command::new("gzip").args(["-9n", "--force"]).arg(&page))?;
        fs::set_permissions(page.with_extension("1.gz"), fs::Permissions::from_mode(0o644))?;
    }

    let debian = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(&pkg.join(script), &debian.join(script), 0o755)?;
    }
    write(&debian.join("conffiles"), "/etc/portcullis/policy.toml\n", 0o644)?;
    let depends = shlib_depends(&binary).unwrap_or_else(|e| {
        eprintln!("dpkg-shlibdeps failed ({e:#}); falling back to libc6 (>= 2.34)");
        "libc6 (>= 2.34)".into()
    });
    let size_kb = du_kb(&stage)?;
    let control = format!(
        "Package: portcullis\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: portcullis maintainers <portcullis@localhost>\n\
         Installed-Size: {size_kb}\n\
         Depends: {depends}\n\
         Recommends: ca-certificates\n\
         Section: admin\n\
         Priority: optional\n\
         Description: role-based access control between AI coding agents and the systems they touch\n \
         eBPF cgroup programs steer the TCP connections of processes in guarded systemd\n \
         units to a local enforcer, which decides each request from the caller's role,\n \
         forwards it with credentials the caller never sees, and records everything.\n"
    );
    write(&debian.join("control"), &control, 0o644)?;

    let deb = out.join(format!("{name}.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    fs::remove_dir_all(&stage)?;
    eprintln!("built {}", deb.display());
    Ok(deb)
}

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: portcullis\n\n\
Files: *\n\
License: Apache-2.0\n \
On Debian systems the full text of the Apache License 2.0 is in\n \
/usr/share/common-licenses/Apache-2.0.\n";

fn install(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    if let Some(d) = dst.parent() {
        fs::create_dir_all(d)?;
    }
    fs::copy(src, dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(dst: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(d) = dst.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(dst, text)?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The shared-library dependencies of the binary, as dpkg computes them.
fn shlib_depends(binary: &Path) -> Result<String> {
    let tmp = std::env::temp_dir().join(format!("portcullis-shlibdeps-{}", std::process::id()));
    fs::create_dir_all(tmp.join("debian"))?;
    fs::write(tmp.join("debian/control"), "Source: portcullis\n\nPackage: portcullis\nArchitecture: any\n")?;
    let binary = fs::canonicalize(binary)?;
    let res = output(Command::new("dpkg-shlibdeps").current_dir(&tmp).arg("-O").arg(format!("-e{}", binary.display())));
    let _ = fs::remove_dir_all(&tmp);
    let line = res?;
    let deps = line.strip_prefix("shlibs:Depends=").with_context(|| format!("unexpected output: {line}"))?;
    Ok(deps.to_string())
}

fn du_kb(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                if e.file_name() != "DEBIAN" {
                    stack.push(e.path());
                }
            } else {
                total += m.len().div_ceil(1024);
            }
        }
    }
    Ok(total)
}
