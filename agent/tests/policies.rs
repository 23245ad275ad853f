//! Every example in `policies/` must pass `portcullis policy check`, and a
//! broken file must be refused with its line, column and reason.
use std::{path::Path, process::Command};

fn portcullis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
}

#[test]
fn example_policies_pass_policy_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "policies/ holds at least three examples");
    for f in files {
        let out = portcullis().args(["policy", "check"]).arg(&f).output().unwrap();
        assert!(out.status.success(), "{} fails policy check:\n{}", f.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn policy_check_names_line_column_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "version = 1\n[[targets]]\nname = \"db\"\nprotocol = \"mysql\"\nmatch = [\"127.0.0.53:5432\"]\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"nope\"\n",
    )
    .unwrap();
    let out = portcullis().args(["policy", "check"]).arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4:12: unknown protocol `mysql`"), "{err}");
    assert!(err.contains("bad.toml:9:10: rule names unknown target `nope`"), "{err}");
}

#[test]
fn policy_explain_shows_the_rule() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/ci-runner.toml");
    let out = portcullis()
        .args(["policy", "explain"])
        .arg(&f)
        .args(["--target", "app-db", "--scope", "ci", "--class", "ddl", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["verdict"], "approve");
    assert_eq!(v["decision"]["rule"], "roles.ci-job.rules[0]");
    assert_eq!(v["binding"]["role"], "ci-job");
    let out = portcullis()
        .args(["policy", "explain"])
        .arg(&f)
        .args(["--target", "app-db", "--unit", "other.service", "--class", "read"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no binding: denied");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no binding gives this caller a role"));
}
