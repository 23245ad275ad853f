//! PostgreSQL: the wire protocol on both sides, each statement classified
//! and decided.
pub mod classify;
