//! Column maskers for PostgreSQL results.
//!
//! A column rule names (schema, table, column). A result's RowDescription
//! carries, per field, the source table's oid and the column's attribute
//! number (not the output name, so `email AS x` is still `email`); the
//! protocol module resolves the rules to those numbers once per session
//! with [`catalog_query`] and [`ResolvedColumns::resolve`], builds a
//! [`RowPlan`] per RowDescription and rewrites each DataRow with
//! [`SessionMasker::mask_data_row`].
//!
//! Per field: a masked column in text format is rendered in its mode when
//! its type is textual, else NULL; a masked column in binary format is NULL.
//! Other text values are scanned by the detectors and for credentials; a
//! hit in a value whose type is not textual makes it NULL (a half-masked
//! number or array literal would break the client's parser).
use std::collections::HashMap;

use super::{mode::Whole, spec::NamePattern, Mode, NullAs, Outcome, SessionMasker};

/// A `column:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRule {
    pub schema: NamePattern,
    pub table: NamePattern,
    pub column: NamePattern,
    pub mode: Mode,
}

impl ColumnRule {
    pub fn matches(&self, schema: &str, table: &str, column: &str) -> bool {
        self.schema.matches(schema) && self.table.matches(table) && self.column.matches(column)
    }
}

/// The query that lists the columns the rules name (tables, views,
/// materialized views, foreign and partitioned tables), and the same
/// columns (by name) of the relations that inherit from them (partitions,
/// inheritance children), which report their own oid when read directly;
/// as (nspname, relname, attname) as the rules name them, then (oid,
/// attnum, nspname, relname) of the relation read. `None` without column
/// rules.
pub fn catalog_query(rules: &[ColumnRule]) -> Option<String> {
    if rules.is_empty() {
        return None;
    }
    let mut conds = Vec::new();
    for r in rules {
        let mut parts = Vec::new();
        for (col, p) in [("n.nspname", &r.schema), ("c.relname", &r.table), ("a.attname", &r.column)] {
            if let NamePattern::Exact(name) = p {
                parts.push(format!("{col} = {}", sql_literal(name)));
            }
        }
        conds.push(if parts.is_empty() { "true".to_string() } else { format!("({})", parts.join(" AND ")) });
    }
    Some(format!(
        "WITH RECURSIVE named AS (\
           SELECT n.nspname, c.relname, a.attname, c.oid \
           FROM pg_catalog.pg_attribute a \
           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
           WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'f', 'p') AND ({})), \
         tree(nspname, relname, attname, oid) AS (\
           SELECT nspname, relname, attname, oid FROM named \
           UNION SELECT t.nspname, t.relname, t.attname, i.inhrelid FROM tree t \
             JOIN pg_catalog.pg_inherits i ON i.inhparent = t.oid) \
         SELECT t.nspname, t.relname, t.attname, t.oid, a.attnum, rn.nspname, r.relname FROM tree t \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attname = t.attname \
           AND a.attnum > 0 AND NOT a.attisdropped \
         JOIN pg_catalog.pg_class r ON r.oid = t.oid \
         JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace",
        conds.join(" OR ")
    ))
}

/// A string literal that reads the same whatever
/// `standard_conforming_strings` says.
fn sql_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// One row of the catalog query's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRow {
    /// The names a rule matches: of the relation read, or of the one it
    /// inherits from.
    pub schema: String,
    pub table: String,
    pub column: String,
    /// The relation read.
    pub table_oid: u32,
    pub attnum: i16,
    pub relation: (String, String),
}

/// Column rules resolved to (table oid, attribute number), and the views
/// that read masked columns, masked whole.
#[derive(Debug, Clone, Default)]
pub struct ResolvedColumns {
    modes: HashMap<(u32, i16), Mode>,
    /// Views and materialized views by oid: every column of one is masked.
    relations: HashMap<u32, Mode>,
    /// The (schema, name) of each relation with masked columns.
    names: HashMap<u32, (String, String)>,
}

impl ResolvedColumns {
    /// Where several rules name one column, the strictest mode wins.
    pub fn resolve(rules: &[ColumnRule], rows: impl IntoIterator<Item = CatalogRow>) -> ResolvedColumns {
        let mut modes: HashMap<(u32, i16), Mode> = HashMap::new();
        let mut names = HashMap::new();
        for row in rows {
            for r in rules.iter().filter(|r| r.matches(&row.schema, &row.table, &row.column)) {
                let e = modes.entry((row.table_oid, row.attnum)).or_insert_with(|| r.mode.clone());
                *e = e.clone().stricter(r.mode.clone());
                names.entry(row.table_oid).or_insert_with(|| row.relation.clone());
            }
        }
        ResolvedColumns { modes, relations: HashMap::new(), names }
    }

    /// The relations that hold masked columns, as (oid, schema, name) with
    /// the strictest mode among their columns: the seeds of
    /// [`dependents_query`], and what a statement must not read unmasked.
    pub fn masked_relations(&self) -> Vec<(u32, (String, String), Mode)> {
        let mut by_oid: HashMap<u32, Mode> = HashMap::new();
        for (&(oid, _), mode) in &self.modes {
            stricten(&mut by_oid, oid, mode);
        }
        let mut v: Vec<(u32, (String, String), Mode)> = by_oid
            .into_iter()
            .map(|(oid, mode)| (oid, self.names.get(&oid).cloned().unwrap_or_default(), mode))
            .collect();
        v.sort_by_key(|(oid, _, _)| *oid);
        v
    }

    /// Masks every column of relation `oid` (a view that reads masked
    /// columns) with `mode`, or a stricter mode it already has.
    pub fn mask_relation(&mut self, oid: u32, mode: &Mode) {
        stricten(&mut self.relations, oid, mode);
    }

    /// The mode of column `attnum` of relation `table_oid`, if masked.
    /// Attribute 0 is the whole row (`SELECT u FROM users u`): masked with
    /// the strictest mode of the relation's masked columns.
    pub fn mode(&self, table_oid: u32, attnum: i16) -> Option<Mode> {
        let whole_row = || self.modes.iter().filter(|((oid, _), _)| *oid == table_oid).map(|(_, m)| m);
        let column = match attnum {
            0 => whole_row().cloned().reduce(Mode::stricter),
            _ => self.modes.get(&(table_oid, attnum)).cloned(),
        };
        match (column, self.relations.get(&table_oid)) {
            (Some(a), Some(b)) => Some(a.stricter(b.clone())),
            (a, b) => a.or_else(|| b.cloned()),
        }
    }

    pub fn len(&self) -> usize {
        self.modes.len() + self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modes.is_empty() && self.relations.is_empty()
    }
}

fn stricten(map: &mut HashMap<u32, Mode>, key: u32, mode: &Mode) {
    let e = map.entry(key).or_insert_with(|| mode.clone());
    *e = e.clone().stricter(mode.clone());
}

/// The query that finds the views and materialized views that read a
/// masked relation, directly or through other views, or that call a
/// function of the database's own (which may read anything). A view's
/// columns cannot be traced to the columns it reads (PostgreSQL reports the
/// view's own oid), so all of them are masked, as computed fields of a
/// statement that reads a masked relation are.
///
/// `seeds` are the masked relations as (oid, mode index); the result is
/// (nspname, relname, oid, mode index), the index -1 standing for the
/// strictest mode of all (a view that calls a function, and the planner's
/// statistics, which sample every column). Dependencies come
/// from `pg_depend` on the views' ON SELECT rules; built-in functions are
/// pinned and never listed there, and a view reads through a built-in only
/// by the names it mentions.
pub fn dependents_query(seeds: &[(u32, usize)]) -> String {
    let seed = if seeds.is_empty() {
        "SELECT 0::pg_catalog.oid, 0 WHERE false".to_string()
    } else {
        let values: Vec<String> = seeds.iter().map(|(oid, i)| format!("({oid}::pg_catalog.oid, {i})")).collect();
        format!("VALUES {}", values.join(", "))
    };
    format!(
        "WITH RECURSIVE seed(oid, src) AS ({seed}), \
         uses(rel, oid, kind) AS (\
           SELECT DISTINCT r.ev_class, d.refobjid, d.refclassid FROM pg_catalog.pg_rewrite r \
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid \
           WHERE r.ev_type = '1' AND d.refclassid IN ('pg_catalog.pg_class'::pg_catalog.regclass, 'pg_catalog.pg_proc'::pg_catalog.regclass) \
             AND d.refobjid <> r.ev_class), \
         dep(oid, src, derived) AS (\
           SELECT oid, src, false FROM seed \
           UNION SELECT rel, -1, true FROM uses WHERE kind = 'pg_catalog.pg_proc'::pg_catalog.regclass \
           UNION SELECT oid, -1, true FROM pg_catalog.pg_class \
             WHERE relnamespace = 'pg_catalog'::pg_catalog.regnamespace AND relname IN ({STATISTICS}) \
           UNION SELECT u.rel, dep.src, true FROM dep \
             JOIN uses u ON u.oid = dep.oid AND u.kind = 'pg_catalog.pg_class'::pg_catalog.regclass) \
         SELECT DISTINCT n.nspname, c.relname, c.oid, dep.src FROM dep \
         JOIN pg_catalog.pg_class c ON c.oid = dep.oid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE dep.derived",
        STATISTICS = STATISTICS.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
    )
}

/// The catalogs that hold sample values of every column (most common
/// values, histogram bounds): masked whole with the strictest mode, with
/// the views over them.
const STATISTICS: &[&str] =
    &["pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data"];

/// The strictest mode of the rules whose column part matches one of
/// `names` (column names a query mentions). For computed result fields
/// (table oid 0) such as `upper(email)`, which no (oid, attnum) names.
pub fn strictest_for_names<'a>(rules: &[ColumnRule], names: impl IntoIterator<Item = &'a str>) -> Option<Mode> {
    let mut best: Option<Mode> = None;
    for name in names {
        for r in rules.iter().filter(|r| r.column.matches(name)) {
            best = Some(match best {
                None => r.mode.clone(),
                Some(b) => b.stricter(r.mode.clone()),
            });
        }
    }
    best
}

/// A RowDescription field, as far as masking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDesc {
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    /// Format code 1.
    pub binary: bool,
}

/// PostgreSQL type oids whose text form is free text.
const TEXTUAL: &[u32] = &[
    25,   // text
    1043, // varchar
    1042, // bpchar
    19,   // name
    705,  // unknown (untyped literals)
];
const JSON: u32 = 114;
const JSONB: u32 = 3802;

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldPlan {
    column: Option<Mode>,
    binary: bool,
    kind: ValueKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Text,
    Json,
    /// jsonb in binary: a version byte, then JSON text.
    JsonbBinary,
    /// Text form of another type (numbers, arrays, dates...).
    OtherText,
    /// Binary form of another type: not inspected.
    Opaque,
}

/// How to mask each field of one result's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    fields: Vec<FieldPlan>,
}

impl RowPlan {
    /// `computed`: the mode for fields with no source column (table oid 0),
    /// when the query mentions a masked column (see [`strictest_for_names`]).
    pub fn new(columns: &ResolvedColumns, fields: &[FieldDesc], computed: Option<&Mode>) -> RowPlan {
        let fields = fields
            .iter()
            .map(|f| {
                let column = if f.table_oid == 0 { computed.cloned() } else { columns.mode(f.table_oid, f.attnum) };
                let kind = match (f.binary, f.type_oid) {
                    (_, t) if TEXTUAL.contains(&t) => ValueKind::Text,
                    (_, JSON) => ValueKind::Json,
                    (false, JSONB) => ValueKind::Json,
                    (true, JSONB) => ValueKind::JsonbBinary,
                    (false, _) => ValueKind::OtherText,
                    (true, _) => ValueKind::Opaque,
                };
                FieldPlan { column, binary: f.binary, kind }
            })
            .collect();
        RowPlan { fields }
    }

    /// Whether rows under this plan can need masking at all.
    pub fn masks_anything(&self, m: &SessionMasker) -> bool {
        self.fields.iter().any(|f| f.column.is_some()) || (m.scans_text() && !self.fields.is_empty())
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    #[error("DataRow is truncated or malformed")]
    Malformed,
    #[error("DataRow has {got} fields, its RowDescription {want}")]
    FieldCount { got: usize, want: usize },
}

impl SessionMasker {
    /// Masks one DataRow message body (after the type byte and length:
    /// int16 count, then per field int32 length, -1 for NULL, and bytes).
    /// Writes the new body to `out` and returns true when something was
    /// masked; else leaves `out` as it was and the original can be sent.
    pub fn mask_data_row(&mut self, plan: &RowPlan, body: &[u8], out: &mut Vec<u8>) -> Result<bool, RowError> {
        let start = out.len();
        let r = self.rewrite_row(plan, body, out);
        if !matches!(r, Ok(true)) {
            out.truncate(start);
        }
        r
    }

    fn rewrite_row(&mut self, plan: &RowPlan, body: &[u8], out: &mut Vec<u8>) -> Result<bool, RowError> {
        let count = i16::from_be_bytes(body.get(..2).ok_or(RowError::Malformed)?.try_into().expect("2 bytes"));
        if count < 0 || count as usize != plan.fields.len() {
            return Err(RowError::FieldCount { got: count.max(0) as usize, want: plan.fields.len() });
        }
        // Where each value lies in `body` (None: NULL). The buffers are
        // the session's, kept from row to row: no allocation per row.
        let mut spans = std::mem::take(&mut self.row.spans);
        spans.clear();
        let mut pos = 2;
        for _ in &plan.fields {
            let len = i32::from_be_bytes(body.get(pos..pos + 4).ok_or(RowError::Malformed)?.try_into().expect("4"));
            pos += 4;
            if len < 0 {
                spans.push(ValueSpan { body: None, joined: None });
                continue;
            }
            let end = pos.checked_add(len as usize).filter(|&e| e <= body.len()).ok_or(RowError::Malformed)?;
            spans.push(ValueSpan { body: Some((pos, end)), joined: None });
            pos = end;
        }
        if pos != body.len() {
            return Err(RowError::Malformed);
        }
        // The text values to scan, scanned together: joined by NUL, which
        // no built-in pattern crosses, so one pass serves the whole row.
        let mut joined = std::mem::take(&mut self.row.text);
        joined.clear();
        if self.scans_text() {
            for (f, span) in plan.fields.iter().zip(spans.iter_mut()) {
                if let (None, ValueKind::Text | ValueKind::OtherText, Some((a, b))) = (&f.column, f.kind, span.body) {
                    span.joined = Some((joined.len(), joined.len() + (b - a)));
                    joined.extend_from_slice(&body[a..b]);
                    joined.push(0);
                }
            }
        }
        let mut found = Vec::new();
        let mut batched = !joined.is_empty();
        if batched {
            self.collect(&joined);
            found = std::mem::take(&mut self.found);
            // A custom pattern may cross a NUL: then value by value.
            batched = found.iter().all(|f| !joined[f.start..f.end].contains(&0));
        }
        out.extend_from_slice(&body[..2]);
        let mut changed = false;
        let mut value_buf = std::mem::take(&mut self.row.value);
        let mut next = 0; // index into `found`
        for (f, span) in plan.fields.iter().zip(&spans) {
            let Some((a, b)) = span.body else {
                out.extend_from_slice(&(-1i32).to_be_bytes());
                continue;
            };
            let value = &body[a..b];
            value_buf.clear();
            let field = match span.joined {
                Some((ja, jb)) if batched => {
                    let first = next;
                    while next < found.len() && found[next].start < jb {
                        next += 1;
                    }
                    let mine = &found[first..next];
                    if mine.is_empty() {
                        Field::Keep
                    } else if mine.iter().any(|m| *self.plan().mode_of(m.kind).0 == Mode::Null)
                        || f.kind == ValueKind::OtherText
                    {
                        Field::Null
                    } else {
                        self.render(&joined, mine, ja, jb, &mut value_buf);
                        Field::Replace
                    }
                }
                _ => self.mask_field(f, value, &mut value_buf),
            };
            match field {
                Field::Keep => {
                    out.extend_from_slice(&((b - a) as i32).to_be_bytes());
                    out.extend_from_slice(value);
                }
                Field::Null => {
                    changed = true;
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                }
                Field::Replace => {
                    changed = true;
                    out.extend_from_slice(&(value_buf.len() as i32).to_be_bytes());
                    out.extend_from_slice(&value_buf);
                }
            }
        }
        found.clear();
        self.found = found;
        self.row = RowScratch { text: joined, spans, value: value_buf };
        Ok(changed)
    }

    fn mask_field(&mut self, f: &FieldPlan, value: &[u8], out: &mut Vec<u8>) -> Field {
        if let Some(mode) = &f.column {
            if f.binary || f.kind != ValueKind::Text {
                return Field::Null;
            }
            return match self.render_whole(mode, value, out) {
                Whole::Null => Field::Null,
                Whole::Text => Field::Replace,
            };
        }
        if !self.scans_text() {
            return Field::Keep;
        }
        let outcome = match f.kind {
            ValueKind::Opaque => return Field::Keep,
            ValueKind::Text | ValueKind::OtherText => self.mask_text(value, NullAs::Whole, out),
            ValueKind::Json => self.mask_json(value, out),
            ValueKind::JsonbBinary => match value.split_first() {
                Some((&1, json)) => {
                    out.push(1);
                    match self.mask_json(json, out) {
                        Outcome::Unchanged => {
                            out.clear();
                            Outcome::Unchanged
                        }
                        other => other,
                    }
                }
                // An unknown jsonb version: cannot be read, so not shown.
                _ => Outcome::Null,
            },
        };
        match outcome {
            Outcome::Unchanged => Field::Keep,
            Outcome::Null => Field::Null,
            Outcome::Masked if f.kind == ValueKind::OtherText => Field::Null,
            Outcome::Masked => Field::Replace,
        }
    }
}

enum Field {
    Keep,
    Null,
    Replace,
}

/// Where a DataRow value lies: in the body, and in the joined text when it
/// is scanned there.
#[derive(Debug, Clone, Copy)]
pub(super) struct ValueSpan {
    body: Option<(usize, usize)>,
    joined: Option<(usize, usize)>,
}

/// A session's buffers for rewriting rows, reused from row to row.
#[derive(Debug, Default)]
pub(super) struct RowScratch {
    /// The row's text values, joined for one scan.
    text: Vec<u8>,
    spans: Vec<ValueSpan>,
    /// One masked value.
    value: Vec<u8>,
}

/// Builds a DataRow body (tests and benchmarks).
pub fn data_row_body(values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        match v {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
        }
    }
    b
}

/// Splits a DataRow body into its values (tests and benchmarks).
pub fn data_row_values(body: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut pos = 2;
    let mut out = Vec::new();
    for _ in 0..count {
        let len = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(body.get(pos..pos + len as usize)?.to_vec()));
            pos += len as usize;
        }
    }
    (pos == body.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::super::{spec, tests::masker};
    use super::*;

    fn rules(entries: &[&str]) -> Vec<ColumnRule> {
        entries
            .iter()
            .map(|e| match spec::parse_rule(e, &[]).unwrap() {
                spec::MaskRule::Column { schema, table, column, mode } => ColumnRule { schema, table, column, mode },
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn row(schema: &str, table: &str, column: &str, oid: u32, attnum: i16) -> CatalogRow {
        let relation = (schema.to_string(), table.to_string());
        CatalogRow {
            schema: schema.into(),
            table: table.into(),
            column: column.into(),
            table_oid: oid,
            attnum,
            relation,
        }
    }

    #[test]
    fn catalog_query_quotes_names() {
        let q =
            catalog_query(&rules(&["column:public.users.email", r#"column:"it's"."a\b""#, "column:password"])).unwrap();
        assert!(q.contains("(n.nspname = 'public' AND c.relname = 'users' AND a.attname = 'email')"), "{q}");
        assert!(q.contains(r"(c.relname = 'it''s' AND a.attname = E'a\\b')"), "{q}");
        assert!(q.contains("OR (a.attname = 'password')"), "{q}");
        // The columns of the same name in the relations that inherit.
        assert!(q.contains("JOIN pg_catalog.pg_inherits i ON i.inhparent = t.oid"), "{q}");
        assert!(q.contains("a.attname = t.attname"), "{q}");
        assert!(catalog_query(&[]).is_none());
    }

    #[test]
    fn resolution_by_names_and_strictest_mode() {
        let r = rules(&["column:public.users.email=partial:4", "column:email=hash", "column:*.*.ssn=null"]);
        let cols = ResolvedColumns::resolve(
            &r,
            [
                row("public", "users", "email", 100, 3),
                row("crm", "contacts", "email", 200, 2),
                row("public", "users", "ssn", 100, 5),
                row("public", "users", "name", 100, 2),
            ],
        );
        assert_eq!(cols.mode(100, 3), Some(Mode::Hash));
        assert_eq!(cols.mode(200, 2), Some(Mode::Hash));
        assert_eq!(cols.mode(100, 5), Some(Mode::Null));
        assert_eq!(cols.mode(100, 2), None);
        assert_eq!(cols.mode(100, 0), Some(Mode::Null), "the whole row: the strictest of its masked columns");
        assert_eq!(cols.mode(300, 0), None);
        assert_eq!(strictest_for_names(&r, ["id", "email"]), Some(Mode::Hash));
        assert_eq!(strictest_for_names(&r, ["ssn", "email"]), Some(Mode::Null));
        assert_eq!(strictest_for_names(&r, ["id"]), None);
    }

    #[test]
    fn views_over_masked_relations_are_masked_whole() {
        let r = rules(&["column:public.users.email=partial:4", "column:users.ssn=hash", "column:cards.number"]);
        let mut cols = ResolvedColumns::resolve(
            &r,
            [
                row("public", "users", "email", 100, 3),
                row("public", "users", "ssn", 100, 5),
                row("public", "cards", "number", 300, 2),
            ],
        );
        // The seeds: each masked relation with its strictest mode.
        let named = |s: &str, t: &str| (s.to_string(), t.to_string());
        assert_eq!(
            cols.masked_relations(),
            vec![(100, named("public", "users"), Mode::Hash), (300, named("public", "cards"), Mode::Redact(None))]
        );
        let q = dependents_query(&[(100, 0), (300, 1)]);
        assert!(q.contains("VALUES (100::pg_catalog.oid, 0), (300::pg_catalog.oid, 1)"), "{q}");
        assert!(dependents_query(&[]).contains("WHERE false"));
        assert!(q.contains("relname IN ('pg_stats', 'pg_stats_ext', 'pg_stats_ext_exprs', 'pg_statistic', "), "{q}");
        cols.mask_relation(200, &Mode::Partial(4));
        assert_eq!(cols.mode(200, 1), Some(Mode::Partial(4)));
        assert_eq!(cols.mode(200, 7), Some(Mode::Partial(4)), "every column of the view");
        // A view column with its own rule keeps the stricter of the two.
        cols.mask_relation(100, &Mode::Null);
        assert_eq!(cols.mode(100, 3), Some(Mode::Null));
        assert_eq!(cols.mode(100, 2), Some(Mode::Null));
        assert_eq!(cols.mode(400, 1), None);
        assert_eq!(cols.len(), 5);
    }

    fn field(table_oid: u32, attnum: i16, type_oid: u32, binary: bool) -> FieldDesc {
        FieldDesc { table_oid, attnum, type_oid, binary }
    }

    fn masked(m: &mut SessionMasker, plan: &RowPlan, values: &[Option<&str>]) -> Option<Vec<Option<String>>> {
        let vals: Vec<Option<&[u8]>> = values.iter().map(|v| v.map(str::as_bytes)).collect();
        let body = data_row_body(&vals);
        let mut out = Vec::new();
        if !m.mask_data_row(plan, &body, &mut out).unwrap() {
            assert!(out.is_empty());
            return None;
        }
        Some(data_row_values(&out).unwrap().into_iter().map(|v| v.map(|v| String::from_utf8(v).unwrap())).collect())
    }

    #[test]
    fn rows_are_masked_by_column_and_by_detector() {
        let mut m = masker(&["column:public.users.email", "column:users.phone=partial:4", "detector:card"], &[], &[]);
        let cols = ResolvedColumns::resolve(
            m.plan().column_rules(),
            [row("public", "users", "email", 100, 3), row("public", "users", "phone", 100, 4)],
        );
        let plan = RowPlan::new(
            &cols,
            &[field(100, 1, 23, false), field(100, 3, 25, false), field(100, 4, 1043, false), field(0, 0, 25, false)],
            None,
        );
        assert!(plan.masks_anything(&m));
        assert_eq!(
            masked(&mut m, &plan, &[Some("1"), Some("ann@x.io"), Some("+1 555 0100"), Some("paid 4111111111111111")]),
            Some(vec![Some("1".into()), Some("****".into()), Some("+* *** 0100".into()), Some("paid <card>".into())])
        );
        // NULLs stay NULL; a non-Luhn number is not a card.
        assert_eq!(masked(&mut m, &plan, &[Some("2"), None, None, Some("id 4111111111111112")]), None);
    }

    #[test]
    fn binary_and_non_text_values_of_masked_columns_become_null() {
        let mut m = masker(&["column:users.email=hash", "column:users.age", "detector:card"], &[], &[]);
        let cols = ResolvedColumns::resolve(
            m.plan().column_rules(),
            [row("public", "users", "email", 100, 3), row("public", "users", "age", 100, 6)],
        );
        let plan = RowPlan::new(
            &cols,
            &[field(100, 3, 25, true), field(100, 6, 23, false), field(0, 0, 20, false), field(0, 0, 17, true)],
            None,
        );
        assert_eq!(
            masked(&mut m, &plan, &[Some("ann@x.io"), Some("42"), Some("4111111111111111"), Some("4111111111111111")]),
            // int8 holding a card number: a hit in a number nulls it; bytea
            // in binary is not inspected.
            Some(vec![None, None, None, Some("4111111111111111".into())])
        );
    }

    #[test]
    fn computed_fields_take_the_mode_given() {
        let mut m = masker(&["column:users.email"], &[], &[]);
        let plan = RowPlan::new(&ResolvedColumns::default(), &[field(0, 0, 25, false)], Some(&Mode::Null));
        assert_eq!(masked(&mut m, &plan, &[Some("ANN@X.IO")]), Some(vec![None]));
        let plan = RowPlan::new(&ResolvedColumns::default(), &[field(0, 0, 25, false)], None);
        assert!(!plan.masks_anything(&m));
        assert_eq!(masked(&mut m, &plan, &[Some("ANN@X.IO")]), None);
    }

    #[test]
    fn json_values_and_credentials() {
        let mut m = masker(&["detector:email"], &[], &["app-db-Passw0rd"]);
        let plan = RowPlan::new(
            &ResolvedColumns::default(),
            &[field(0, 0, 3802, false), field(0, 0, 3802, true), field(0, 0, 25, false)],
            None,
        );
        let body = data_row_body(&[
            Some(br#"{"m": "a@b.io"}"#),
            Some(b"\x01{\"m\": \"a@b.io\"}"),
            Some(b"pw app-db-Passw0rd"),
        ]);
        let mut out = Vec::new();
        assert!(m.mask_data_row(&plan, &body, &mut out).unwrap());
        let v = data_row_values(&out).unwrap();
        assert_eq!(v[0].as_deref(), Some(&br#"{"m": "<email>"}"#[..]));
        assert_eq!(v[1].as_deref(), Some(&b"\x01{\"m\": \"<email>\"}"[..]));
        assert_eq!(v[2].as_deref(), Some(&b"pw <credential>"[..]));
    }

    #[test]
    fn a_row_is_scanned_at_once_without_matches_across_values() {
        // A custom pattern that could span two values if they were one text.
        let mut m = masker(&["detector:email", "detector:span"], &[("span", "x[^y]*z")], &[]);
        let plan = RowPlan::new(&ResolvedColumns::default(), &[field(0, 0, 25, false), field(0, 0, 25, false)], None);
        assert_eq!(masked(&mut m, &plan, &[Some("x1"), Some("2z")]), None);
        assert_eq!(
            masked(&mut m, &plan, &[Some("x1 a@b.io"), Some("x2z")]),
            Some(vec![Some("x1 <email>".into()), Some("<span>".into())])
        );
    }

    #[test]
    fn malformed_rows_are_errors() {
        let mut m = masker(&["detector:email"], &[], &[]);
        let plan = RowPlan::new(&ResolvedColumns::default(), &[field(0, 0, 25, false)], None);
        let mut out = Vec::new();
        assert_eq!(m.mask_data_row(&plan, &[0, 1, 0, 0, 0, 9, b'a'], &mut out), Err(RowError::Malformed));
        assert_eq!(
            m.mask_data_row(&plan, &data_row_body(&[None, None]), &mut out),
            Err(RowError::FieldCount { got: 2, want: 1 })
        );
        let mut body = data_row_body(&[Some(b"x")]);
        body.push(0);
        assert_eq!(m.mask_data_row(&plan, &body, &mut out), Err(RowError::Malformed));
        assert!(out.is_empty());
    }
}
