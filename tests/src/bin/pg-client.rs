//! A PostgreSQL client for the end-to-end tests, run inside guarded cgroups.
//! It speaks the extended protocol through tokio-postgres and prints one JSON
//! object per statement.
//!
//! - `pg-client query HOST PORT USER PASSWORD DB`: statements from stdin, one
//!   per line; a line `PIPELINE a ;; b ;; c` sends its statements pipelined,
//!   a line `SIMPLE sql` sends it with the simple query protocol (rows as
//!   text).
//! - `pg-client cancel HOST PORT USER PASSWORD DB`: starts `SELECT
//!   pg_sleep(30)` and cancels it through the cancel key the server gave.
//! - `pg-client fncall HOST PORT DB OID`: raw protocol: start-up, one
//!   FunctionCall message for OID, then `SELECT 1` on the same connection.
use std::{
    io::{BufRead, Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls, Row};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match mode {
        "query" | "cancel" => {
            let conn = format!(
                "host={} port={} user={} password='{}' dbname={} connect_timeout=10",
                args[2], args[3], args[4], args[5], args[6]
            );
            rt.block_on(async move {
                let (client, connection) = match tokio_postgres::connect(&conn, NoTls).await {
                    Ok(c) => c,
                    Err(e) => {
                        println!("{}", json!({"connected": false, "error": error_json(&e)}));
                        return;
                    }
                };
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                println!("{}", json!({"connected": true}));
                if mode == "cancel" {
                    cancel(&client).await
                } else {
                    queries(&client).await
                }
            });
        }
        "fncall" => fncall(&args[2], &args[3], &args[4], args[5].parse().unwrap()),
        _ => panic!("usage: pg-client query|cancel|fncall ..."),
    }
}

async fn queries(client: &Client) {
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("PIPELINE ") {
            let sqls: Vec<&str> = rest.split(" ;; ").collect();
            let futures = sqls.iter().map(|s| client.query(*s, &[]));
            let results = futures_util::future::join_all(futures).await;
            for (sql, r) in sqls.iter().zip(results) {
                println!("{}", result_json(sql, r));
            }
        } else if let Some(sql) = line.strip_prefix("SIMPLE ") {
            let r = client.simple_query(sql).await;
            println!("{}", simple_json(sql, r));
        } else {
            let r = client.query(line.as_str(), &[]).await;
            println!("{}", result_json(&line, r));
        }
    }
}

async fn cancel(client: &Client) {
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        token.cancel_query(NoTls).await.map_err(|e| e.to_string())
    });
    let r = client.query("SELECT pg_sleep(30)", &[]).await;
    let c = canceller.await.unwrap();
    println!(
        "{}",
        json!({"cancel_sent": c.is_ok(), "cancel_error": c.err(), "result": result_json("SELECT pg_sleep(30)", r)})
    );
}

fn error_json(e: &tokio_postgres::Error) -> Value {
    match e.as_db_error() {
        Some(db) => json!({"code": db.code().code(), "message": db.message(), "detail": db.detail()}),
        None => json!({"code": null, "message": e.to_string()}),
    }
}

fn simple_json(sql: &str, r: Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>) -> Value {
    use tokio_postgres::SimpleQueryMessage;
    match r {
        Ok(msgs) => {
            let rows: Vec<Value> = msgs
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => {
                        Some(json!((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect::<Vec<_>>()))
                    }
                    _ => None,
                })
                .collect();
            json!({"sql": sql, "ok": true, "rows": rows})
        }
        Err(e) => json!({"sql": sql, "ok": false, "error": error_json(&e)}),
    }
}

fn result_json(sql: &str, r: Result<Vec<Row>, tokio_postgres::Error>) -> Value {
    match r {
        Ok(rows) => json!({"sql": sql, "ok": true, "rows": rows.iter().map(row_json).collect::<Vec<_>>()}),
        Err(e) => json!({"sql": sql, "ok": false, "error": error_json(&e)}),
    }
}

fn row_json(row: &Row) -> Value {
    let cols = (0..row.len())
        .map(|i| {
            if let Ok(v) = row.try_get::<_, Option<String>>(i) {
                return json!(v);
            }
            if let Ok(v) = row.try_get::<_, Option<i64>>(i) {
                return json!(v);
            }
            if let Ok(v) = row.try_get::<_, Option<i32>>(i) {
                return json!(v);
            }
            if let Ok(v) = row.try_get::<_, Option<bool>>(i) {
                return json!(v);
            }
            json!("?")
        })
        .collect::<Vec<_>>();
    Value::Array(cols)
}

/// Raw protocol, for the FunctionCall message no driver sends.
fn fncall(host: &str, port: &str, db: &str, oid: u32) {
    let mut s = TcpStream::connect(format!("{host}:{port}")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", "nobody-in-particular"), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).unwrap();
    let startup = read_until_ready(&mut s);

    // FunctionCall: oid, no argument formats, one int4 argument (text 1),
    // text result.
    let mut f = Vec::new();
    f.extend_from_slice(&(oid as i32).to_be_bytes());
    f.extend_from_slice(&0i16.to_be_bytes());
    f.extend_from_slice(&1i16.to_be_bytes());
    f.extend_from_slice(&1i32.to_be_bytes());
    f.push(b'1');
    f.extend_from_slice(&0i16.to_be_bytes());
    send(&mut s, b'F', &f);
    let call = read_until_ready(&mut s);
    send(&mut s, b'Q', b"SELECT 'still usable'\0");
    let after = read_until_ready(&mut s);
    println!("{}", json!({"startup": startup, "fncall": call, "after": after}));
}

fn send(s: &mut TcpStream, tag: u8, body: &[u8]) {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).unwrap();
}

/// Reads messages up to ReadyForQuery; reports tags, error fields and
/// DataRow texts.
fn read_until_ready(s: &mut TcpStream) -> Value {
    let mut tags = String::new();
    let mut errors = Vec::new();
    let mut data = Vec::new();
    let mut values = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).is_err() {
            tags.push('!');
            break;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        tags.push(head[0] as char);
        match head[0] {
            b'E' => {
                let mut e = serde_json::Map::new();
                for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
                    e.insert((field[0] as char).to_string(), json!(String::from_utf8_lossy(&field[1..])));
                }
                errors.push(Value::Object(e));
            }
            b'D' => data.push(json!(String::from_utf8_lossy(&body[6..]))),
            // FunctionCallResponse: int32 length (-1: NULL), then the value.
            b'V' => values.push(if i32::from_be_bytes([body[0], body[1], body[2], body[3]]) < 0 {
                Value::Null
            } else {
                json!(String::from_utf8_lossy(&body[4..]))
            }),
            b'Z' => break,
            _ => {}
        }
    }
    json!({"tags": tags, "errors": errors, "data": data, "values": values})
}
