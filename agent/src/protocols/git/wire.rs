//! What portcullis reads of git's smart-HTTP messages: the ref
//! advertisement (`info/refs`) and the head of a `git-receive-pack`
//! request (shallow lines, commands with capabilities, push options), up
//! to where the pack starts. Pure functions over buffered bytes.
use std::fmt;

use super::pktline::{self, Pkt, PktError, Shown};

/// An object id: 20 bytes (SHA-1) or 32 bytes (SHA-256).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Oid(Box<[u8]>);

impl Oid {
    pub fn from_bytes(b: &[u8]) -> Oid {
        Oid(b.into())
    }
    /// Parses 40 or 64 hex digits.
    pub fn parse_hex(s: &[u8]) -> Option<Oid> {
        if s.len() != 40 && s.len() != 64 {
            return None;
        }
        let mut out = vec![0u8; s.len() / 2];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Oid(out.into()))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The all-zero id: "no object" (a create's old, a delete's new).
    pub fn is_null(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
    pub fn format(&self) -> ObjectFormat {
        if self.0.len() == 32 {
            ObjectFormat::Sha256
        } else {
            ObjectFormat::Sha1
        }
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Oid({self})")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFormat {
    Sha1,
    Sha256,
}

impl ObjectFormat {
    pub fn from_caps(caps: &[String]) -> Result<ObjectFormat, WireError> {
        match caps.iter().find_map(|c| c.strip_prefix("object-format=")) {
            None | Some("sha1") => Ok(ObjectFormat::Sha1),
            Some("sha256") => Ok(ObjectFormat::Sha256),
            Some(other) => Err(WireError::Malformed(format!("unknown object-format `{other}`"))),
        }
    }
    pub fn hex_len(self) -> usize {
        match self {
            ObjectFormat::Sha1 => 40,
            ObjectFormat::Sha256 => 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Pkt(#[from] PktError),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Unsupported(String),
}

fn malformed(s: impl Into<String>) -> WireError {
    WireError::Malformed(s.into())
}

/// The capabilities after a NUL: space-separated words.
fn caps_of(s: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(s).split(' ').filter(|c| !c.is_empty()).map(str::to_string).collect()
}

/// A ref name git itself would accept in a push (a simplified
/// `check_refname_format`): under `refs/`, no empty, `.`-led or `.lock`
/// components, none of `..`, `@{`, control characters, space, `~^:?*[\`.
pub fn valid_ref_name(name: &str) -> bool {
    name.starts_with("refs/")
        && !name.ends_with('/')
        && !name.ends_with('.')
        && !name.contains("..")
        && !name.contains("@{")
        && !name.bytes().any(|b| b < 0x20 || b == 0x7f || b" ~^:?*[\\".contains(&b))
        && name.split('/').all(|c| !c.is_empty() && !c.starts_with('.') && !c.ends_with(".lock"))
}

/// One `old new ref` command of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub old: Oid,
    pub new: Oid,
    pub name: String,
}

/// The head of a `git-receive-pack` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRequest {
    pub shallow: Vec<Oid>,
    pub commands: Vec<Command>,
    /// The capabilities the client asked for (on its first command).
    pub caps: Vec<String>,
    pub push_options: Vec<String>,
    pub format: ObjectFormat,
    /// Where the pack starts (the end of the buffer when there is none).
    pub pack_offset: usize,
}

impl PushRequest {
    pub fn has_cap(&self, cap: &str) -> bool {
        self.caps.iter().any(|c| c == cap)
    }
    /// The side-band the client asked for, as the largest data per packet.
    pub fn sideband(&self) -> Option<usize> {
        if self.has_cap("side-band-64k") {
            Some(pktline::MAX_SIDEBAND_DATA)
        } else if self.has_cap("side-band") {
            Some(pktline::MAX_SIDEBAND_SMALL_DATA)
        } else {
            None
        }
    }
    /// Whether a pack follows the commands (not for delete-only pushes).
    pub fn expects_pack(&self) -> bool {
        self.commands.iter().any(|c| !c.new.is_null())
    }
}

/// Parses the commands of a receive-pack request body. An empty body or a
/// lone flush (git's probe before a large push) gives no commands.
pub fn parse_push(buf: &[u8]) -> Result<PushRequest, WireError> {
    let mut pos = 0;
    let mut shallow = Vec::new();
    let mut commands: Vec<Command> = Vec::new();
    let mut caps = Vec::new();
    let mut format: Option<ObjectFormat> = None;
    loop {
        let Some(pkt) = pktline::read(buf, &mut pos)? else {
            if commands.is_empty() && shallow.is_empty() {
                // Nothing at all: no commands.
                return Ok(PushRequest {
                    shallow,
                    commands,
                    caps,
                    push_options: Vec::new(),
                    format: ObjectFormat::Sha1,
                    pack_offset: pos,
                });
            }
            return Err(malformed("the command list ends without a flush"));
        };
        let line = match pkt {
            Pkt::Flush => break,
            Pkt::Data(d) => pktline::chomp(d),
            other => return Err(malformed(format!("unexpected {other:?} in the command list"))),
        };
        if commands.is_empty() && (line.starts_with(b"push-cert\0") || line == b"push-cert") {
            return Err(WireError::Unsupported("signed pushes (push-cert) are not supported".into()));
        }
        if let Some(oid) = line.strip_prefix(b"shallow ") {
            if !commands.is_empty() {
                return Err(malformed("a shallow line after the commands"));
            }
            shallow.push(Oid::parse_hex(oid).ok_or_else(|| malformed(format!("bad shallow line `{}`", Shown(line))))?);
            continue;
        }
        let (cmd, cap_part) = match line.iter().position(|&b| b == 0) {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        match (commands.is_empty(), cap_part) {
            (true, Some(c)) => caps = caps_of(c),
            (true, None) => {}
            (false, Some(_)) => return Err(malformed("capabilities on a command other than the first")),
            (false, None) => {}
        }
        let fmt = *format.get_or_insert(ObjectFormat::from_caps(&caps)?);
        let n = fmt.hex_len();
        let bad = || malformed(format!("bad command `{}`", Shown(line)));
        if cmd.len() < 2 * n + 3 || cmd[n] != b' ' || cmd[2 * n + 1] != b' ' {
            return Err(bad());
        }
        let old = Oid::parse_hex(&cmd[..n]).ok_or_else(bad)?;
        let new = Oid::parse_hex(&cmd[n + 1..2 * n + 1]).ok_or_else(bad)?;
        let name = std::str::from_utf8(&cmd[2 * n + 2..]).map_err(|_| bad())?.to_string();
        if !valid_ref_name(&name) {
            return Err(malformed(format!("`{}` is not a valid ref name", Shown(name.as_bytes()))));
        }
        if old.is_null() && new.is_null() {
            return Err(malformed(format!("command for {name} has two null ids")));
        }
        if commands.iter().any(|c| c.name == name) {
            return Err(malformed(format!("{name} appears twice in one push")));
        }
        commands.push(Command { old, new, name });
    }
    if commands.is_empty() {
        // git's probe before a large push is a lone flush.
        if pos == buf.len() && shallow.is_empty() {
            return Ok(PushRequest {
                shallow,
                commands,
                caps,
                push_options: Vec::new(),
                format: ObjectFormat::Sha1,
                pack_offset: pos,
            });
        }
        return Err(malformed("a flush with no commands before it"));
    }
    let format = format.unwrap_or(ObjectFormat::Sha1);
    for s in &shallow {
        if s.format() != format {
            return Err(malformed("a shallow id of the wrong length"));
        }
    }
    let mut push_options = Vec::new();
    if caps.iter().any(|c| c == "push-options") {
        loop {
            match pktline::read(buf, &mut pos)? {
                None => return Err(malformed("the push options end without a flush")),
                Some(Pkt::Flush) => break,
                Some(Pkt::Data(d)) => push_options.push(String::from_utf8_lossy(pktline::chomp(d)).into_owned()),
                Some(other) => return Err(malformed(format!("unexpected {other:?} in the push options"))),
            }
        }
    }
    Ok(PushRequest { shallow, commands, caps, push_options, format, pack_offset: pos })
}

/// A ref advertisement (`GET info/refs?service=...`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Advertisement {
    /// From the `# service=` line.
    pub service: String,
    /// 0 (the original) or 2.
    pub version: u8,
    pub refs: Vec<(Oid, String)>,
    pub caps: Vec<String>,
}

impl Advertisement {
    pub fn format(&self) -> Result<ObjectFormat, WireError> {
        ObjectFormat::from_caps(&self.caps)
    }
}

/// Parses a smart-HTTP ref advertisement: `# service=NAME`, flush, then
/// either refs (the first carrying capabilities; an empty repository shows
/// `capabilities^{}`) and a flush, or, for protocol v2, `version 2` and
/// capability lines up to a flush.
pub fn parse_advertisement(buf: &[u8]) -> Result<Advertisement, WireError> {
    let mut pos = 0;
    let mut adv = Advertisement::default();
    match pktline::read(buf, &mut pos)? {
        Some(Pkt::Data(d)) if pktline::chomp(d).starts_with(b"# service=") => {
            adv.service = String::from_utf8_lossy(&pktline::chomp(d)[10..]).into_owned();
            if pktline::read(buf, &mut pos)? != Some(Pkt::Flush) {
                return Err(malformed("no flush after the service line"));
            }
        }
        // Protocol v2 answers with its capabilities directly.
        Some(Pkt::Data(d)) if pktline::chomp(d) == b"version 2" => pos = 0,
        _ => return Err(malformed("the advertisement starts with neither `# service=` nor `version 2`")),
    }
    let mut first = true;
    loop {
        let line = match pktline::read(buf, &mut pos)? {
            None => return Err(malformed("the advertisement ends without a flush")),
            Some(Pkt::Flush) => break,
            Some(Pkt::Data(d)) => pktline::chomp(d),
            Some(other) => return Err(malformed(format!("unexpected {other:?} in the advertisement"))),
        };
        if first && line == b"version 2" {
            adv.version = 2;
            first = false;
            continue;
        }
        if adv.version == 2 {
            adv.caps.push(String::from_utf8_lossy(line).into_owned());
            continue;
        }
        if let Some(oid) = line.strip_prefix(b"shallow ") {
            Oid::parse_hex(oid).ok_or_else(|| malformed(format!("bad shallow line `{}`", Shown(line))))?;
            continue;
        }
        let (r, cap_part) = match line.iter().position(|&b| b == 0) {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        if let Some(c) = cap_part {
            if !first {
                return Err(malformed("capabilities after the first ref"));
            }
            adv.caps = caps_of(c);
        }
        first = false;
        let sp =
            r.iter().position(|&b| b == b' ').ok_or_else(|| malformed(format!("bad ref line `{}`", Shown(line))))?;
        let oid = Oid::parse_hex(&r[..sp]).ok_or_else(|| malformed(format!("bad ref line `{}`", Shown(line))))?;
        let name = String::from_utf8_lossy(&r[sp + 1..]).into_owned();
        if name == "capabilities^{}" {
            continue;
        }
        adv.refs.push((oid, name));
    }
    if pos != buf.len() {
        return Err(malformed("data after the advertisement's final flush"));
    }
    let fmt = adv.format()?;
    if adv.refs.iter().any(|(o, _)| o.format() != fmt) {
        return Err(malformed("an id whose length does not match the object format"));
    }
    Ok(adv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::git::pktline::{flush, write};

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    fn body(lines: &[&str], options: Option<&[&str]>, tail: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            write(&mut out, l.as_bytes());
        }
        flush(&mut out);
        if let Some(opts) = options {
            for o in opts {
                write(&mut out, format!("{o}\n").as_bytes());
            }
            flush(&mut out);
        }
        out.extend_from_slice(tail);
        out
    }

    #[test]
    fn commands_caps_options_and_pack_offset() {
        let first = format!("{A} {B} refs/heads/main\0report-status side-band-64k push-options agent=git/2.39\n");
        let second = format!("{B} {Z} refs/heads/old\n");
        let third = format!("{Z} {A} refs/tags/v1");
        let buf = body(&[&first, &second, &third], Some(&["ci.skip", "x=y"]), b"PACKdata");
        let p = parse_push(&buf).unwrap();
        assert_eq!(p.commands.len(), 3);
        assert_eq!(p.commands[0].name, "refs/heads/main");
        assert_eq!(p.commands[0].old.to_string(), A);
        assert!(p.commands[1].new.is_null());
        assert!(p.commands[2].old.is_null());
        assert_eq!(p.sideband(), Some(pktline::MAX_SIDEBAND_DATA));
        assert!(p.has_cap("report-status"));
        assert_eq!(p.push_options, vec!["ci.skip", "x=y"]);
        assert_eq!(&buf[p.pack_offset..], b"PACKdata");
        assert_eq!(p.format, ObjectFormat::Sha1);
        assert!(p.expects_pack());
    }

    #[test]
    fn sha256_ids_and_shallow_lines() {
        let a = "a".repeat(64);
        let z = "0".repeat(64);
        let first = format!("{z} {a} refs/heads/x\0report-status object-format=sha256");
        let buf = body(&[&format!("shallow {a}"), &first], None, b"");
        let p = parse_push(&buf).unwrap();
        assert_eq!(p.format, ObjectFormat::Sha256);
        assert_eq!(p.shallow.len(), 1);
        assert_eq!(p.commands[0].new.as_bytes().len(), 32);
        // A SHA-1 length id under sha256 is malformed.
        let first = format!("{Z} {A} refs/heads/x\0object-format=sha256");
        assert!(parse_push(&body(&[&first], None, b"")).is_err());
    }

    #[test]
    fn the_probe_and_delete_only_pushes() {
        let p = parse_push(b"0000").unwrap();
        assert!(p.commands.is_empty());
        assert!(parse_push(b"0000PACK").is_err());
        let p = parse_push(b"").unwrap();
        assert!(p.commands.is_empty());
        let del = format!("{A} {Z} refs/heads/gone\0report-status");
        let p = parse_push(&body(&[&del], None, b"")).unwrap();
        assert!(!p.expects_pack());
        assert_eq!(p.sideband(), None);
    }

    #[test]
    fn malformed_pushes_are_refused() {
        let cases: Vec<Vec<u8>> = vec![
            body(&[&format!("{A} {B}")], None, b""),
            body(&[&format!("{A} {B} main")], None, b""),
            body(&[&format!("{A} {B} refs/heads/a..b")], None, b""),
            body(&[&format!("{A} {B} refs/heads/x.lock")], None, b""),
            body(&[&format!("{A} {B} refs/heads/ x")], None, b""),
            body(&[&format!("{Z} {Z} refs/heads/x")], None, b""),
            body(&[&format!("{A}{B} refs/heads/x")], None, b""),
            body(&[&format!("{A} {B} refs/heads/x"), &format!("{A} {B} refs/heads/x")], None, b""),
            body(&[&format!("{A} {B} refs/heads/x"), &format!("{A} {B} refs/heads/y\0caps")], None, b""),
            body(&[&format!("{A} {B} refs/heads/x"), &format!("shallow {A}")], None, b""),
            format!("{:04x}{A} {B} refs/heads/x", 4 + 40 + 1 + 40 + 1 + 12).into_bytes(),
            // push-options negotiated but never ended
            body(&[&format!("{A} {B} refs/heads/x\0push-options")], None, b"0008abc\n"),
        ];
        for c in cases {
            assert!(parse_push(&c).is_err(), "accepted {:?}", String::from_utf8_lossy(&c));
        }
        let cert = body(&["push-cert\0report-status"], None, b"");
        assert!(matches!(parse_push(&cert), Err(WireError::Unsupported(_))));
    }

    #[test]
    fn advertisements_parse() {
        let mut buf = Vec::new();
        write(&mut buf, b"# service=git-receive-pack\n");
        flush(&mut buf);
        write(&mut buf, format!("{A} refs/heads/main\0report-status delete-refs side-band-64k ofs-delta\n").as_bytes());
        write(&mut buf, format!("{B} refs/heads/dev\n").as_bytes());
        flush(&mut buf);
        let adv = parse_advertisement(&buf).unwrap();
        assert_eq!(adv.service, "git-receive-pack");
        assert_eq!(adv.refs.len(), 2);
        assert_eq!(adv.refs[1].1, "refs/heads/dev");
        assert!(adv.caps.contains(&"side-band-64k".to_string()));

        let mut empty = Vec::new();
        write(&mut empty, b"# service=git-receive-pack\n");
        flush(&mut empty);
        write(&mut empty, format!("{Z} capabilities^{{}}\0report-status object-format=sha1\n").as_bytes());
        flush(&mut empty);
        let adv = parse_advertisement(&empty).unwrap();
        assert!(adv.refs.is_empty());
        assert_eq!(adv.format().unwrap(), ObjectFormat::Sha1);

        let mut v2 = Vec::new();
        write(&mut v2, b"# service=git-upload-pack\n");
        flush(&mut v2);
        write(&mut v2, b"version 2\n");
        write(&mut v2, b"ls-refs=unborn\n");
        write(&mut v2, b"fetch=shallow\n");
        flush(&mut v2);
        let adv = parse_advertisement(&v2).unwrap();
        assert_eq!(adv.version, 2);
        assert_eq!(adv.caps, vec!["ls-refs=unborn", "fetch=shallow"]);
        // git http-backend leaves the service line out for v2.
        let bare = &v2[v2.iter().position(|&b| b == b'\n').unwrap() + 1 + 4..];
        let adv = parse_advertisement(bare).unwrap();
        assert_eq!((adv.version, adv.service.as_str()), (2, ""));

        let mut trailing = buf.clone();
        trailing.extend_from_slice(b"junk");
        assert!(parse_advertisement(&trailing).is_err());
        assert!(parse_advertisement(b"0000").is_err());
        assert!(parse_advertisement(&buf[..buf.len() - 4]).is_err());
    }
}
