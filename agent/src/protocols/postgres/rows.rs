//! The response side's knowledge of result shapes: which columns (table oid,
//! attribute number, type, format) each DataRow carries, in the simple and
//! the extended protocol, and the one place every DataRow passes through on
//! its way to the caller.
//!
//! The request side tells this side, in order, what each forwarded message
//! will be answered with (`Pending`); this side matches the upstream's
//! answers against that list. In the extended protocol rows come without a
//! RowDescription: their shape is the portal's, learned from Describe and
//! the result formats Bind asked for.
use std::{collections::HashMap, collections::VecDeque, sync::Arc};

use bytes::{Bytes, BytesMut};

use super::{
    mask::RowMasker,
    wire::{cstr, i16_at, i32_at, Frame, WireError},
};
use crate::masking::Mode;

/// One result column, as RowDescription describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// Oid of the table the column comes from (0 for a computed value).
    pub table_oid: u32,
    /// Attribute number within that table (0 for a computed value).
    pub attnum: i16,
    pub type_oid: u32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// The columns of the rows currently flowing; `None` when unknown (a portal
/// executed without having been described).
pub type Shape = Option<Arc<[Column]>>;

/// What a forwarded client message will be answered with.
#[derive(Debug)]
pub enum Pending {
    /// Simple query: any number of results, then ReadyForQuery. The mode
    /// for computed result fields (see `mask::Columns::computed`).
    Query(Option<Mode>),
    /// FunctionCall: FunctionCallResponse or an error, then ReadyForQuery.
    FunctionCall,
    Parse,
    Bind {
        portal: String,
        statement: String,
        formats: Vec<i16>,
    },
    DescribeStatement(String),
    DescribePortal(String),
    /// Portal, and the mode for computed result fields.
    Execute(String, Option<Mode>),
    Close {
        portal: bool,
        name: String,
    },
    Sync,
    /// A denial stands in for a request: the upstream's error for it is
    /// replaced by `error` (a complete ErrorResponse). `simple` says whether
    /// it stands in a simple-protocol exchange (ended by ReadyForQuery) or
    /// in an extended-protocol one.
    Denial {
        id: u64,
        simple: bool,
        error: Bytes,
    },
}

impl Pending {
    /// Ends with the next ReadyForQuery.
    fn ends_cycle(&self) -> bool {
        matches!(self, Pending::Query(_) | Pending::FunctionCall | Pending::Sync | Pending::Denial { simple: true, .. })
    }
}

/// Result shapes by statement and portal, and what is awaited.
#[derive(Default)]
pub struct Tracker {
    pub pending: VecDeque<Pending>,
    statements: HashMap<String, Arc<[Column]>>,
    portals: HashMap<String, Shape>,
    /// Shape of the rows of the current simple-protocol result.
    current: Shape,
    /// The session's masker, when the role masks anything (always, for a
    /// target with injected credentials).
    pub masker: Option<RowMasker>,
    /// A COPY out is under way: (binary format).
    copy_out: Option<bool>,
}

impl Tracker {
    pub fn with_masker(masker: Option<RowMasker>) -> Tracker {
        Tracker { masker, ..Tracker::default() }
    }

    pub fn expect(&mut self, p: Pending) {
        self.pending.push_back(p);
    }

    /// Takes note of one upstream message (before it is forwarded).
    pub fn observe(&mut self, frame: &Frame) -> Result<(), WireError> {
        match frame.tag {
            b'1' => self.pop_if(|p| matches!(p, Pending::Parse)),
            b'2' => {
                if let Some(Pending::Bind { .. }) = self.pending.front() {
                    if let Some(Pending::Bind { portal, statement, formats }) = self.pending.pop_front() {
                        let shape = self.statements.get(&statement).map(|cols| with_formats(cols, &formats));
                        self.portals.insert(portal, shape);
                    }
                }
            }
            b'T' => {
                let cols: Arc<[Column]> = row_description(frame.body())?.into();
                match self.pending.front() {
                    Some(Pending::DescribeStatement(s)) => {
                        let s = s.clone();
                        self.pending.pop_front();
                        self.statements.insert(s, cols);
                    }
                    Some(Pending::DescribePortal(p)) => {
                        let p = p.clone();
                        self.pending.pop_front();
                        self.portals.insert(p, Some(cols));
                    }
                    _ => self.current = Some(cols),
                }
            }
            b'n' => match self.pending.front() {
                Some(Pending::DescribeStatement(s)) => {
                    let s = s.clone();
                    self.pending.pop_front();
                    self.statements.insert(s, Arc::from([]));
                }
                Some(Pending::DescribePortal(p)) => {
                    let p = p.clone();
                    self.pending.pop_front();
                    self.portals.insert(p, Some(Arc::from([])));
                }
                _ => {}
            },
            b'H' => {
                let binary = frame.body().first().is_some_and(|&f| f != 0);
                self.copy_out = Some(binary);
            }
            b'c' => self.copy_out = None,
            b'C' | b'I' | b's' => {
                self.current = None;
                self.copy_out = None;
                self.pop_if(|p| matches!(p, Pending::Execute(..)));
            }
            b'3' => {
                if let Some(Pending::Close { .. }) = self.pending.front() {
                    if let Some(Pending::Close { portal, name }) = self.pending.pop_front() {
                        if portal {
                            self.portals.remove(&name);
                        } else {
                            self.statements.remove(&name);
                        }
                    }
                }
            }
            b'E' => {
                self.current = None;
                self.copy_out = None;
                // In the extended protocol the server skips to Sync.
                if self.pending.front().is_some_and(|p| !p.ends_cycle()) {
                    while self.pending.front().is_some_and(|p| !matches!(p, Pending::Sync)) {
                        self.pending.pop_front();
                    }
                }
            }
            b'Z' => {
                self.current = None;
                while let Some(p) = self.pending.pop_front() {
                    if p.ends_cycle() {
                        break;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn pop_if(&mut self, f: impl Fn(&Pending) -> bool) {
        if self.pending.front().is_some_and(f) {
            self.pending.pop_front();
        }
    }

    /// The shape of the DataRows flowing now.
    pub fn row_shape(&self) -> Shape {
        match self.pending.front() {
            Some(Pending::Execute(portal, _)) => self.portals.get(portal).cloned().flatten(),
            _ => self.current.clone(),
        }
    }

    /// The mode for computed fields of the rows flowing now.
    fn computed(&self) -> Option<&Mode> {
        match self.pending.front() {
            Some(Pending::Execute(_, m)) | Some(Pending::Query(m)) => m.as_ref(),
            _ => None,
        }
    }

    /// The denial standing in for request `id`, if still awaited.
    pub fn denial(&self, id: u64) -> Option<Bytes> {
        self.pending.iter().find_map(|p| match p {
            Pending::Denial { id: i, error, .. } if *i == id => Some(error.clone()),
            _ => None,
        })
    }

    /// Every DataRow passes here on its way to the caller: the place where
    /// the role's maskers apply. An error (a row that does not fit its
    /// description) ends the session.
    pub fn data_row(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), String> {
        if self.masker.is_none() {
            out.extend_from_slice(&frame.raw);
            return Ok(());
        }
        let shape = self.row_shape();
        let computed = self.computed().cloned();
        let m = self.masker.as_mut().expect("checked");
        m.data_row(shape.as_ref(), computed.as_ref(), &frame.raw, out)
    }

    /// Every CopyData row of a COPY out passes here. Binary COPY output
    /// cannot be scanned: an error when text is scanned.
    pub fn copy_data(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), String> {
        match (&mut self.masker, self.copy_out) {
            (Some(m), Some(binary)) if m.scans_text() => {
                if binary {
                    return Err("binary COPY output cannot be masked".into());
                }
                m.copy_row(&frame.raw, out);
            }
            _ => out.extend_from_slice(&frame.raw),
        }
        Ok(())
    }

    /// A FunctionCallResponse passes here.
    pub fn function_result(&mut self, frame: &Frame, out: &mut BytesMut) {
        match &mut self.masker {
            Some(m) => m.function_result(&frame.raw, out),
            None => out.extend_from_slice(&frame.raw),
        }
    }

    /// Errors and notices pass here: their text is scanned too.
    pub fn notice(&mut self, frame: &Frame, out: &mut BytesMut) {
        let strict = self.computed().is_some();
        match &mut self.masker {
            Some(m) if m.scans_text() || strict => m.fields(frame.tag, &frame.raw, strict, out),
            _ => out.extend_from_slice(&frame.raw),
        }
    }
}

fn with_formats(cols: &Arc<[Column]>, formats: &[i16]) -> Arc<[Column]> {
    // Bind: no codes = all text; one code = all columns; else one per column.
    cols.iter()
        .enumerate()
        .map(|(i, c)| Column {
            format: match formats.len() {
                0 => 0,
                1 => formats[0],
                _ => formats.get(i).copied().unwrap_or(0),
            },
            ..c.clone()
        })
        .collect()
}

/// Reads a RowDescription body.
pub fn row_description(mut body: &[u8]) -> Result<Vec<Column>, WireError> {
    let n = i16_at(&mut body)?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let name = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
        let table_oid = i32_at(&mut body)? as u32;
        let attnum = i16_at(&mut body)?;
        let type_oid = i32_at(&mut body)? as u32;
        let _size = i16_at(&mut body)?;
        let _modifier = i32_at(&mut body)?;
        let format = i16_at(&mut body)?;
        cols.push(Column { name, table_oid, attnum, type_oid, format });
    }
    Ok(cols)
}

/// Reads a Bind body: portal, statement, and the result format codes.
pub fn bind_fields(mut body: &[u8]) -> Result<(String, String, Vec<i16>), WireError> {
    let portal = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
    let statement = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
    let nformats = i16_at(&mut body)?;
    for _ in 0..nformats.max(0) {
        i16_at(&mut body)?;
    }
    let nparams = i16_at(&mut body)?;
    for _ in 0..nparams.max(0) {
        let len = i32_at(&mut body)?;
        if len > 0 {
            let len = len as usize;
            if body.len() < len {
                return Err(WireError::Malformed("bind parameter"));
            }
            body = &body[len..];
        }
    }
    let nresults = i16_at(&mut body)?;
    let mut formats = Vec::with_capacity(nresults.max(0) as usize);
    for _ in 0..nresults.max(0) {
        formats.push(i16_at(&mut body)?);
    }
    Ok((portal, statement, formats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.extend_from_slice(body);
        Frame { tag, raw: b.freeze() }
    }

    fn row_desc(cols: &[(&str, u32, i16)]) -> Frame {
        let mut b = BytesMut::new();
        b.put_i16(cols.len() as i16);
        for (name, table, att) in cols {
            b.extend_from_slice(name.as_bytes());
            b.put_u8(0);
            b.put_i32(*table as i32);
            b.put_i16(*att);
            b.put_i32(25);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0);
        }
        frame(b'T', &b)
    }

    #[test]
    fn simple_protocol_rows_take_the_row_description() {
        let mut t = Tracker::default();
        t.expect(Pending::Query(None));
        t.observe(&row_desc(&[("email", 16384, 2)])).unwrap();
        let shape = t.row_shape().unwrap();
        assert_eq!((shape[0].table_oid, shape[0].attnum, shape[0].format), (16384, 2, 0));
        t.observe(&frame(b'C', b"SELECT 1\0")).unwrap();
        assert!(t.row_shape().is_none());
        t.observe(&frame(b'Z', b"I")).unwrap();
        assert!(t.pending.is_empty());
    }

    #[test]
    fn extended_protocol_rows_take_the_portal_shape_with_bind_formats() {
        let mut t = Tracker::default();
        // Parse s1, Describe s1, Sync.
        t.expect(Pending::Parse);
        t.expect(Pending::DescribeStatement("s1".into()));
        t.expect(Pending::Sync);
        t.observe(&frame(b'1', b"")).unwrap();
        t.observe(&frame(b't', &[0, 0])).unwrap();
        t.observe(&row_desc(&[("id", 16384, 1), ("email", 16384, 2)])).unwrap();
        t.observe(&frame(b'Z', b"I")).unwrap();
        // Bind p1 to s1 with binary results for column 2, Execute, Sync.
        t.expect(Pending::Bind { portal: "p1".into(), statement: "s1".into(), formats: vec![0, 1] });
        t.expect(Pending::Execute("p1".into(), None));
        t.expect(Pending::Sync);
        t.observe(&frame(b'2', b"")).unwrap();
        let shape = t.row_shape().unwrap();
        assert_eq!(shape.len(), 2);
        assert_eq!((shape[1].attnum, shape[1].format), (2, 1));
        t.observe(&frame(b'C', b"SELECT 2\0")).unwrap();
        t.observe(&frame(b'Z', b"I")).unwrap();
        assert!(t.pending.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_and_denials_are_found() {
        let mut t = Tracker::default();
        t.expect(Pending::Denial { id: 7, simple: false, error: Bytes::from_static(b"x") });
        t.expect(Pending::Bind { portal: String::new(), statement: String::new(), formats: vec![] });
        t.expect(Pending::Execute(String::new(), None));
        t.expect(Pending::Sync);
        assert_eq!(t.denial(7).as_deref(), Some(&b"x"[..]));
        assert!(t.denial(8).is_none());
        t.observe(&frame(b'E', b"\0")).unwrap();
        assert!(matches!(t.pending.front(), Some(Pending::Sync)));
        t.observe(&frame(b'Z', b"E")).unwrap();
        assert!(t.pending.is_empty());
    }

    #[test]
    fn bind_result_formats_are_read() {
        let mut b = BytesMut::new();
        b.extend_from_slice(b"p\0s\0");
        b.put_i16(1);
        b.put_i16(1);
        b.put_i16(2);
        b.put_i32(3);
        b.extend_from_slice(b"abc");
        b.put_i32(-1);
        b.put_i16(2);
        b.put_i16(0);
        b.put_i16(1);
        assert_eq!(bind_fields(&b).unwrap(), ("p".into(), "s".into(), vec![0, 1]));
        assert!(bind_fields(&b[..10]).is_err());
    }
}
