//! SQL classification: what a statement does, in the classes a policy
//! names, and which tables and functions it touches.
//!
//! The parser is sqlparser's PostgreSQL dialect. Every `Statement` variant
//! is matched by name (no catch-all arm), so a new variant in a later
//! sqlparser is a compile error here rather than a silent allow. A statement
//! is as dangerous as the worst thing nested in it: data-modifying CTEs,
//! `SELECT ... INTO`, row locks, `EXPLAIN ANALYZE`, `PREPARE`, functions with
//! side effects. Text that does not parse is not classified at all: the
//! caller denies it.
use std::{collections::BTreeSet, ops::ControlFlow};

use sqlparser::{
    ast::{
        CopySource, CopyTarget, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, ObjectName,
        ObjectNamePart, Query, Set, SetExpr, Statement, TableFactor, Value, Visit, Visitor,
    },
    dialect::PostgreSqlDialect,
    parser::Parser,
};

/// Request classes of the `postgres` protocol (also the names a policy uses).
pub mod class {
    pub const READ: &str = "read";
    pub const WRITE: &str = "write";
    pub const DDL: &str = "ddl";
    pub const DCL: &str = "dcl";
    pub const SESSION: &str = "session";
    pub const TRANSACTION: &str = "transaction";
    pub const COPY_IN: &str = "copy-in";
    pub const COPY_OUT: &str = "copy-out";
    pub const FUNCTION_CALL: &str = "function-call";
    pub const UTILITY: &str = "utility";
    pub const SERVER: &str = "server";
}

/// How deep expressions may nest before the text is refused.
const RECURSION_LIMIT: usize = 48;

/// Longest SQL text classified; longer text is refused (a query this long is
/// not something an agent needs, and parsing it costs).
pub const MAX_SQL_LEN: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("SQL does not parse: {0}")]
    Parse(String),
    #[error("SQL text longer than {MAX_SQL_LEN} bytes")]
    TooLong,
}

/// A function a statement calls, and the class calling it carries of its
/// own (`None`: a built-in known to only read).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FunctionUse {
    /// `schema.name`, case-folded as PostgreSQL does.
    pub name: String,
    pub class: Option<&'static str>,
}

/// Effects on the session's prepared-statement namespace (shared by SQL
/// `PREPARE`/`EXECUTE` and the protocol's Parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    None,
    /// `PREPARE name AS ...`: the statement's classification is that of the
    /// prepared statement.
    Prepare(String),
    /// `EXECUTE name`: the session substitutes what `name` was prepared as.
    Execute(String),
    Deallocate(Option<String>),
    /// `DISCARD ALL` and `DEALLOCATE ALL`.
    DiscardAll,
}

/// One classified statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementInfo {
    /// What it is, e.g. `SELECT`, `INSERT`, `CREATE TABLE`.
    pub kind: &'static str,
    /// The statement as re-rendered by the parser.
    pub sql: String,
    /// Classes of its own (functions carry theirs in `functions`).
    pub classes: BTreeSet<&'static str>,
    /// Tables (and other relations) it names: `schema.name`.
    pub tables: BTreeSet<String>,
    pub functions: BTreeSet<FunctionUse>,
    pub namespace: Namespace,
    /// Set when the statement is not PostgreSQL at all (a construct of
    /// another dialect the parser also accepts): always denied.
    pub foreign: bool,
}

impl StatementInfo {
    fn new(kind: &'static str, sql: String) -> StatementInfo {
        StatementInfo {
            kind,
            sql,
            classes: BTreeSet::new(),
            tables: BTreeSet::new(),
            functions: BTreeSet::new(),
            namespace: Namespace::None,
            foreign: false,
        }
    }

    /// Every class the statement carries, functions' included.
    pub fn all_classes(&self) -> BTreeSet<&'static str> {
        let mut all = self.classes.clone();
        all.extend(self.functions.iter().filter_map(|f| f.class));
        all
    }

    /// Merges another statement's findings into this one (a statement is as
    /// dangerous as everything nested in it).
    pub fn absorb(&mut self, other: &StatementInfo) {
        self.classes.extend(other.classes.iter().copied());
        self.tables.extend(other.tables.iter().cloned());
        self.functions.extend(other.functions.iter().cloned());
        self.foreign |= other.foreign;
    }
}

/// Parses and classifies SQL text (one or more statements).
pub fn classify(sql: &str) -> Result<Vec<StatementInfo>, ClassifyError> {
    if sql.len() > MAX_SQL_LEN {
        return Err(ClassifyError::TooLong);
    }
    let dialect = PostgreSqlDialect {};
    let statements = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| ClassifyError::Parse(e.to_string()))?;
    Ok(statements.iter().map(classify_statement).collect())
}

/// Classifies one parsed statement.
/// A statement's shape for widened approvals: the statement as the parser
/// renders it with every literal replaced by `?`, so that statements that
/// differ only in their values are "the same statement". Text that does
/// not parse is its own shape.
pub fn shape(sql: &str) -> String {
    let dialect = PostgreSqlDialect {};
    let parsed = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements());
    match parsed {
        Ok(mut statements) => {
            let _ = sqlparser::ast::visit_expressions_mut(&mut statements, |e| {
                if let Expr::Value(v) = e {
                    v.value = Value::Placeholder("?".into());
                }
                ControlFlow::<()>::Continue(())
            });
            statements.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("; ")
        }
        Err(_) => sql.to_string(),
    }
}

pub fn classify_statement(stmt: &Statement) -> StatementInfo {
    let mut info = StatementInfo::new(kind_of(stmt), stmt.to_string());
    own_classes(stmt, &mut info);
    named_relations(stmt, &mut info);
    let mut walker = Walker { info: &mut info, skip: Vec::new() };
    let _ = stmt.visit(&mut walker);
    info
}

/// The classes of the statement itself, by kind (nested queries and
/// functions are found by the walker).
fn own_classes(stmt: &Statement, info: &mut StatementInfo) {
    use class::*;
    let c = &mut info.classes;
    match stmt {
        Statement::Query(_) => {
            c.insert(READ);
        }
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_) => {
            c.insert(WRITE);
        }
        Statement::Truncate(_) => {
            c.insert(WRITE);
        }
        Statement::Copy { source, to, target, .. } => {
            match (to, target) {
                (true, CopyTarget::Stdout) => c.insert(COPY_OUT),
                (false, CopyTarget::Stdin) => c.insert(COPY_IN),
                // A file or program on the database host.
                (true, _) => {
                    c.insert(COPY_OUT);
                    c.insert(SERVER)
                }
                (false, _) => {
                    c.insert(COPY_IN);
                    c.insert(SERVER)
                }
            };
            if let CopySource::Table { table_name, .. } = source {
                // The walker does not see COPY's table.
                info.tables.extend(relation_names(table_name));
            }
        }
        Statement::Explain { analyze, statement, .. } => {
            c.insert(READ);
            if *analyze {
                // EXPLAIN ANALYZE runs the statement.
                let inner = classify_statement(statement);
                info.absorb(&inner);
                info.namespace = Namespace::None;
            }
        }
        Statement::ExplainTable { .. } => {
            info.foreign = true;
        }
        Statement::Prepare { name, statement, .. } => {
            let inner = classify_statement(statement);
            info.absorb(&inner);
            info.namespace = Namespace::Prepare(fold(name));
        }
        Statement::Execute { name, .. } => match name.as_ref().and_then(single_ident) {
            Some(n) => info.namespace = Namespace::Execute(n),
            None => info.foreign = true,
        },
        Statement::Deallocate { name, .. } => {
            c.insert(SESSION);
            info.namespace = if name.value.eq_ignore_ascii_case("all") && name.quote_style.is_none() {
                Namespace::DiscardAll
            } else {
                Namespace::Deallocate(Some(fold(name)))
            };
        }
        Statement::Discard { object_type } => {
            c.insert(SESSION);
            if matches!(object_type, sqlparser::ast::DiscardObject::ALL | sqlparser::ast::DiscardObject::PLANS) {
                info.namespace = Namespace::DiscardAll;
            }
        }
        Statement::Set(set) => set_classes(set, info),
        Statement::Reset(r) => {
            // RESET restores the value the session started with.
            let _ = r;
            c.insert(SESSION);
        }
        Statement::ShowVariable { .. } => {
            c.insert(READ);
        }
        Statement::StartTransaction { statements, exception, .. } => {
            c.insert(TRANSACTION);
            if !statements.is_empty() || exception.is_some() {
                // BEGIN ... END blocks of other dialects.
                info.foreign = true;
            }
        }
        Statement::Commit { .. } | Statement::Rollback { .. } => {
            c.insert(TRANSACTION);
        }
        Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => {
            c.insert(TRANSACTION);
        }
        Statement::Declare { stmts } => {
            // DECLARE c CURSOR FOR query: as the query (the walker finds it).
            c.insert(READ);
            if stmts.iter().any(|d| d.for_query.is_none()) {
                info.foreign = true;
            }
        }
        Statement::Fetch { into, .. } => {
            c.insert(READ);
            if into.is_some() {
                info.foreign = true;
            }
        }
        Statement::Close { .. } => {
            c.insert(READ);
        }
        Statement::Call(f) => {
            c.insert(FUNCTION_CALL);
            // The walker does not see CALL's routine as an expression.
            info.functions.insert(FunctionUse { name: function_name(&f.name), class: Some(FUNCTION_CALL) });
        }
        Statement::Lock(_) => {
            c.insert(WRITE);
        }
        Statement::LISTEN { .. } | Statement::UNLISTEN { .. } => {
            c.insert(SESSION);
        }
        Statement::NOTIFY { .. } => {
            c.insert(WRITE);
        }
        Statement::Analyze(_) | Statement::Vacuum(_) => {
            c.insert(UTILITY);
        }
        Statement::Comment { .. } => {
            c.insert(DDL);
        }
        Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::CreateRole(_)
        | Statement::AlterRole { .. }
        | Statement::CreateUser(_)
        | Statement::AlterUser(_)
        | Statement::CreatePolicy(_)
        | Statement::AlterPolicy(_)
        | Statement::DropPolicy(_) => {
            c.insert(DCL);
        }
        Statement::CreateExtension(_) | Statement::DropExtension(_) => {
            // Extensions run code of their own as the database owner.
            c.insert(DDL);
            c.insert(SERVER);
        }
        Statement::Load { .. } => {
            c.insert(SERVER);
        }
        Statement::CreateView(_)
        | Statement::CreateTable(_)
        | Statement::CreateIndex(_)
        | Statement::CreateServer(_)
        | Statement::CreateOperator(_)
        | Statement::CreateOperatorFamily(_)
        | Statement::CreateOperatorClass(_)
        | Statement::CreateTextSearch(_)
        | Statement::AlterTable(_)
        | Statement::AlterSchema(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterFunction(_)
        | Statement::AlterType(_)
        | Statement::AlterCollation(_)
        | Statement::AlterOperator(_)
        | Statement::AlterOperatorFamily(_)
        | Statement::AlterOperatorClass(_)
        | Statement::AlterTextSearch(_)
        | Statement::Drop { .. }
        | Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropProcedure { .. }
        | Statement::DropOperator(_)
        | Statement::DropOperatorFamily(_)
        | Statement::DropOperatorClass(_)
        | Statement::CreateCollation(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateFunction(_)
        | Statement::CreateTrigger(_)
        | Statement::DropTrigger(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateType { .. }
        | Statement::RenameTable(_) => {
            c.insert(DDL);
        }
        // Constructs of other dialects that the parser accepts but that are
        // not PostgreSQL: PostgreSQL would refuse them, and so do we, so that
        // a difference in reading can never let something through.
        Statement::Msck(_)
        | Statement::Install { .. }
        | Statement::Directory { .. }
        | Statement::Case(_)
        | Statement::If(_)
        | Statement::While(_)
        | Statement::Raise(_)
        | Statement::CopyIntoSnowflake { .. }
        | Statement::Open(_)
        | Statement::CreateVirtualTable { .. }
        | Statement::CreateSecret { .. }
        | Statement::CreateConnector(_)
        | Statement::AlterConnector { .. }
        | Statement::AlterSession { .. }
        | Statement::AttachDatabase { .. }
        | Statement::AttachDuckDBDatabase { .. }
        | Statement::DetachDuckDBDatabase { .. }
        | Statement::DropSecret { .. }
        | Statement::DropConnector { .. }
        | Statement::Flush { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowProcessList { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCharset(_)
        | Statement::ShowObjects(_)
        | Statement::ShowTables { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowCollation { .. }
        | Statement::Use(_)
        | Statement::CreateMacro { .. }
        | Statement::CreateStage { .. }
        | Statement::CreateFileFormat { .. }
        | Statement::CreateWarehouse(_)
        | Statement::Assert { .. }
        | Statement::Deny(_)
        | Statement::Kill { .. }
        | Statement::Cache { .. }
        | Statement::UNCache { .. }
        | Statement::Pragma { .. }
        | Statement::LockTables { .. }
        | Statement::UnlockTables
        | Statement::Unload { .. }
        | Statement::OptimizeTable { .. }
        | Statement::LoadData { .. }
        | Statement::List(_)
        | Statement::Put { .. }
        | Statement::Remove(_)
        | Statement::RaisError { .. }
        | Statement::Throw(_)
        | Statement::Print(_)
        | Statement::WaitFor(_)
        | Statement::Return(_)
        | Statement::ExportData(_) => {
            info.foreign = true;
        }
    }
}

/// Settings that change how names resolve, whose privileges apply, or how
/// the server reads SQL text: changing them is `dcl`, not `session`, because
/// they would let a caller step around table rules or read SQL differently
/// from portcullis.
const PROTECTED_SETTINGS: &[&str] = &[
    "search_path",
    "role",
    "session_authorization",
    "standard_conforming_strings",
    "backslash_quote",
    "client_encoding",
    "default_transaction_read_only",
    "transaction_read_only",
    "row_security",
    "session_replication_role",
    "allow_system_table_mods",
    "default_table_access_method",
    "temp_tablespaces",
    "default_tablespace",
    "local_preload_libraries",
    "session_preload_libraries",
    "dynamic_library_path",
];

/// The class of changing setting `name` (case-folded) to `value` (when
/// known as a literal).
pub fn setting_class(name: &str, value: Option<&str>) -> &'static str {
    let name = name.to_ascii_lowercase();
    if name == "client_encoding" || name == "names" {
        // UTF-8 only: some client encodings (SJIS, BIG5, GBK...) hide quotes
        // and backslashes inside multibyte characters.
        return match value {
            Some(v) if is_utf8_name(v) => class::SESSION,
            _ => class::DCL,
        };
    }
    if PROTECTED_SETTINGS.contains(&name.as_str()) {
        class::DCL
    } else {
        class::SESSION
    }
}

pub fn is_utf8_name(v: &str) -> bool {
    let v: String = v.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    v == "utf8" || v == "unicode"
}

fn set_classes(set: &Set, info: &mut StatementInfo) {
    use class::*;
    let literal = |e: &Expr| -> Option<String> {
        match e {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(s)
                | Value::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: s, .. }) => Some(s.clone()),
                _ => None,
            },
            Expr::Identifier(i) => Some(i.value.clone()),
            _ => None,
        }
    };
    match set {
        Set::SingleAssignment { variable, values, .. } => {
            let value = values.first().and_then(literal);
            info.classes.insert(setting_class(&object_text(variable), value.as_deref()));
        }
        Set::ParenthesizedAssignments { variables, .. } => {
            for v in variables {
                info.classes.insert(setting_class(&object_text(v), None));
            }
        }
        Set::MultipleAssignments { assignments } => {
            for a in assignments {
                info.classes.insert(setting_class(&object_text(&a.name), literal(&a.value).as_deref()));
            }
        }
        Set::SetSessionAuthorization(_) | Set::SetRole { .. } => {
            info.classes.insert(DCL);
        }
        Set::SetTimeZone { .. } => {
            info.classes.insert(SESSION);
        }
        Set::SetNames { charset_name, .. } => {
            info.classes.insert(setting_class("names", Some(&charset_name.value)));
        }
        Set::SetNamesDefault {} => {
            info.classes.insert(SESSION);
        }
        Set::SetTransaction { .. } => {
            info.classes.insert(TRANSACTION);
        }
        Set::SetSessionParam(_) => {
            info.foreign = true;
        }
    }
}

/// A short name for the statement's kind, for the audit log.
fn kind_of(stmt: &Statement) -> &'static str {
    match stmt {
        Statement::Query(q) => match q.body.as_ref() {
            SetExpr::Values(_) => "VALUES",
            SetExpr::Table(_) => "TABLE",
            _ => "SELECT",
        },
        Statement::Insert(_) => "INSERT",
        Statement::Update(_) => "UPDATE",
        Statement::Delete(_) => "DELETE",
        Statement::Merge(_) => "MERGE",
        Statement::Truncate(_) => "TRUNCATE",
        Statement::Copy { to: true, .. } => "COPY TO",
        Statement::Copy { to: false, .. } => "COPY FROM",
        Statement::Explain { .. } => "EXPLAIN",
        Statement::Prepare { .. } => "PREPARE",
        Statement::Execute { .. } => "EXECUTE",
        Statement::Deallocate { .. } => "DEALLOCATE",
        Statement::Discard { .. } => "DISCARD",
        Statement::Set(_) => "SET",
        Statement::Reset(_) => "RESET",
        Statement::ShowVariable { .. } => "SHOW",
        Statement::StartTransaction { .. } => "BEGIN",
        Statement::Commit { .. } => "COMMIT",
        Statement::Rollback { .. } => "ROLLBACK",
        Statement::Savepoint { .. } => "SAVEPOINT",
        Statement::ReleaseSavepoint { .. } => "RELEASE",
        Statement::Declare { .. } => "DECLARE",
        Statement::Fetch { .. } => "FETCH",
        Statement::Close { .. } => "CLOSE",
        Statement::Call(_) => "CALL",
        Statement::Lock(_) => "LOCK",
        Statement::LISTEN { .. } => "LISTEN",
        Statement::UNLISTEN { .. } => "UNLISTEN",
        Statement::NOTIFY { .. } => "NOTIFY",
        Statement::Analyze(_) => "ANALYZE",
        Statement::Vacuum(_) => "VACUUM",
        Statement::Comment { .. } => "COMMENT",
        Statement::Grant(_) => "GRANT",
        Statement::Revoke(_) => "REVOKE",
        Statement::CreateRole(_) | Statement::CreateUser(_) => "CREATE ROLE",
        Statement::AlterRole { .. } | Statement::AlterUser(_) => "ALTER ROLE",
        Statement::CreateTable(_) => "CREATE TABLE",
        Statement::CreateView(_) => "CREATE VIEW",
        Statement::CreateIndex(_) => "CREATE INDEX",
        Statement::CreateFunction(_) => "CREATE FUNCTION",
        Statement::CreateSchema { .. } => "CREATE SCHEMA",
        Statement::CreateExtension(_) => "CREATE EXTENSION",
        Statement::AlterTable(_) => "ALTER TABLE",
        Statement::Drop { .. } => "DROP",
        _ => "OTHER",
    }
}

/// Collects relations, functions and nested dangers.
struct Walker<'a> {
    info: &'a mut StatementInfo,
    /// Names the walker met as table functions (`FROM f(...)`), which the
    /// relation callback must not take for tables.
    skip: Vec<*const ObjectName>,
}

impl Visitor for Walker<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            // SELECT ... FOR UPDATE/SHARE locks rows: it needs UPDATE rights.
            self.info.classes.insert(class::WRITE);
        }
        self.set_expr(&query.body);
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            TableFactor::Table { name, args: Some(_), .. } => {
                // `FROM f(args)`: a function, not a table.
                self.skip.push(name as *const ObjectName);
                self.function(name, None);
            }
            TableFactor::Function { name, .. } => {
                self.skip.push(name as *const ObjectName);
                self.function(name, None);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if !self.skip.contains(&(relation as *const ObjectName)) {
            self.info.tables.extend(relation_names(relation));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let first = match &f.args {
                FunctionArguments::List(l) => l.args.first().and_then(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                    _ => None,
                }),
                _ => None,
            };
            self.function(&f.name, first);
        }
        ControlFlow::Continue(())
    }
}

impl Walker<'_> {
    fn set_expr(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(s) => {
                if s.into.is_some() {
                    // SELECT ... INTO creates a table.
                    self.info.classes.insert(class::DDL);
                    self.info.classes.insert(class::WRITE);
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                // Data-modifying WITH or nested DML.
                self.info.classes.insert(class::WRITE);
            }
            SetExpr::Table(t) => {
                if let Some(name) = &t.table_name {
                    // The parser keeps no quoting here: take both readings.
                    let schema = t.schema_name.as_deref();
                    for n in [name.to_ascii_lowercase(), name.clone()] {
                        let s = schema.map(|s| s.to_ascii_lowercase());
                        self.info.tables.insert(qualify(s.as_deref(), &n));
                        if let Some(s) = schema {
                            self.info.tables.insert(qualify(Some(s), &n));
                        }
                    }
                }
            }
            SetExpr::Query(_) | SetExpr::Values(_) => {}
        }
    }

    fn function(&mut self, name: &ObjectName, first_arg: Option<&Expr>) {
        let full = function_name(name);
        let class = function_class(&full, first_arg);
        self.info.functions.insert(FunctionUse { name: full, class });
    }
}

/// PostgreSQL's folding: unquoted identifiers are lower-cased, quoted ones
/// kept as written.
pub fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

fn single_ident(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(i)] => Some(fold(i)),
        _ => None,
    }
}

fn object_text(name: &ObjectName) -> String {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => fold(i),
            ObjectNamePart::Function(f) => f.to_string(),
        })
        .collect();
    parts.join(".")
}

fn folded_parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => fold(i),
            ObjectNamePart::Function(f) => f.to_string(),
        })
        .collect()
}

/// `schema.name` for an unqualified or qualified name. Unqualified names
/// resolve as under PostgreSQL's default search path: system catalogs
/// (`pg_*`) in `pg_catalog`, everything else in `public`.
pub fn qualify(schema: Option<&str>, name: &str) -> String {
    match schema {
        Some(s) => format!("{s}.{name}"),
        None if name.starts_with("pg_") => format!("pg_catalog.{name}"),
        None => format!("public.{name}"),
    }
}

/// Relations a statement names where the walker does not visit them as
/// relations (DROP, GRANT and REVOKE, COMMENT, triggers, renames, VACUUM,
/// ALTER INDEX): table rules must see every relation a statement touches.
fn named_relations(stmt: &Statement, info: &mut StatementInfo) {
    use sqlparser::ast::{AlterTableOperation, CommentObject, GrantObjects, ObjectType, RenameTableNameKind};
    let mut add = |n: &ObjectName| info.tables.extend(relation_names(n));
    let granted = |objects: &Option<GrantObjects>, tables: &mut BTreeSet<String>| match objects {
        Some(GrantObjects::Tables(names) | GrantObjects::Sequences(names) | GrantObjects::Views(names)) => {
            tables.extend(names.iter().flat_map(relation_names));
        }
        // Every relation of a schema: `schema.*`, which table rules take as
        // any table of it.
        Some(
            GrantObjects::AllTablesInSchema { schemas }
            | GrantObjects::AllSequencesInSchema { schemas }
            | GrantObjects::AllViewsInSchema { schemas }
            | GrantObjects::AllMaterializedViewsInSchema { schemas },
        ) => {
            schemas.iter().for_each(|s| whole_schema(tables, s));
        }
        _ => {}
    };
    match stmt {
        Statement::Grant(g) => granted(&g.objects, &mut info.tables),
        Statement::Revoke(r) => granted(&r.objects, &mut info.tables),
        // A schema dropped or altered (renamed: a denied schema's tables
        // would be reachable under the new name) touches all of its tables.
        Statement::Drop { object_type: ObjectType::Schema, names, .. } => {
            names.iter().for_each(|n| whole_schema(&mut info.tables, n));
        }
        Statement::AlterSchema(a) => {
            whole_schema(&mut info.tables, &a.name);
            for op in &a.operations {
                if let sqlparser::ast::AlterSchemaOperation::Rename { name } = op {
                    whole_schema(&mut info.tables, name);
                }
            }
        }
        Statement::DropTrigger(d) => {
            if let Some(t) = &d.table_name {
                add(t);
            }
        }
        Statement::Drop { object_type, names, table, .. } => {
            if matches!(
                object_type,
                ObjectType::Table
                    | ObjectType::View
                    | ObjectType::MaterializedView
                    | ObjectType::Index
                    | ObjectType::Sequence
            ) {
                names.iter().for_each(&mut add);
            }
            if let Some(t) = table {
                add(t);
            }
        }
        Statement::Comment { object_type, object_name, .. } => match object_type {
            CommentObject::Table
            | CommentObject::View
            | CommentObject::MaterializedView
            | CommentObject::Index
            | CommentObject::Sequence => add(object_name),
            // `table.column`: the table.
            CommentObject::Column if object_name.0.len() > 1 => {
                add(&ObjectName(object_name.0[..object_name.0.len() - 1].to_vec()));
            }
            _ => {}
        },
        Statement::CreateTrigger(t) => add(&t.table_name),
        Statement::AlterTable(a) => {
            for op in &a.operations {
                if let AlterTableOperation::RenameTable {
                    table_name: RenameTableNameKind::As(n) | RenameTableNameKind::To(n),
                } = op
                {
                    add(n);
                }
            }
        }
        Statement::RenameTable(renames) => {
            for r in renames {
                add(&r.old_name);
                add(&r.new_name);
            }
        }
        Statement::Vacuum(v) => {
            if let Some(t) = &v.table_name {
                add(t);
            }
        }
        Statement::AlterIndex { name, .. } => add(name),
        _ => {}
    }
}

/// `schema.*`: every relation of a schema, which table rules take as any
/// table of it.
fn whole_schema(tables: &mut BTreeSet<String>, schema: &ObjectName) {
    if let Some(name) = folded_parts(schema).last() {
        tables.insert(format!("{name}.*"));
    }
}

/// The names a relation reference may stand for (a `database.schema.name`
/// reference names the schema-qualified relation in the current database).
fn relation_names(name: &ObjectName) -> Vec<String> {
    let parts = folded_parts(name);
    match parts.as_slice() {
        [n] => vec![qualify(None, n)],
        [s, n] | [_, s, n] => vec![qualify(Some(s), n)],
        // Anything longer is an error in PostgreSQL; keep it whole.
        _ => vec![parts.join(".")],
    }
}

/// `schema.name` of a called function: unqualified built-ins live in
/// `pg_catalog` (searched first), other unqualified names in `public`.
fn function_name(name: &ObjectName) -> String {
    let parts = folded_parts(name);
    match parts.as_slice() {
        [n] if builtin_class(n).is_some() => format!("pg_catalog.{n}"),
        [n] => format!("public.{n}"),
        [s, n] | [_, s, n] => format!("{s}.{n}"),
        _ => parts.join("."),
    }
}

/// What a built-in function does beyond reading.
enum Builtin {
    Read,
    Class(&'static str),
    /// `set_config(name, ...)`: as `SET name`.
    SetConfig,
}

fn builtin_class(name: &str) -> Option<Builtin> {
    if WRITE_FUNCTIONS.contains(&name) {
        return Some(Builtin::Class(class::WRITE));
    }
    if SERVER_FUNCTIONS.contains(&name) {
        return Some(Builtin::Class(class::SERVER));
    }
    if SESSION_FUNCTIONS.contains(&name) {
        return Some(Builtin::Class(class::SESSION));
    }
    if name == "set_config" {
        return Some(Builtin::SetConfig);
    }
    if READ_FUNCTIONS.binary_search(&name).is_ok() {
        return Some(Builtin::Read);
    }
    None
}

/// The class calling `name` (`schema.name`) carries: none for a built-in that
/// only reads, its effect for a built-in with one, `function-call` for
/// anything portcullis does not know (user-defined functions may do
/// anything).
fn function_class(name: &str, first_arg: Option<&Expr>) -> Option<&'static str> {
    let Some(bare) = name.strip_prefix("pg_catalog.") else {
        return Some(class::FUNCTION_CALL);
    };
    match builtin_class(bare) {
        Some(Builtin::Read) => None,
        Some(Builtin::Class(c)) => Some(c),
        Some(Builtin::SetConfig) => {
            let setting = match first_arg {
                Some(Expr::Value(v)) => match &v.value {
                    Value::SingleQuotedString(s) => Some(s.as_str()),
                    _ => None,
                },
                _ => None,
            };
            Some(match setting {
                // Without a literal name it could be any setting.
                None => class::DCL,
                Some(s) => setting_class(s, None),
            })
        }
        None => Some(class::FUNCTION_CALL),
    }
}

/// Built-ins that change data.
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "lo_create",
    "lo_creat",
    "lo_unlink",
    "lo_from_bytea",
    "lo_put",
    "lo_open",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
    "pg_notify",
    "pg_logical_emit_message",
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters",
    "pg_stat_reset_slru",
    "pg_stat_reset_replication_slot",
    "pg_stat_reset_subscription_stats",
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_replication_origin_advance",
    "pg_replication_origin_session_setup",
    "pg_replication_origin_xact_setup",
];

/// Built-ins that reach the database host or other sessions: server files,
/// programs, configuration, backends, replication.
const SERVER_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_promote",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalmapdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_replslotdir",
    "pg_stat_file",
    "lo_import",
    "lo_export",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
    "pg_current_logfile",
];

/// Built-ins with effects limited to the session.
const SESSION_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
];

/// Built-ins that only read (sorted: looked up by binary search). Functions
/// that run SQL given as text (`query_to_xml`, `dblink`...) are deliberately
/// absent: they are `function-call`.
const READ_FUNCTIONS: &[&str] = &[
    "abs",
    "acos",
    "age",
    "array_agg",
    "array_append",
    "array_cat",
    "array_dims",
    "array_fill",
    "array_length",
    "array_lower",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "asin",
    "atan",
    "atan2",
    "avg",
    "bit_and",
    "bit_length",
    "bit_or",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "clock_timestamp",
    "coalesce",
    "col_description",
    "concat",
    "concat_ws",
    "convert_from",
    "convert_to",
    "corr",
    "cos",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "current_catalog",
    "current_database",
    "current_date",
    "current_query",
    "current_role",
    "current_schema",
    "current_schemas",
    "current_setting",
    "current_time",
    "current_timestamp",
    "current_user",
    "currval",
    "date_bin",
    "date_part",
    "date_trunc",
    "decode",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "every",
    "exp",
    "extract",
    "factorial",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gcd",
    "gen_random_uuid",
    "generate_series",
    "generate_subscripts",
    "greatest",
    "has_any_column_privilege",
    "has_column_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "has_schema_privilege",
    "has_sequence_privilege",
    "has_table_privilege",
    "inet_client_addr",
    "inet_server_addr",
    "initcap",
    "isfinite",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object",
    "json_object_agg",
    "json_object_keys",
    "json_populate_record",
    "json_strip_nulls",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_path_exists",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_populate_record",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "lag",
    "last_value",
    "lastval",
    "lcm",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "localtime",
    "localtimestamp",
    "log",
    "log10",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "max",
    "md5",
    "min",
    "mod",
    "now",
    "nth_value",
    "ntile",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "obj_description",
    "octet_length",
    "overlay",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_backend_pid",
    "pg_column_size",
    "pg_database_size",
    "pg_encoding_to_char",
    "pg_get_constraintdef",
    "pg_get_expr",
    "pg_get_function_arguments",
    "pg_get_function_identity_arguments",
    "pg_get_function_result",
    "pg_get_functiondef",
    "pg_get_indexdef",
    "pg_get_keywords",
    "pg_get_serial_sequence",
    "pg_get_triggerdef",
    "pg_get_userbyid",
    "pg_get_viewdef",
    "pg_has_role",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_is_other_temp_schema",
    "pg_my_temp_schema",
    "pg_postmaster_start_time",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_table_is_visible",
    "pg_table_size",
    "pg_total_relation_size",
    "pg_type_is_visible",
    "pg_typeof",
    "pi",
    "position",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "random",
    "rank",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "session_user",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sign",
    "sin",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "tan",
    "timeofday",
    "to_ascii",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "translate",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "user",
    "var_pop",
    "var_samp",
    "variance",
    "version",
    "width_bucket",
    "xmlagg",
];

#[cfg(test)]
mod shape_tests {
    use super::shape;

    #[test]
    fn shapes_ignore_literals_but_not_structure() {
        assert_eq!(shape("DELETE FROM t WHERE id = 7"), shape("delete from t where id = 42"));
        assert_eq!(shape("INSERT INTO t VALUES (1, 'a')"), shape("INSERT INTO t VALUES (2, 'b')"));
        assert_ne!(shape("DELETE FROM t WHERE id = 7"), shape("DELETE FROM u WHERE id = 7"));
        assert_ne!(shape("DELETE FROM t WHERE id = 7"), shape("DELETE FROM t WHERE id = 7 OR true"));
        assert_eq!(shape("CREATE TABLE t3 (a int)"), "CREATE TABLE t3 (a INT)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> StatementInfo {
        let mut v = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    fn classes(sql: &str) -> Vec<&'static str> {
        let v = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let mut all = BTreeSet::new();
        for s in &v {
            all.extend(s.all_classes());
        }
        all.into_iter().collect()
    }

    #[test]
    fn read_functions_are_sorted_for_binary_search() {
        let mut sorted = READ_FUNCTIONS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, READ_FUNCTIONS);
    }

    #[test]
    fn plain_statements_get_their_class() {
        assert_eq!(classes("SELECT a FROM t WHERE b = 1"), ["read"]);
        assert_eq!(classes("INSERT INTO t VALUES (1)"), ["write"]);
        assert_eq!(classes("UPDATE t SET a = 1"), ["write"]);
        assert_eq!(classes("DELETE FROM t"), ["write"]);
        assert_eq!(classes("TRUNCATE t"), ["write"]);
        assert_eq!(classes("CREATE TABLE t (a int)"), ["ddl"]);
        assert_eq!(classes("DROP TABLE t"), ["ddl"]);
        assert_eq!(classes("ALTER TABLE t ADD COLUMN b int"), ["ddl"]);
        assert_eq!(classes("GRANT SELECT ON t TO bob"), ["dcl"]);
        assert_eq!(classes("CREATE ROLE bob"), ["dcl"]);
        assert_eq!(classes("BEGIN"), ["transaction"]);
        assert_eq!(classes("COMMIT"), ["transaction"]);
        assert_eq!(classes("SET statement_timeout = '5s'"), ["session"]);
        assert_eq!(classes("SET application_name TO x"), ["session"]);
        assert_eq!(classes("SHOW work_mem"), ["read"]);
        assert_eq!(classes("VACUUM t"), ["utility"]);
        assert_eq!(classes("COPY t FROM STDIN"), ["copy-in"]);
        assert_eq!(classes("COPY t TO STDOUT"), ["copy-out"]);
    }

    #[test]
    fn settings_that_change_resolution_or_privileges_are_dcl() {
        assert_eq!(classes("SET search_path = evil, public"), ["dcl"]);
        assert_eq!(classes("SET SEARCH_PATH TO evil"), ["dcl"]);
        assert_eq!(classes("SET LOCAL search_path = evil"), ["dcl"]);
        assert_eq!(classes("SET ROLE admin"), ["dcl"]);
        assert_eq!(classes("SET SESSION AUTHORIZATION admin"), ["dcl"]);
        assert_eq!(classes("SET standard_conforming_strings = off"), ["dcl"]);
        assert_eq!(classes("SET client_encoding = 'SJIS'"), ["dcl"]);
        assert_eq!(classes("SET client_encoding = 'UTF8'"), ["session"]);
        assert_eq!(classes("SET NAMES 'sjis'"), ["dcl"]);
        assert_eq!(classes("SELECT set_config('search_path', 'evil', false)"), ["dcl", "read"]);
        assert_eq!(classes("SELECT set_config('work_mem', '1MB', false)"), ["read", "session"]);
        assert_eq!(classes("SELECT set_config(current_user, 'x', false)"), ["dcl", "read"]);
    }

    #[test]
    fn the_worst_nested_thing_counts() {
        assert!(classes("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x").contains(&"write"));
        assert!(classes("WITH x AS (INSERT INTO t VALUES (1) RETURNING a) SELECT 1").contains(&"write"));
        assert!(
            classes("SELECT * FROM (WITH y AS (UPDATE t SET a=1 RETURNING a) SELECT * FROM y) z").contains(&"write")
        );
        assert!(classes("EXPLAIN ANALYZE DELETE FROM t").contains(&"write"));
        assert_eq!(classes("EXPLAIN DELETE FROM t"), ["read"], "plain EXPLAIN runs nothing");
        assert!(classes("SELECT * INTO newt FROM t").contains(&"ddl"));
        assert!(classes("SELECT * INTO newt FROM t").contains(&"write"));
        assert!(classes("SELECT * FROM t FOR UPDATE").contains(&"write"));
        assert!(classes("SELECT nextval('s')").contains(&"write"));
        assert!(classes("SELECT NEXTVAL('s')").contains(&"write"));
        assert!(classes("SELECT pg_catalog.nextval('s')").contains(&"write"));
        assert!(classes("SELECT * FROM nextval('s')").contains(&"write"));
        assert!(classes("SELECT pg_terminate_backend(1)").contains(&"server"));
        assert!(classes("SELECT pg_read_file('/etc/passwd')").contains(&"server"));
        assert!(classes("SELECT (SELECT max(a) FROM t WHERE a = my_func(1))").contains(&"function-call"));
        assert!(classes("SELECT query_to_xml('delete from t', true, true, '')").contains(&"function-call"));
        assert!(classes("COPY t TO PROGRAM 'sh -c id'").contains(&"server"));
        assert!(classes("COPY t FROM '/etc/passwd'").contains(&"server"));
        assert!(classes("COPY (DELETE FROM t RETURNING *) TO STDOUT").contains(&"write"));
        assert!(classes("CALL do_things()").contains(&"function-call"));
        assert!(classes("PREPARE p AS DELETE FROM t").contains(&"write"));
        assert!(classes("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE").contains(&"write"));
        assert_eq!(classes("SELECT count(*), lower(a), now() FROM t"), ["read"]);
    }

    #[test]
    fn several_statements_are_each_classified() {
        let v = classify("SELECT 1; DROP TABLE t").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].all_classes().into_iter().collect::<Vec<_>>(), ["ddl"]);
        // Comments and quoting do not hide a statement.
        let v = classify("SELECT 1 /* ; */; DROP TABLE t -- ; \n").unwrap();
        assert_eq!(v.len(), 2);
        let v = classify("SELECT 1 --\r; DROP TABLE t").unwrap();
        assert_eq!(v.len(), 2, "PostgreSQL ends a -- comment at CR too");
        let v = classify("SELECT '\\'; DROP TABLE t; --'").unwrap();
        assert_eq!(v.len(), 2, "a backslash does not escape in a standard string");
        let v = classify("/* /* nested */ still a comment; DROP TABLE x; */ SELECT 1").unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, "SELECT");
        let v = classify("SELECT $$; DROP TABLE t; $$").unwrap();
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn what_does_not_parse_is_an_error() {
        assert!(classify("DO $$ BEGIN DELETE FROM t; END $$").is_err());
        assert!(classify("SELEC 1").is_err());
        let deep = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(classify(&deep).is_err(), "deep nesting is refused, not crashed on");
        let deep = format!("SELECT {}", "-".repeat(20000) + "1");
        let _ = classify(&deep);
    }

    #[test]
    fn tables_are_schema_qualified_and_folded() {
        let t = |sql: &str| one(sql).tables.into_iter().collect::<Vec<_>>();
        assert_eq!(t("SELECT * FROM Secrets"), ["public.secrets"]);
        assert_eq!(t("SELECT * FROM \"Secrets\""), ["public.Secrets"]);
        assert_eq!(t("SELECT * FROM PUBLIC.SECRETS"), ["public.secrets"]);
        assert_eq!(t("SELECT * FROM \"public\".\"secrets\""), ["public.secrets"]);
        assert_eq!(t("SELECT * FROM mydb.public.secrets"), ["public.secrets"]);
        assert_eq!(t("SELECT * FROM pg_authid"), ["pg_catalog.pg_authid"]);
        assert_eq!(t("SELECT * FROM a JOIN b.c ON true WHERE x IN (SELECT y FROM d)"), ["b.c", "public.a", "public.d"]);
        assert_eq!(t("COPY Secrets TO STDOUT"), ["public.secrets"]);
        assert_eq!(t("INSERT INTO s.t SELECT * FROM u"), ["public.u", "s.t"]);
        assert_eq!(t("SELECT * FROM generate_series(1, 3)"), Vec::<String>::new());
        // Relations named outside of queries count too.
        assert_eq!(t("DROP TABLE Secrets, s.\"T\""), ["public.secrets", "s.T"]);
        assert_eq!(t("DROP VIEW IF EXISTS v CASCADE"), ["public.v"]);
        assert_eq!(t("DROP INDEX auth.i"), ["auth.i"]);
        assert_eq!(t("DROP SCHEMA auth, \"X\" CASCADE"), ["X.*", "auth.*"]);
        assert_eq!(t("ALTER SCHEMA Auth RENAME TO x"), ["auth.*", "x.*"]);
        assert_eq!(t("ALTER SCHEMA auth OWNER TO bob"), ["auth.*"]);
        assert_eq!(t("DROP TRIGGER audit_trg ON secrets"), ["public.secrets"]);
        assert_eq!(t("GRANT SELECT ON secrets, s.t TO bob"), ["public.secrets", "s.t"]);
        assert_eq!(t("REVOKE ALL ON TABLE secrets FROM bob"), ["public.secrets"]);
        assert_eq!(t("GRANT SELECT ON ALL TABLES IN SCHEMA Public, \"Auth\" TO bob"), ["Auth.*", "public.*"]);
        assert_eq!(t("REVOKE ALL ON ALL SEQUENCES IN SCHEMA s FROM bob"), ["s.*"]);
        assert_eq!(t("COMMENT ON TABLE secrets IS 'x'"), ["public.secrets"]);
        assert_eq!(t("COMMENT ON COLUMN s.secrets.token IS 'x'"), ["s.secrets"]);
        assert_eq!(
            t("CREATE TRIGGER tr BEFORE INSERT ON secrets FOR EACH ROW EXECUTE FUNCTION f()"),
            ["public.secrets"]
        );
        assert_eq!(t("ALTER TABLE t RENAME TO secrets"), ["public.secrets", "public.t"]);
        assert_eq!(t("VACUUM secrets"), ["public.secrets"]);
        assert_eq!(t("ALTER INDEX i RENAME TO j"), ["public.i"]);
        // `TABLE name` is not read by the parser: refused rather than guessed.
        assert!(classify("TABLE secrets").is_err());
    }

    #[test]
    fn functions_are_named_and_classed() {
        let f = one("SELECT lower(a), my_func(b), s.f(c), nextval('q') FROM t").functions;
        let names: Vec<_> = f.iter().map(|f| (f.name.as_str(), f.class)).collect();
        assert!(names.contains(&("pg_catalog.lower", None)), "{names:?}");
        assert!(names.contains(&("public.my_func", Some("function-call"))), "{names:?}");
        assert!(names.contains(&("s.f", Some("function-call"))), "{names:?}");
        assert!(names.contains(&("pg_catalog.nextval", Some("write"))), "{names:?}");
    }

    #[test]
    fn prepared_statement_namespace() {
        assert_eq!(one("PREPARE p AS SELECT 1").namespace, Namespace::Prepare("p".into()));
        assert_eq!(one("EXECUTE P").namespace, Namespace::Execute("p".into()));
        assert_eq!(one("DEALLOCATE p").namespace, Namespace::Deallocate(Some("p".into())));
        assert_eq!(one("DEALLOCATE ALL").namespace, Namespace::DiscardAll);
        assert_eq!(one("DISCARD ALL").namespace, Namespace::DiscardAll);
    }

    #[test]
    fn other_dialects_are_foreign() {
        assert!(one("SHOW TABLES").foreign);
        assert!(one("USE db").foreign);
    }
}
