//! `cargo xtask bench masking`: detector throughput per core over realistic
//! row data, and the time masking adds to a 1,000-row result.
//!
//! The corpus is a customer table made here from a fixed seed (names,
//! addresses, phone numbers, dates, free-text notes of which a few carry an
//! email, a card number, a non-Luhn 16-digit order number, a token or an
//! IBAN). It is written as PostgreSQL DataRow bodies; the timing runs in the
//! release build of the agent's `mask-bench` example, one thread.
use std::{fmt::Write as _, fs, path::PathBuf};

use anyhow::{Context, Result};

use crate::{cargo, root, run as run_cmd};

const ROWS: usize = 20_000;

pub fn run() -> Result<()> {
    let dir = root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let corpus = dir.join("masking-corpus.bin");
    fs::write(&corpus, corpus_bytes(ROWS)).with_context(|| format!("writing {}", corpus.display()))?;
    cargo(&["build", "--release", "-p", "portcullis", "--example", "mask-bench"])?;
    let bin: PathBuf = root().join("target/release/examples/mask-bench");
    run_cmd(std::process::Command::new(bin).arg(&corpus))
}

/// splitmix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b'0' + self.below(10) as u8)).collect()
    }
}

const FIRST: &[&str] = &[
    "Olivia", "Liam", "Emma", "Noah", "Amelia", "Oliver", "Sophia", "Elijah", "Mia", "Lucas", "Zoë", "Mateo", "Ana",
    "Jürgen", "Chloé", "Hiroshi", "Priya", "Kwame", "Fatima", "Søren", "Isabella", "James", "Aarav", "Léa",
];
const LAST: &[&str] = &[
    "Smith",
    "Johnson",
    "García",
    "Müller",
    "Rossi",
    "Nakamura",
    "Okafor",
    "Dubois",
    "Kowalski",
    "Silva",
    "Nguyen",
    "O'Brien",
    "van der Berg",
    "Andersson",
    "Patel",
    "Haddad",
    "Fernández",
    "Novák",
    "Lindqvist",
    "Brown",
];
const STREETS: &[&str] = &[
    "Main Street",
    "Oak Avenue",
    "Baker Street",
    "Rue de Rivoli",
    "Hauptstraße",
    "Calle Mayor",
    "Elm Road",
    "Queen's Parade",
    "Via Roma",
    "Harbour View",
    "Station Road",
    "Kingsway",
];
const CITIES: &[&str] = &[
    "Springfield",
    "London",
    "Paris",
    "Berlin",
    "Madrid",
    "Rome",
    "Lisbon",
    "Dublin",
    "Amsterdam",
    "Oslo",
    "Kraków",
    "Osaka",
    "Lagos",
    "Toronto",
    "Austin",
    "Melbourne",
];
const COUNTRIES: &[&str] = &["US", "GB", "FR", "DE", "ES", "IT", "PT", "IE", "NL", "NO", "PL", "JP", "NG", "CA", "AU"];
const DOMAINS: &[&str] = &["example.com", "mail.example.org", "corp.example.net", "example.co.uk"];
const SENTENCES: &[&str] = &[
    "Customer called about a late delivery and was offered a discount on the next order.",
    "Prefers contact by phone in the afternoon; do not call before 10am.",
    "Upgraded to the annual plan after the trial ended.",
    "Asked for the invoice to be re-issued with the new company name.",
    "Reported that the mobile app crashes when uploading photos larger than 20 MB.",
    "Account flagged for review after three failed payment attempts in March.",
    "Happy with the service overall, suggested adding dark mode.",
    "Moved to a new address, shipping details updated on request.",
    "Requested a refund for order #58213; approved by support lead.",
    "Uses the API for nightly exports of about 4,000 records.",
    "Follow-up scheduled for next Tuesday at 14:30 to discuss the renewal.",
    "Left a five-star review and referred two colleagues.",
    "Cannot log in since the password reset; escalated to tier 2.",
    "Billing address differs from shipping address.",
];

fn card(rng: &mut Rng) -> String {
    let mut d: Vec<u8> = vec![4];
    d.extend((0..14).map(|_| rng.below(10) as u8));
    // Luhn check digit.
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let v = if i % 2 == 0 { x as u32 * 2 } else { x as u32 };
            if v > 9 {
                v - 9
            } else {
                v
            }
        })
        .sum();
    d.push(((10 - sum % 10) % 10) as u8);
    let s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
    if rng.chance(50) {
        format!("{} {} {} {}", &s[0..4], &s[4..8], &s[8..12], &s[12..16])
    } else {
        s
    }
}

fn iban(rng: &mut Rng) -> String {
    let bban = rng.digits(18);
    // Check digits for DE: 98 - (BBAN + "DE00" as digits) mod 97.
    let rearranged = format!("{bban}131400");
    let rem = rearranged.bytes().fold(0u32, |r, c| (r * 10 + (c - b'0') as u32) % 97);
    format!("DE{:02}{bban}", 98 - rem)
}

fn notes(rng: &mut Rng, email: &str) -> String {
    let mut s = String::new();
    for _ in 0..1 + rng.below(3) {
        s.push_str(rng.pick(SENTENCES));
        s.push(' ');
    }
    if rng.chance(6) {
        let _ = write!(s, "Also reachable at {email}. ");
    }
    if rng.chance(3) {
        let _ = write!(s, "Paid by card {} exp 0{}/2{}. ", card(rng), 1 + rng.below(9), rng.below(10));
    }
    if rng.chance(3) {
        let _ = write!(s, "Order reference 4{}. ", rng.digits(15));
    }
    if rng.chance(2) {
        let tok: String = (0..36)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[rng.below(62)]))
            .collect();
        let _ = write!(s, "Pasted their token ghp_{tok} into the chat. ");
    }
    if rng.chance(1) {
        let _ = write!(s, "Refund to {}. ", iban(rng));
    }
    if rng.chance(10) {
        let _ = write!(s, "Alt phone +44 20 {} {}. ", rng.digits(4), rng.digits(4));
    }
    s.pop();
    s
}

/// Columns and their PostgreSQL type oids (int4 23, text 25, varchar 1043,
/// date 1082).
const COLUMNS: &[(&str, u32)] = &[
    ("id", 23),
    ("full_name", 25),
    ("email", 1043),
    ("phone", 1043),
    ("street", 25),
    ("city", 25),
    ("postcode", 1043),
    ("country", 1043),
    ("created", 1082),
    ("notes", 25),
];

/// The corpus file: a header line `name:oid,...`, then each row as a
/// DataRow body behind its u32 little-endian length.
fn corpus_bytes(rows: usize) -> Vec<u8> {
    let mut rng = Rng(0x5EED_CAFE);
    let header: Vec<String> = COLUMNS.iter().map(|(n, t)| format!("{n}:{t}")).collect();
    let mut out = header.join(",").into_bytes();
    out.push(b'\n');
    for id in 1..=rows {
        let first = rng.pick(FIRST);
        let last = rng.pick(LAST);
        let email = format!(
            "{}.{}{}@{}",
            first.to_lowercase(),
            last.to_lowercase().replace([' ', '\''], ""),
            rng.below(100),
            rng.pick(DOMAINS)
        );
        let values = [
            id.to_string(),
            format!("{first} {last}"),
            email.clone(),
            format!("+1 {} {} {}", rng.digits(3), rng.digits(3), rng.digits(4)),
            format!("{} {}", 1 + rng.below(300), rng.pick(STREETS)),
            rng.pick(CITIES).to_string(),
            rng.digits(5),
            rng.pick(COUNTRIES).to_string(),
            format!("20{:02}-{:02}-{:02}", 15 + rng.below(10), 1 + rng.below(12), 1 + rng.below(28)),
            notes(&mut rng, &email),
        ];
        let mut body = Vec::new();
        body.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in &values {
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out
}
