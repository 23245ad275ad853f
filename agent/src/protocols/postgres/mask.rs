//! Response masking for PostgreSQL sessions: the role's column rules,
//! resolved once per session to (table oid, attribute number) with a
//! catalog query on the upstream connection, and the session's masker over
//! DataRows, COPY rows, and the text of errors and notices.
//!
//! The rule for computed result fields (table oid 0: `upper(email)`,
//! `email || ''`, `row_to_json(u)`, aggregates) is decided per statement on
//! the request side ([`Columns::computed`]): when the statement reads a
//! relation that a column rule names (any column of it), or calls a
//! function that is not a known built-in, or fetches from a cursor, every
//! computed field of its results is masked with the strictest mode among
//! the rules concerned (NULL where the field's type is not text). An alias
//! of a plain column keeps its table oid and attribute number and is masked
//! as the column. COPY TO STDOUT from a relation with masked columns is
//! refused (use SELECT); other COPY output is scanned row by row by the
//! detectors, and binary COPY output cannot be scanned, so it ends the
//! session when the role has detectors.
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    classify::{class, StatementInfo},
    rows::Column,
    wire::{self, FrameReader},
};
use crate::masking::{
    column::{catalog_query, dependents_query, CatalogRow, ColumnRule, FieldDesc, ResolvedColumns, RowPlan},
    Mode, NullAs, Outcome, SessionMasker,
};

/// The request side's view of the column rules.
#[derive(Debug, Default)]
pub struct Columns {
    rules: Vec<ColumnRule>,
    /// Relations with masked columns by their own names, as (schema, name,
    /// mode): partitions and children of a table a rule names, and views
    /// that read masked columns. Reading one is reading a masked relation.
    relations: Vec<(String, String, Mode)>,
}

impl Columns {
    pub fn new(rules: &[ColumnRule], relations: Vec<(String, String, Mode)>) -> Columns {
        Columns { rules: rules.to_vec(), relations }
    }

    fn strictest<'a>(modes: impl Iterator<Item = &'a Mode>) -> Option<Mode> {
        modes.fold(None, |best: Option<Mode>, m| {
            Some(match best {
                None => m.clone(),
                Some(b) => b.stricter(m.clone()),
            })
        })
    }

    /// The modes of the rules whose relation part names one of the
    /// statement's tables, and of the other masked relations among them.
    fn on_tables<'a>(&'a self, info: &'a StatementInfo) -> impl Iterator<Item = &'a Mode> + 'a {
        let names = || {
            info.tables.iter().map(|t| {
                let (schema, table) = t.split_once('.').unwrap_or(("public", t.as_str()));
                (schema, table)
            })
        };
        let rules = self
            .rules
            .iter()
            .filter(move |r| names().any(|(schema, table)| r.schema.matches(schema) && r.table.matches(table)))
            .map(|r| &r.mode);
        let relations = self
            .relations
            .iter()
            .filter(move |(vs, vt, _)| names().any(|(schema, table)| vs == schema && vt == table))
            .map(|(_, _, m)| m);
        rules.chain(relations)
    }

    /// The mode for computed result fields (table oid 0) of a statement.
    pub fn computed(&self, info: &StatementInfo) -> Option<Mode> {
        if self.rules.is_empty() {
            return None;
        }
        let opaque = info.kind == "FETCH"
            || info.kind == "EXECUTE"
            || info.functions.iter().any(|f| f.class == Some(class::FUNCTION_CALL) || f.class == Some(class::SERVER));
        if opaque {
            return self.unknown();
        }
        Self::strictest(self.on_tables(info))
    }

    /// The mode for computed fields of rows whose statement is unknown
    /// here (an SQL cursor's portal): the strictest of all.
    pub fn unknown(&self) -> Option<Mode> {
        Self::strictest(self.rules.iter().map(|r| &r.mode))
    }

    /// Whether the statement copies out of a relation with masked columns.
    pub fn copy_refused(&self, info: &StatementInfo) -> bool {
        info.all_classes().contains(class::COPY_OUT) && self.on_tables(info).next().is_some()
    }
}

/// What a session's column rules resolve to: the columns for the response
/// side, and for the request side the relations with masked columns by
/// their own names (partitions and children of a named table, views that
/// read one).
pub struct Resolved {
    pub columns: ResolvedColumns,
    pub relations: Vec<(String, String, Mode)>,
}

/// Runs the catalog queries for `rules` on a started upstream session: the
/// columns the rules name (and those columns in partitions and inheritance
/// children), then the views that read them (masked whole).
/// Errors name what went wrong (nothing of the data).
pub async fn resolve<S>(up: &mut FrameReader<S>, rules: &[ColumnRule]) -> Result<Resolved, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(sql) = catalog_query(rules) else {
        return Ok(Resolved { columns: ResolvedColumns::default(), relations: Vec::new() });
    };
    let mut rows = Vec::new();
    for values in catalog_rows(up, &sql, 7).await? {
        rows.push(CatalogRow {
            schema: values[0].clone(),
            table: values[1].clone(),
            column: values[2].clone(),
            table_oid: values[3].parse().map_err(|_| "catalog query: bad oid")?,
            attnum: values[4].parse().map_err(|_| "catalog query: bad attnum")?,
            relation: (values[5].clone(), values[6].clone()),
        });
    }
    let mut columns = ResolvedColumns::resolve(rules, rows);
    let seeds = columns.masked_relations();
    let strictest = Columns::strictest(rules.iter().map(|r| &r.mode)).expect("rules are not empty");
    let indexed: Vec<(u32, usize)> = seeds.iter().enumerate().map(|(i, (oid, _, _))| (*oid, i)).collect();
    // Partitions and inheritance children are read under their own names.
    let mut relations: Vec<(String, String, Mode)> =
        seeds.iter().map(|(_, (schema, name), mode)| (schema.clone(), name.clone(), mode.clone())).collect();
    for values in catalog_rows(up, &dependents_query(&indexed), 4).await? {
        let oid: u32 = values[2].parse().map_err(|_| "catalog query: bad oid")?;
        let src: i64 = values[3].parse().map_err(|_| "catalog query: bad index")?;
        let mode = match usize::try_from(src) {
            Ok(i) => &seeds.get(i).ok_or("catalog query: bad index")?.2,
            Err(_) => &strictest,
        };
        columns.mask_relation(oid, mode);
        relations.push((values[0].clone(), values[1].clone(), mode.clone()));
    }
    Ok(Resolved { columns, relations })
}

/// Runs one catalog query; its rows as text, each with `width` non-NULL
/// values.
async fn catalog_rows<S>(up: &mut FrameReader<S>, sql: &str, width: usize) -> Result<Vec<Vec<String>>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    wire::query(&mut out, sql);
    wire::send(up.get_mut(), &out).await.map_err(|e| format!("catalog query: {e}"))?;
    let mut rows = Vec::new();
    let mut failed = None;
    loop {
        let frame = up.next().await.map_err(|e| format!("catalog query: {e}"))?;
        let Some(frame) = frame else { return Err("the upstream closed during the catalog query".into()) };
        match frame.tag {
            b'D' => {
                let values =
                    crate::masking::column::data_row_values(frame.body()).ok_or("catalog query: malformed row")?;
                let row: Option<Vec<String>> = values
                    .into_iter()
                    .map(|v| v.map(|v| String::from_utf8_lossy(&v).into_owned()))
                    .collect::<Option<_>>()
                    .filter(|r: &Vec<String>| r.len() == width);
                rows.push(row.ok_or("catalog query: missing value")?);
            }
            b'E' => {
                let m = wire::error_field(frame.body(), b'C').map(|c| String::from_utf8_lossy(c).into_owned());
                failed = Some(format!("catalog query failed (SQLSTATE {})", m.unwrap_or_default()));
            }
            b'Z' => break,
            _ => {}
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}

/// A row plan built for a shape (by pointer) and computed-field mode, and
/// whether it masks anything.
type CachedPlan = (Arc<[Column]>, Option<Mode>, RowPlan, bool);

/// The response side's masker.
pub struct RowMasker {
    masker: SessionMasker,
    columns: ResolvedColumns,
    /// The last plan built, for the shape (by pointer) and computed mode.
    plan: Option<CachedPlan>,
    scratch: Vec<u8>,
}

impl RowMasker {
    pub fn new(masker: SessionMasker, columns: ResolvedColumns) -> RowMasker {
        RowMasker { masker, columns, plan: None, scratch: Vec::new() }
    }

    /// Whether any text is scanned (detectors or injected credentials).
    pub fn scans_text(&self) -> bool {
        self.masker.scans_text()
    }

    /// Masks one DataRow (whole frame in `raw`, body in `body`) of the given
    /// shape into `out`. `None` shape: the columns are not known, so every
    /// value is withheld (NULL).
    pub fn data_row(
        &mut self,
        shape: Option<&Arc<[Column]>>,
        computed: Option<&Mode>,
        raw: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), String> {
        let body = &raw[5..];
        let Some(shape) = shape else {
            return all_null(body, out);
        };
        let fresh = match &self.plan {
            Some((s, c, _, _)) => !Arc::ptr_eq(s, shape) || c.as_ref() != computed,
            None => true,
        };
        if fresh {
            let fields: Vec<FieldDesc> = shape
                .iter()
                .map(|c| FieldDesc {
                    table_oid: c.table_oid,
                    attnum: c.attnum,
                    type_oid: c.type_oid,
                    binary: c.format == 1,
                })
                .collect();
            let plan = RowPlan::new(&self.columns, &fields, computed);
            let any = plan.masks_anything(&self.masker);
            self.plan = Some((shape.clone(), computed.cloned(), plan, any));
        }
        let (_, _, plan, any) = self.plan.as_ref().expect("just built");
        if !any {
            out.extend_from_slice(raw);
            return Ok(());
        }
        self.scratch.clear();
        match self.masker.mask_data_row(plan, body, &mut self.scratch) {
            Ok(false) => out.extend_from_slice(raw),
            Ok(true) => {
                out.extend_from_slice(b"D");
                out.extend_from_slice(&((self.scratch.len() + 4) as i32).to_be_bytes());
                out.extend_from_slice(&self.scratch);
            }
            Err(e) => return Err(e.to_string()),
        }
        Ok(())
    }

    /// Masks a FunctionCallResponse (`raw`). Its value has no column to
    /// trace and its format is the caller's choice: with column rules it is
    /// withheld (NULL); else a value in which a detector or a credential is
    /// found is withheld.
    pub fn function_result(&mut self, raw: &[u8], out: &mut BytesMut) {
        let body = &raw[5..];
        let withhold = match body.get(4..) {
            Some(value) if body.len() >= 4 && i32::from_be_bytes(body[..4].try_into().expect("4 bytes")) >= 0 => {
                !self.columns.is_empty() || {
                    self.scratch.clear();
                    self.masker.mask_text(value, NullAs::Whole, &mut self.scratch) != Outcome::Unchanged
                }
            }
            _ => false,
        };
        if withhold {
            out.extend_from_slice(&[b'V', 0, 0, 0, 8]);
            out.extend_from_slice(&(-1i32).to_be_bytes());
        } else {
            out.extend_from_slice(raw);
        }
    }

    /// Masks one text COPY row in place of `raw` (a CopyData frame).
    pub fn copy_row(&mut self, raw: &[u8], out: &mut BytesMut) {
        self.scratch.clear();
        match self.masker.mask_text(&raw[5..], NullAs::Remove, &mut self.scratch) {
            Outcome::Masked => {
                out.extend_from_slice(b"d");
                out.extend_from_slice(&((self.scratch.len() + 4) as i32).to_be_bytes());
                out.extend_from_slice(&self.scratch);
            }
            Outcome::Unchanged | Outcome::Null => out.extend_from_slice(raw),
        }
    }

    /// Scrubs the fields of an ErrorResponse or NoticeResponse (`raw`).
    /// `strict`: the statement read masked columns, whose values an error
    /// can quote (`invalid input syntax for type integer: "..."`): quoted
    /// text in the message is redacted, and the detail, context and query
    /// fields are withheld.
    pub fn fields(&mut self, tag: u8, raw: &[u8], strict: bool, out: &mut BytesMut) {
        let body = &raw[5..];
        let mut changed = false;
        let mut fields: Vec<(u8, Vec<u8>)> = Vec::new();
        for (code, value) in wire::error_fields(body) {
            if strict {
                match code {
                    b'D' | b'W' | b'q' | b'H' => {
                        changed = true;
                        fields.push((code, b"(withheld by portcullis: the statement read masked columns)".to_vec()));
                        continue;
                    }
                    b'M' if value.contains(&b'"') => {
                        changed = true;
                        let quoted = redact_quoted(value);
                        let mut masked = Vec::new();
                        match self.masker.mask_text(&quoted, NullAs::Remove, &mut masked) {
                            Outcome::Masked => fields.push((code, masked)),
                            Outcome::Unchanged | Outcome::Null => fields.push((code, quoted)),
                        }
                        continue;
                    }
                    _ => {}
                }
            }
            let mut masked = Vec::new();
            match self.masker.mask_text(value, NullAs::Remove, &mut masked) {
                Outcome::Masked => {
                    changed = true;
                    fields.push((code, masked));
                }
                Outcome::Unchanged | Outcome::Null => fields.push((code, value.to_vec())),
            }
        }
        if changed {
            wire::fields_message(out, tag, fields.iter().map(|(c, v)| (*c, v.as_slice())));
        } else {
            out.extend_from_slice(raw);
        }
    }
}

/// Text with everything between double quotes replaced by `****`.
fn redact_quoted(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut inside = false;
    for &b in text {
        if b == b'"' {
            if inside {
                out.extend_from_slice(b"****");
            }
            inside = !inside;
            out.push(b);
        } else if !inside {
            out.push(b);
        }
    }
    if inside {
        out.extend_from_slice(b"****");
    }
    out
}

/// A DataRow with every value NULL, for rows whose columns are unknown.
fn all_null(body: &[u8], out: &mut BytesMut) -> Result<(), String> {
    let n = i16::from_be_bytes(body.get(..2).ok_or("DataRow is truncated")?.try_into().expect("2 bytes"));
    if n < 0 {
        return Err("DataRow has a negative field count".into());
    }
    out.extend_from_slice(b"D");
    out.extend_from_slice(&(4 + 2 + 4 * n as i32).to_be_bytes());
    out.extend_from_slice(&n.to_be_bytes());
    for _ in 0..n {
        out.extend_from_slice(&(-1i32).to_be_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masking::spec::parse_rule;
    use crate::masking::MaskRule;

    fn columns(entries: &[&str]) -> Columns {
        columns_and_views(entries, Vec::new())
    }

    fn columns_and_views(entries: &[&str], views: Vec<(String, String, Mode)>) -> Columns {
        let rules: Vec<ColumnRule> = entries
            .iter()
            .map(|e| match parse_rule(e, &[]).unwrap() {
                MaskRule::Column { schema, table, column, mode } => ColumnRule { schema, table, column, mode },
                other => panic!("{other:?}"),
            })
            .collect();
        Columns::new(&rules, views)
    }

    fn info(sql: &str) -> StatementInfo {
        super::super::classify::classify(sql).unwrap().remove(0)
    }

    #[test]
    fn computed_fields_are_masked_when_a_masked_relation_is_read() {
        let c = columns(&["column:public.users.email=partial:4", "column:public.cards.number=hash"]);
        assert_eq!(c.computed(&info("SELECT upper(email) FROM users")), Some(Mode::Partial(4)));
        assert_eq!(c.computed(&info("SELECT row_to_json(u) FROM users u")), Some(Mode::Partial(4)));
        assert_eq!(
            c.computed(&info("SELECT u.email || c.number FROM users u JOIN cards c ON true")),
            Some(Mode::Hash),
            "the strictest mode of the rules concerned"
        );
        assert_eq!(c.computed(&info("SELECT upper(name) FROM items")), None);
        assert_eq!(c.computed(&info("SELECT my_func()")), Some(Mode::Hash), "unknown functions may read anything");
        assert!(c.copy_refused(&info("COPY users TO STDOUT")));
        assert!(c.copy_refused(&info("COPY (SELECT email FROM users) TO STDOUT")));
        assert!(!c.copy_refused(&info("COPY items TO STDOUT")));
        assert!(!c.copy_refused(&info("SELECT email FROM users")));
        assert_eq!(columns(&[]).computed(&info("SELECT upper(email) FROM users")), None);
    }

    #[test]
    fn views_that_read_masked_columns_count_as_masked_relations() {
        let views = vec![
            ("public".to_string(), "contacts".to_string(), Mode::Partial(4)),
            ("report".to_string(), "Who".to_string(), Mode::Hash),
        ];
        let c = columns_and_views(&["column:public.users.email=partial:4", "column:public.cards.number=hash"], views);
        assert_eq!(c.computed(&info("SELECT upper(contact) FROM contacts")), Some(Mode::Partial(4)));
        assert_eq!(c.computed(&info("SELECT upper(email) FROM report.\"Who\"")), Some(Mode::Hash));
        assert_eq!(c.computed(&info("SELECT upper(email) FROM report.who")), None, "another relation");
        assert!(c.copy_refused(&info("COPY (SELECT * FROM contacts) TO STDOUT")));
        assert!(!c.copy_refused(&info("COPY (SELECT * FROM items) TO STDOUT")));
    }

    #[test]
    fn quoted_text_is_redacted() {
        assert_eq!(
            redact_quoted(br#"invalid input syntax for type integer: "ann@example.io""#),
            br#"invalid input syntax for type integer: "****""#.to_vec()
        );
        assert_eq!(redact_quoted(br#"a "b" c "d"#), br#"a "****" c "****"#.to_vec());
        assert_eq!(redact_quoted(b"no quotes"), b"no quotes".to_vec());
    }

    #[test]
    fn rows_of_unknown_shape_are_withheld() {
        let mut out = BytesMut::new();
        let body = crate::masking::column::data_row_body(&[Some(b"a@b.io"), None]);
        all_null(&body, &mut out).unwrap();
        assert_eq!(&out[..5], &[b'D', 0, 0, 0, 14]);
        assert_eq!(crate::masking::column::data_row_values(&out[5..]).unwrap(), vec![None, None]);
    }
}
