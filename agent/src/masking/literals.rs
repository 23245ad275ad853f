//! Searching text for a set of literals (detector triggers, the forms of
//! injected credentials), leftmost-longest and without overlaps.
//!
//! Most values a masker sees are short (names, cities, dates), so the cost
//! of a search is mostly what it takes to start one. Texts shorter than the
//! shortest literal are skipped outright, and short texts are first checked
//! against a bitmap of the literals' first three bytes, so a value without
//! any trigram a literal starts with costs a few loads. The rest goes to the
//! packed SIMD searcher (Teddy) directly, without the general automaton
//! around it, which would only hand the search on to it; where Teddy is not
//! available (an old CPU), to the Aho-Corasick automaton.
use aho_corasick::{
    packed::{self, MatchKind as PackedKind},
    AhoCorasick, AhoCorasickBuilder, Input, Match, MatchKind, Span,
};

/// Texts shorter than this are checked against the trigram bitmap first:
/// below it, starting the SIMD search costs more than the bitmap check.
const GATE_BELOW: usize = 64;

pub struct Literals {
    /// The SIMD searcher, when the CPU has it.
    packed: Option<packed::Searcher>,
    /// The same search where it does not.
    ac: AhoCorasick,
    /// `None` when a literal is shorter than three bytes.
    gate: Option<Box<Trigrams>>,
    shortest: usize,
}

impl std::fmt::Debug for Literals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Literals may be credentials: never printed.
        f.write_str("Literals(<redacted>)")
    }
}

impl Literals {
    /// `None` without literals. Empty literals are not allowed.
    pub fn new<P: AsRef<[u8]>>(literals: &[P]) -> Option<Literals> {
        if literals.is_empty() {
            return None;
        }
        let shortest = literals.iter().map(|l| l.as_ref().len()).min().unwrap_or(0);
        assert!(shortest > 0, "empty literal");
        let packed = packed::Config::new().match_kind(PackedKind::LeftmostLongest).builder().extend(literals).build();
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(literals)
            .expect("literal patterns always build");
        let gate = (shortest >= 3).then(|| {
            let mut t = Box::new(Trigrams([0; TRIGRAM_WORDS]));
            for l in literals {
                t.insert(l.as_ref());
            }
            t
        });
        Some(Literals { packed, ac, gate, shortest })
    }

    /// Whether `text` may hold a literal (false: it certainly does not).
    fn may_hold(&self, text: &[u8]) -> bool {
        if text.len() < self.shortest {
            return false;
        }
        match &self.gate {
            Some(g) if text.len() < GATE_BELOW => g.any_in(text),
            _ => true,
        }
    }

    /// The literals in `text`, leftmost-longest, not overlapping.
    pub fn find_iter<'a>(&'a self, text: &'a [u8]) -> impl Iterator<Item = Match> + 'a {
        let mut at = if self.may_hold(text) { 0 } else { text.len() + 1 };
        std::iter::from_fn(move || {
            if at > text.len() {
                return None;
            }
            let span = Span::from(at..text.len());
            let m = match &self.packed {
                Some(p) => p.find_in(text, span),
                None => self.ac.find(Input::new(text).span(span)),
            };
            // Literals are never empty, so this moves on.
            at = m.map_or(text.len() + 1, |m| m.end());
            m
        })
    }
}

const TRIGRAM_BITS: u32 = 15;
const TRIGRAM_WORDS: usize = (1 << TRIGRAM_BITS) / 64;

/// A bitmap of hashed 3-byte prefixes. A set bit may be a collision (the
/// search then runs as usual); a clear bit is certain.
struct Trigrams([u64; TRIGRAM_WORDS]);

impl Trigrams {
    fn index(w: &[u8]) -> usize {
        let key = u32::from(w[0]) | u32::from(w[1]) << 8 | u32::from(w[2]) << 16;
        // Multiplicative hashing: the top bits mix all three bytes.
        (key.wrapping_mul(0x9E37_79B1) >> (32 - TRIGRAM_BITS)) as usize
    }

    fn insert(&mut self, literal: &[u8]) {
        let i = Trigrams::index(literal);
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn any_in(&self, text: &[u8]) -> bool {
        text.windows(3).any(|w| {
            let i = Trigrams::index(w);
            self.0[i / 64] & (1 << (i % 64)) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(l: &Literals, text: &[u8]) -> Vec<(usize, usize, usize)> {
        l.find_iter(text).map(|m| (m.start(), m.end(), m.pattern().as_usize())).collect()
    }

    fn reference(pats: &[&str], text: &[u8]) -> Vec<(usize, usize, usize)> {
        let ac = AhoCorasickBuilder::new().match_kind(MatchKind::LeftmostLongest).build(pats).unwrap();
        ac.find_iter(text).map(|m| (m.start(), m.end(), m.pattern().as_usize())).collect()
    }

    #[test]
    fn same_matches_as_the_automaton_at_every_length_and_offset() {
        let pats = ["key", "Key", "password", "sk-", "sk_live_", "ghp_", "eyJ", "AKIA", "-----BEGIN "];
        let l = Literals::new(&pats).unwrap();
        assert_eq!(l.shortest, 3);
        // Each literal alone, and behind and before filler, across the gate's
        // bound: the short path must see what the long one sees.
        for p in pats {
            for pad in 0..GATE_BELOW + 8 {
                for text in [
                    format!("{}{p}", "x".repeat(pad)),
                    format!("{p}{}", ".".repeat(pad)),
                    format!("{}{p}{}", " ".repeat(pad / 2), "z".repeat(pad - pad / 2)),
                ] {
                    let got = spans(&l, text.as_bytes());
                    assert_eq!(got, reference(&pats, text.as_bytes()), "{text:?}");
                    assert!(!got.is_empty(), "{text:?}");
                }
            }
        }
        // Several, overlapping and adjacent.
        for text in ["sk_live_key", "keyKeypassword", "AKIAghp_eyJ", "sk-sk-sk-", "xkex"] {
            assert_eq!(spans(&l, text.as_bytes()), reference(&pats, text.as_bytes()), "{text:?}");
        }
    }

    #[test]
    fn too_short_or_no_trigram_finds_nothing() {
        let l = Literals::new(&["token", "pwd"]).unwrap();
        assert!(spans(&l, b"pw").is_empty());
        assert!(spans(&l, b"Olivia Smith").is_empty());
        assert_eq!(spans(&l, b"pwd"), [(0, 3, 1)]);
        assert_eq!(spans(&l, b"my token"), [(3, 8, 0)]);
    }

    #[test]
    fn short_literals_turn_the_gate_off() {
        let l = Literals::new(&["ab", "xyz"]).unwrap();
        assert!(l.gate.is_none());
        assert_eq!(spans(&l, b"cab"), [(1, 3, 0)]);
        assert!(Literals::new::<&str>(&[]).is_none());
    }

    #[test]
    fn every_window_of_the_bitmap_is_checked() {
        let mut t = Trigrams([0; TRIGRAM_WORDS]);
        t.insert(b"abc");
        for pad in 0..GATE_BELOW {
            let text = format!("{}abc{}", "-".repeat(pad), "-".repeat(pad % 3));
            assert!(t.any_in(text.as_bytes()), "{pad}");
        }
        assert!(!t.any_in(b"ab"));
    }
}
