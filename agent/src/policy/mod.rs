//! Policy: the file format, its validation, and the decision function.
pub mod address;
pub mod decide;
pub mod load;
pub mod model;

pub use decide::{
    binding_for, decide_classes, decide_http, decide_session, decide_sql, revalidate, role_for, Decision, HttpDecision,
    HttpRequest, SessionSeen, SqlRequest, Subject, Verdict,
};
pub use decide::{decide_git, GitDecision, GitRequest, GitService, RefKind};
pub use load::{load_file, parse, PolicyError, PolicyErrors};
pub use model::*;

/// The built-in policy of `portcullis run` without `--policy`: observe mode.
/// Every TCP connection from scope `agent` is relayed to where it was going,
/// allowed, attributed and recorded.
pub const OBSERVE_POLICY: &str = r#"
version = 1

[[scopes]]
name = "agent"
cgroup = "portcullis.slice/agent"
egress = "allow"

[[targets]]
name = "anywhere"
protocol = "tcp"
match = ["*"]

[[roles]]
name = "observed"
[[roles.rules]]
target = "anywhere"
allow = ["connect"]

[[bindings]]
scope = "agent"
role = "observed"
"#;

pub fn observe_policy() -> Policy {
    parse(OBSERVE_POLICY).expect("the built-in policy is valid")
}
