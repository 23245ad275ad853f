//! How the audit log is kept: where, segment size, retention, fsync policy,
//! and what happens when the disk is full.
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

/// When records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Durable records are fsynced before they are acknowledged, many at a
    /// time (group commit); the rest within the sync interval.
    #[default]
    Group,
    /// Every record is fsynced on its own before the next is written.
    Always,
    /// No fsync: records reach the kernel (they survive a crash of
    /// portcullis, not of the machine).
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "group" => Ok(FsyncPolicy::Group),
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => Err(format!("`{s}`: expected group, always or never")),
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsyncPolicy::Group => "group",
            FsyncPolicy::Always => "always",
            FsyncPolicy::Never => "never",
        })
    }
}

/// What a state-changing request meets when its record cannot be written
/// because the disk is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// `record_durable` fails and the request is refused.
    #[default]
    Refuse,
    /// `record_durable` reports success; the request runs unrecorded (each
    /// such loss is logged at error and counted in an `audit_loss` record
    /// once the disk has room again).
    Allow,
}

impl FromStr for FullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(FullPolicy::Refuse),
            "allow" => Ok(FullPolicy::Allow),
            _ => Err(format!("`{s}`: expected refuse or allow")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Whole closed segments older than this are deleted.
    pub max_age: Option<Duration>,
    /// Oldest closed segments are deleted while all segments together are
    /// larger than this.
    pub max_bytes: Option<u64>,
    pub fsync: FsyncPolicy,
    /// The longest a record written with `record` (not durable) waits for
    /// its fsync.
    pub sync_interval: Duration,
    pub on_full: FullPolicy,
    /// Response content kept in a record, at most (longer is cut).
    pub response_cap: usize,
    /// Most bytes of records waiting for the writer. Beyond it (the disk
    /// stalls while traffic goes on) plain records are counted as lost and
    /// state-changing requests are refused, instead of memory growing.
    pub queue_bytes: usize,
}

pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(90 * 86400);
pub const DEFAULT_RESPONSE_CAP: usize = 4096;
pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;

impl AuditConfig {
    /// Defaults for a log in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> AuditConfig {
        AuditConfig {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_age: Some(DEFAULT_MAX_AGE),
            max_bytes: Some(DEFAULT_MAX_BYTES),
            fsync: FsyncPolicy::Group,
            sync_interval: Duration::from_secs(1),
            on_full: FullPolicy::Refuse,
            response_cap: DEFAULT_RESPONSE_CAP,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }
}

/// `4096`, `64k`, `64KiB`, `16MiB`, `1G`, `2GiB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}`: expected a size like 4096, 64KiB, 16MiB or 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown size unit `{unit}` (B, KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}`: too large"))
}

/// `500ms`, `30s`, `5m`, `12h`, `90d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}`: expected a duration like 500ms, 30s, 5m, 12h or 90d"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(format!("`{s}`: unknown duration unit `{unit}` (ms, s, m, h, d)")),
    };
    Ok(d)
}

/// A limit where `0`, `off` or `none` means none.
pub fn parse_optional<T>(s: &str, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>, String> {
    match s.trim() {
        "0" | "off" | "none" => Ok(None),
        other => parse(other).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("16m").unwrap(), 16 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("lots").unwrap_err().contains("lots"));
        assert!(parse_size("5 parsecs").unwrap_err().contains("unit"));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90d").unwrap(), Duration::from_secs(90 * 86400));
        assert!(parse_duration("1y").is_err());
        assert_eq!(parse_optional("off", parse_size).unwrap(), None);
        assert_eq!(parse_optional("1k", parse_size).unwrap(), Some(1024));
        assert_eq!("always".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Always);
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        assert_eq!("allow".parse::<FullPolicy>().unwrap(), FullPolicy::Allow);
    }
}
