//! Masking a byte stream that arrives in chunks (HTTP bodies, raw text).
//!
//! The last `window` bytes are held back until more data (or the end)
//! arrives, so a secret split across chunks is seen whole: a secret no
//! longer than the window is never let out in part. A match that reaches
//! into the held bytes holds back from its start instead (a private key
//! block longer than the window waits for its end), up to `max_hold` bytes;
//! past that, what has come is let out masked and the rest of the match,
//! as it keeps arriving, is swallowed.
//!
//! A stream that trickles (server-sent events, a log followed) would wait
//! for a window's worth of bytes: when its input pauses, the complete lines
//! held back are let out ([`StreamMasker::release_lines`]) wherever no
//! secret can run on past their end.
//!
//! A stream masks as the whole text at once would. Where a window ends,
//! the cut goes back to a place no detector's walk back crosses (not inside
//! a word, an e-mail's local part or a run of digits), and the next scan
//! starts with the last bytes let out before it, for the detectors that
//! look a few bytes back (word boundaries, an IBAN's letters).
use super::{
    detect::{may_cut_before, Found, LOOK_BEHIND},
    SessionMasker,
};

/// The default hold-back window.
pub const DEFAULT_WINDOW: usize = 4096;
/// The smallest window: room for the longest context a pattern needs before
/// its secret (`aws_secret_access_key = ` and 40 characters) and for all an
/// e-mail's end is decided on (64 + 1 + 253 characters).
pub const MIN_WINDOW: usize = 512;
/// The most a stream holds back for one unfinished match.
pub const MAX_HOLD: usize = 1 << 20;
/// How much of a let-out match's start is kept to recognise its
/// continuation.
const CONTEXT: usize = 1024;
/// Stand-ins for what may come after a released line's end: a secret whose
/// pattern lets it run on across the line break (`password:` and the value
/// on the next line, `Authorization` and its token, a private key's body)
/// matches into one of them. The last is exactly an AWS secret key's 40
/// characters and a line end (that detector wants no letter after them).
const PROBES: [&[u8]; 3] = [
    b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    b"=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
];

/// How much of what is held a flush may let out.
#[derive(Clone, Copy)]
enum Limit {
    /// All but the hold-back window.
    Window,
    /// Up to this offset of `pending` (never with a carried match).
    At(usize),
    /// Everything: the stream ended.
    End,
}

pub struct StreamMasker {
    m: SessionMasker,
    window: usize,
    max_hold: usize,
    /// Bytes held; the first `behind` of them were let out already and
    /// are kept only as what comes before the next scan.
    pending: Vec<u8>,
    behind: usize,
    /// The start of a match let out before it ended.
    carry: Option<Vec<u8>>,
    /// Whether held lines may be let out early (no secret looked for can
    /// run across a line break unseen).
    lines: bool,
}

impl StreamMasker {
    pub(super) fn new(m: SessionMasker, window: usize) -> StreamMasker {
        let window = window.max(2 * m.longest_credential()).max(MIN_WINDOW);
        let lines = !m.spans_lines();
        StreamMasker {
            m,
            window,
            max_hold: MAX_HOLD.max(2 * window),
            pending: Vec::new(),
            behind: 0,
            carry: None,
            lines,
        }
    }

    /// Lowers the hold bound (tests and memory-tight callers).
    pub fn with_max_hold(mut self, max_hold: usize) -> StreamMasker {
        self.max_hold = max_hold.max(2 * self.window);
        self
    }

    /// Bytes received and not yet let out.
    pub fn held(&self) -> usize {
        self.pending.len() - self.behind
    }

    /// Takes a chunk; appends to `out` what can be let out now.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.pending.extend_from_slice(chunk);
        // Scan when at least a window of new bytes is in, so each byte is
        // scanned about twice whatever the chunk sizes.
        if self.held() >= 2 * self.window {
            self.flush(Limit::Window, out);
        }
    }

    /// The input has paused: lets out, masked, the complete lines held back
    /// that no secret can run on from. A match that could continue past the
    /// last line's end (found by scanning the lines with a stand-in for what
    /// may come next) is held back from its start, as is everything while a
    /// let-out match may go on, or when a custom pattern or a credential can
    /// span lines.
    pub fn release_lines(&mut self, out: &mut Vec<u8>) {
        if !self.lines || self.carry.is_some() {
            return;
        }
        let Some(nl) = self.pending[self.behind..].iter().rposition(|&b| b == b'\n') else { return };
        let mut cut = self.behind + nl + 1;
        if self.m.scans_text() {
            // All that is held, not just the last lines: a match may have
            // started well before them (a long private key's BEGIN line).
            let mut probe = Vec::with_capacity(cut + PROBES[1].len());
            for p in PROBES {
                probe.clear();
                probe.extend_from_slice(&self.pending[..cut]);
                probe.extend_from_slice(p);
                self.m.collect(&probe);
                let end = cut;
                if let Some(f) = self.m.found.iter().find(|f| f.end > end && f.context < end) {
                    cut = f.context;
                }
                self.m.found.clear();
            }
        }
        if cut > self.behind {
            self.flush(Limit::At(cut), out);
        }
    }

    /// The stream ended: lets out the rest, masked.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.flush(Limit::End, out);
        self.carry = None;
        self.pending.clear();
        self.behind = 0;
    }

    fn flush(&mut self, limit: Limit, out: &mut Vec<u8>) {
        let last = matches!(limit, Limit::End);
        if !self.m.scans_text() {
            out.extend_from_slice(&self.pending[self.behind..]);
            self.pending.clear();
            self.behind = 0;
            return;
        }
        // With a carried match start, scan it together with what came
        // after it, to see whether the match goes on; else scan what is
        // held after the bytes kept from before it.
        let carry = self.carry.take();
        let joined;
        let (text, ctx): (&[u8], usize) = match &carry {
            Some(c) => {
                joined = [c.as_slice(), &self.pending[self.behind..]].concat();
                (&joined, c.len())
            }
            None => (&self.pending, self.behind),
        };
        self.m.collect(text);
        let mut found: Vec<Found> = std::mem::take(&mut self.m.found);
        let mut from = ctx;
        if carry.is_some() {
            if let Some(f) = found.first().copied().filter(|f| f.start == 0 && f.end > ctx) {
                found.remove(0);
                if f.end == text.len() && !last {
                    // Still going: swallow everything and keep watching.
                    self.pending.clear();
                    self.behind = 0;
                    self.carry = carry;
                    self.m.found = found;
                    return;
                }
                from = f.end;
            }
        } else {
            // What lies in the bytes let out before was dealt with then. A
            // match that runs on from them was not seen then (a run longer
            // than the window): mask what is left of it.
            found.retain(|f| f.end > ctx);
            for f in found.iter_mut().filter(|f| f.start < ctx) {
                f.start = ctx;
                f.context = f.context.max(ctx);
            }
        }
        let len = text.len();
        let mut cut = match limit {
            Limit::End => len,
            Limit::Window => {
                let cut = len.saturating_sub(self.window).max(from);
                // Back to a place a detector's walk back does not cross;
                // a run longer than the window is cut where it must be.
                (from + 1..=cut).rev().find(|&c| may_cut_before(text, c)).unwrap_or(cut)
            }
            Limit::At(c) => c.clamp(from, len),
        };
        let mut carry_next = None;
        if let Some(f) = found.iter().find(|f| f.end > cut).copied() {
            if f.context < cut {
                cut = f.context.max(from);
            }
            if cut.saturating_sub(from) == 0 && len - from > self.max_hold {
                // One match holds back too much: let it out masked as far
                // as it has come.
                cut = f.end;
                if f.end == len {
                    carry_next = Some(text[f.context..len.min(f.start + CONTEXT)].to_vec());
                }
            }
        }
        let emitted: Vec<Found> = found.iter().copied().filter(|f| f.start >= from && f.end <= cut).collect();
        self.m.render(text, &emitted, from, cut, out);
        // Keep the last bytes let out as what comes before the next scan,
        // a carried match's among them (none while a match let out may go
        // on: its start is the context).
        let keep = if carry_next.is_some() { 0 } else { cut.min(LOOK_BEHIND) };
        match &carry {
            None => drop(self.pending.drain(..cut - keep)),
            Some(c) if cut - keep < ctx => drop(self.pending.splice(0..0, c[cut - keep..].iter().copied())),
            Some(_) => drop(self.pending.drain(..cut - keep - ctx)),
        }
        self.behind = keep;
        self.carry = carry_next;
        found.clear();
        self.m.found = found;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::masker;
    use super::*;

    /// Feeds `text` in chunks of `size` and returns everything let out.
    fn through(s: &mut StreamMasker, text: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in text.chunks(size) {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn a_secret_split_across_chunks_is_caught_at_any_split() {
        let m = masker(&["detector:token", "detector:email"], &[], &["Inj3cted-Secret"]);
        let filler = "lorem ipsum dolor sit amet, ".repeat(30);
        let text = format!(
            "{filler}Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345 {filler}mail carol@example.com {filler}Inj3cted-Secret."
        );
        let want = format!("{filler}Authorization: Bearer <token> {filler}mail <email> {filler}<credential>.");
        for size in [1, 2, 3, 7, 64, 100, 999, 5000] {
            let mut s = m.stream(MIN_WINDOW);
            let got = through(&mut s, text.as_bytes(), size);
            assert_eq!(String::from_utf8(got).unwrap(), want, "chunk size {size}");
        }
    }

    #[test]
    fn output_keeps_up_with_input() {
        let m = masker(&["detector:email"], &[], &[]);
        let mut s = m.stream(MIN_WINDOW);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 1000];
        for _ in 0..10 {
            s.push(&chunk, &mut out);
        }
        assert!(s.held() < 2 * MIN_WINDOW + 1000, "held {}", s.held());
        assert_eq!(out.len() + s.held(), 10_000);
        s.finish(&mut out);
        assert_eq!(out, vec![b'x'; 10_000]);
    }

    #[test]
    fn a_private_key_longer_than_the_window_is_held_whole() {
        let m = masker(&["detector:private-key"], &[], &[]);
        let body = "MIIEpAIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgwMbRvI0MBZhpF\n".repeat(40);
        let pem = format!("-----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----");
        let text = format!("before\n{pem}\nafter");
        for size in [10, 256, 4096] {
            let mut s = m.stream(MIN_WINDOW);
            let got = through(&mut s, text.as_bytes(), size);
            assert_eq!(String::from_utf8(got).unwrap(), "before\n<private-key>\nafter", "chunk size {size}");
        }
    }

    #[test]
    fn a_match_past_the_hold_bound_is_let_out_masked_and_its_rest_swallowed() {
        let m = masker(&["detector:private-key"], &[], &[]);
        let body = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2\n".repeat(200);
        let text = format!("x\n-----BEGIN PRIVATE KEY-----\n{body}-----END PRIVATE KEY-----\ny");
        let mut s = m.stream(MIN_WINDOW).with_max_hold(1024);
        let got = String::from_utf8(through(&mut s, text.as_bytes(), 300)).unwrap();
        assert!(got.starts_with("x\n<private-key>"), "{got}");
        assert!(got.ends_with("\ny"), "{got}");
        assert!(!got.contains("QUJD"), "{got}");
    }

    #[test]
    fn a_pause_lets_out_complete_lines_masked() {
        let m = masker(&["detector:token", "detector:email"], &[], &["Inj3cted-Secret"]);
        let mut s = m.stream(DEFAULT_WINDOW);
        let mut out = Vec::new();
        s.push(b"data: {\"t\":\"hello\"}\n\n", &mut out);
        assert!(out.is_empty(), "held until a window fills");
        s.release_lines(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "data: {\"t\":\"hello\"}\n\n");
        out.clear();
        s.push(b"data: Inj3cted-Secret and bob@example.com\n\ndata: Inj3cted-Se", &mut out);
        s.release_lines(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "data: <credential> and <email>\n\n");
        out.clear();
        // The unfinished line waits for the rest.
        assert_eq!(s.held(), "data: Inj3cted-Se".len());
        s.push(b"cret\n", &mut out);
        s.finish(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "data: <credential>\n");
    }

    #[test]
    fn a_pause_holds_back_what_may_run_on_into_the_next_line() {
        let m = masker(&["detector:*"], &[], &[]);
        let cases: [(&str, &str, &str); 4] = [
            ("config:\npassword:\n", "  hunter2hunter2\n", "config:\n"),
            ("x\nAuthorization: Bearer\n", "abcdefghijklmnopqrstuvwxyz012345\n", "x\n"),
            ("x\napi_key\n", "= s3cr3tv4lu3xyz\n", "x\n"),
            (
                "x\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n",
                "-----END PRIVATE KEY-----\n",
                "x\n",
            ),
        ];
        for (first, rest, early) in cases {
            let mut s = m.stream(DEFAULT_WINDOW);
            let mut out = Vec::new();
            s.push(first.as_bytes(), &mut out);
            s.release_lines(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), early, "{first:?}");
            s.push(rest.as_bytes(), &mut out);
            s.finish(&mut out);
            let all = String::from_utf8(out).unwrap();
            assert!(all.starts_with(early), "{all}");
            for secret in ["hunter2hunter2", "abcdefghijklmnop", "s3cr3tv4lu3xyz", "MIIEvQ"] {
                assert!(!all.contains(secret), "{secret} let out: {all:?}");
            }
        }
    }

    #[test]
    fn a_pause_holds_back_a_long_private_key_and_a_secret_key_on_the_next_line() {
        let m = masker(&["detector:*"], &[], &[]);
        // A key whose BEGIN line is far more than a window before the pause.
        let line = "MIIJQgIBADANBgkqhkiG9w0BAQEFAASCCSwwggkoAgEAAoICAQC7VJTUt9Us8cKj\n";
        let first = format!("x\n-----BEGIN PRIVATE KEY-----\n{}", line.repeat(120));
        let mut s = m.stream(DEFAULT_WINDOW);
        let mut out = Vec::new();
        s.push(first.as_bytes(), &mut out);
        s.release_lines(&mut out);
        s.push(line.repeat(3).as_bytes(), &mut out);
        s.push(b"-----END PRIVATE KEY-----\ny\n", &mut out);
        s.finish(&mut out);
        let all = String::from_utf8(out).unwrap();
        assert_eq!(all, "x\n<private-key>\ny\n");
        // An AWS secret key whose name ends the line before it.
        let mut s = m.stream(DEFAULT_WINDOW);
        let mut out = Vec::new();
        s.push(b"[default]\naws_secret_access_key =\n", &mut out);
        s.release_lines(&mut out);
        // The line before goes; the name and its `=` wait for the value.
        assert!(out.starts_with(b"[default]\n") && !out.contains(&b'='), "{:?}", String::from_utf8_lossy(&out));
        s.push(b"  wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n", &mut out);
        s.finish(&mut out);
        let all = String::from_utf8(out).unwrap();
        assert!(!all.contains("wJalrXUtnFEMI"), "{all:?}");
    }

    #[test]
    fn a_pause_lets_nothing_out_when_a_secret_may_span_lines() {
        // A custom pattern that can match a line break.
        let m = masker(&["detector:ticket"], &[("ticket", "(?s)TICKET.{4}END")], &[]);
        let mut s = m.stream(DEFAULT_WINDOW);
        let mut out = Vec::new();
        s.push(b"a\nTICKET\n", &mut out);
        s.release_lines(&mut out);
        assert!(out.is_empty());
        s.push(b"ab\nEND\n", &mut out);
        s.finish(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "a\n<ticket>\n");
        // A credential holding a line feed.
        let m = masker(&[], &[], &["line-one\nline-two"]);
        let mut s = m.stream(DEFAULT_WINDOW);
        let mut out = Vec::new();
        s.push(b"x line-one\n", &mut out);
        s.release_lines(&mut out);
        assert!(out.is_empty());
    }

    /// Masks `text` whole and as a stream at every chunk size given.
    fn assert_stream_is_whole(m: &SessionMasker, text: &[u8], sizes: &[usize]) {
        let mut w = m.clone();
        let mut whole = Vec::new();
        if w.mask_text(text, super::super::NullAs::Remove, &mut whole) == super::super::Outcome::Unchanged {
            whole = text.to_vec();
        }
        for &size in sizes {
            let mut s = m.stream(0);
            let got = through(&mut s, text, size);
            assert!(
                got == whole,
                "chunks of {size}\nstream: {:?}\nwhole:  {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&whole)
            );
        }
    }

    #[test]
    fn a_cut_anywhere_sees_what_comes_before_it() {
        // What a detector checks before a match (a word boundary, an IBAN's
        // letters, `api_` before `key`, an e-mail's local part, the digits a
        // card number runs on from) is the same on either side of wherever
        // a window ends.
        let m = masker(&["detector:*"], &[], &[]);
        let tails: [&str; 7] = [
            "xRghs_fi99999999999999999999999999999999999999 and on",
            ", ghs_fi99999999999999999999999999999999999999 and on",
            "xDE89 3704 0044 0532 0130 00 then",
            " api_key = s3cr3tv4lu3xyz0 then",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bb@example.com then",
            "1234 4111 1111 1111 1111 then",
            "x4111 1111 1111 1111 then",
        ];
        for tail in tails {
            for pad in 200..320 {
                let text = format!("{}{tail}{}", "w ".repeat(pad / 2) + &"w".repeat(pad % 2), " z".repeat(300));
                assert_stream_is_whole(&m, text.as_bytes(), &[1, 5]);
            }
        }
    }

    #[test]
    fn runs_longer_than_the_window_mask_as_whole() {
        // No place to cut between a window's end and a run's start: the
        // detectors look back a bounded way into the run (an e-mail's local
        // part is at most 64 characters), so a cut inside it changes nothing.
        let m = masker(&["detector:*"], &[], &[]);
        let tails = [
            format!("{}@example.com then", "a".repeat(1000)),
            format!("{}b@example.com then", "a-".repeat(400)),
            format!("{}@{}.com then", "a".repeat(40), "b".repeat(700)),
            format!("{}.com then", "x@b".repeat(300)),
            format!("{} then", "4111 1111 1111 1111 ".repeat(60)),
            format!("{}4111111111111111 then", "1 ".repeat(600)),
        ];
        for tail in tails {
            for pad in (200..600).step_by(13) {
                let text = format!("{}{tail}{}", "w ".repeat(pad / 2), " z".repeat(300));
                assert_stream_is_whole(&m, text.as_bytes(), &[1, 5, 64]);
            }
        }
    }

    #[test]
    fn nothing_to_mask_passes_through() {
        let m = masker(&[], &[], &[]);
        let mut s = m.stream(64);
        assert_eq!(through(&mut s, b"anything at all a@b.io", 3), b"anything at all a@b.io");
    }
}
