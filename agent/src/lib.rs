//! portcullis: an eBPF-steered enforcer that puts role-based access control
//! between AI coding agents and the systems they touch.
//!
//! The path of one connection, one module per step: `intercept` (kernel
//! programs and attribution), `protocols` (decoding each target's
//! protocol), `policy` (the decision), `masking` (what a role may see of
//! responses), `audit` (the record); plus `cli`,
//! `config`, `control` (the local control socket) and `credentials`.
pub mod approvals;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod doctor;
pub mod enforcer;
pub mod error;
pub mod ids;
pub mod intercept;
pub mod masking;
pub mod metrics;
pub mod policy;
pub mod protocols;
pub mod tls;
pub mod workers;
