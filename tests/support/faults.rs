//! A Graph-like upstream that misbehaves on the wire, byte by byte.
//!
//! The hyper-based mock cannot break HTTP/1.1 framing on purpose, so this
//! one writes raw bytes: while healthy it answers like Graph (a 2 KB JSON
//! object with a strong ETag, Graph's no-store headers, 304 on a matching
//! `If-None-Match`, keep-alive); switched to a [`Fault`], every request gets
//! that fault. It counts what arrived, by method.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the upstream misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers like Graph.
    Healthy,
    /// Head and part of the body, then a TCP reset.
    ResetMidBody,
    /// A chunked body that stops before its last chunk, then FIN.
    TruncatedChunked,
    /// `Content-Length` larger than the body sent, then FIN.
    LengthMismatch,
    /// The head, then silence (the connection stays open).
    HangAfterHeaders,
    /// The head and half the body, then silence.
    HangMidBody,
    /// The body one byte every 100 ms (a complete answer would take 200 s).
    SlowDrip,
    /// Answers like Graph, then closes the connection without saying so
    /// (no `Connection: close`): the keep-alive connection dies in the pool.
    CloseAfterAnswer,
}

#[derive(Default)]
struct Counts {
    gets: AtomicU64,
    posts: AtomicU64,
    connections: AtomicU64,
}

pub struct FaultyGraph {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    counts: Arc<Counts>,
    arrivals: watch::Receiver<u64>,
    /// Dropped with the server: releases every hung connection.
    _stop: watch::Sender<()>,
}

const BODY_LEN: usize = 2000;

impl FaultyGraph {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(Fault::Healthy));
        let counts = Arc::new(Counts::default());
        let (stop, stopped) = watch::channel(());
        let (arrived, arrivals) = watch::channel(0u64);
        let arrived = Arc::new(arrived);
        let (f, c) = (fault.clone(), counts.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(
                    stream,
                    f.clone(),
                    c.clone(),
                    arrived.clone(),
                    stopped.clone(),
                ));
            }
        });
        Self {
            addr,
            fault,
            counts,
            arrivals,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    pub fn gets(&self) -> u64 {
        self.counts.gets.load(Ordering::SeqCst)
    }

    pub fn posts(&self) -> u64 {
        self.counts.posts.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` requests have arrived in all.
    pub async fn wait_for_requests(&self, n: u64) {
        let mut rx = self.arrivals.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&got| got >= n))
            .await
            .expect("requests arrive")
            .unwrap();
    }

    /// The body a healthy answer to `path` carries.
    pub fn body_for(path: &str) -> String {
        let id = path.rsplit('/').next().unwrap_or("");
        let head = format!("{{\"id\":\"{id}\",\"name\":\"Object {id}\",\"pad\":\"");
        let pad = "x".repeat(BODY_LEN - head.len() - 2);
        format!("{head}{pad}\"}}")
    }

    /// What a write is answered: Graph's `{"success":true}`, padded to the
    /// same length so every fault can cut it.
    pub fn write_answer() -> String {
        let head = "{\"success\":true,\"pad\":\"";
        format!("{head}{}\"}}", "x".repeat(BODY_LEN - head.len() - 2))
    }

    pub fn etag_for(path: &str) -> String {
        format!(
            "\"{}\"",
            blake3::hash(Self::body_for(path).as_bytes()).to_hex()
        )
    }
}

/// One request head as read off the socket.
struct Head {
    method: String,
    path: String,
    if_none_match: Option<String>,
    content_length: usize,
}

/// Reads one request (head and `Content-Length` body); None at EOF.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Head> {
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut start = lines.next()?.split(' ');
    let (method, target) = (start.next()?.to_owned(), start.next()?.to_owned());
    let mut head = Head {
        method,
        path: target.split('?').next().unwrap_or("").to_owned(),
        if_none_match: None,
        content_length: 0,
    };
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.content_length = value.parse().ok()?;
            } else if name.eq_ignore_ascii_case("if-none-match") {
                head.if_none_match = Some(value.to_owned());
            }
        }
    }
    buf.drain(..end);
    while buf.len() < head.content_length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..head.content_length);
    Some(head)
}

async fn write(stream: &mut TcpStream, data: Vec<u8>) -> bool {
    stream.write_all(&data).await.is_ok()
}

fn healthy_head(status: &str, length: usize, etag: Option<&str>) -> String {
    let etag = etag.map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=UTF-8\r\n\
         Cache-Control: private, no-cache, no-store, must-revalidate\r\n\
         Expires: Sat, 01 Jan 2000 00:00:00 GMT\r\n{etag}Content-Length: {length}\r\n\r\n"
    )
}

async fn serve(
    mut stream: TcpStream,
    fault: Arc<Mutex<Fault>>,
    counts: Arc<Counts>,
    arrived: Arc<watch::Sender<u64>>,
    mut stopped: watch::Receiver<()>,
) {
    let mut buf = Vec::new();
    while let Some(head) = read_request(&mut stream, &mut buf).await {
        match head.method.as_str() {
            "POST" => counts.posts.fetch_add(1, Ordering::SeqCst),
            _ => counts.gets.fetch_add(1, Ordering::SeqCst),
        };
        arrived.send_modify(|n| *n += 1);
        let body = if head.method == "POST" {
            FaultyGraph::write_answer()
        } else {
            FaultyGraph::body_for(&head.path)
        };
        let etag = (head.method != "POST").then(|| FaultyGraph::etag_for(&head.path));
        let current = *fault.lock().unwrap();
        let bytes = body.as_bytes();
        let full_head = healthy_head("200 OK", bytes.len(), etag.as_deref());
        match current {
            Fault::Healthy | Fault::CloseAfterAnswer => {
                let not_modified = etag.is_some() && head.if_none_match == etag;
                let reply = if not_modified {
                    format!(
                        "HTTP/1.1 304 Not Modified\r\nETag: {}\r\n\r\n",
                        etag.as_deref().unwrap_or("")
                    )
                    .into_bytes()
                } else {
                    [full_head.as_bytes(), bytes].concat()
                };
                if !write(&mut stream, reply).await {
                    return;
                }
                if current == Fault::CloseAfterAnswer {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
            Fault::ResetMidBody => {
                write(&mut stream, [full_head.as_bytes(), &bytes[..500]].concat()).await;
                let _ = stream.flush().await;
                // SO_LINGER 0: close sends RST instead of FIN.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                return;
            }
            Fault::TruncatedChunked => {
                let head = full_head.replace(
                    &format!("Content-Length: {}", bytes.len()),
                    "Transfer-Encoding: chunked",
                );
                let chunk = format!("{:x}\r\n", 1000);
                write(
                    &mut stream,
                    [head.as_bytes(), chunk.as_bytes(), &bytes[..1000], b"\r\n"].concat(),
                )
                .await;
                let _ = stream.shutdown().await;
                return;
            }
            Fault::LengthMismatch => {
                write(&mut stream, [full_head.as_bytes(), &bytes[..1000]].concat()).await;
                let _ = stream.shutdown().await;
                return;
            }
            Fault::HangAfterHeaders | Fault::HangMidBody => {
                let sent = if current == Fault::HangMidBody {
                    &bytes[..bytes.len() / 2]
                } else {
                    &[][..]
                };
                write(&mut stream, [full_head.as_bytes(), sent].concat()).await;
                // Silent until graphcache gives up (EOF) or the test ends.
                let mut sink = [0u8; 1024];
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = async { while let Ok(n) = stream.read(&mut sink).await { if n == 0 { break } } } => {}
                }
                return;
            }
            Fault::SlowDrip => {
                if !write(&mut stream, full_head.into_bytes()).await {
                    return;
                }
                for byte in bytes {
                    tokio::select! {
                        _ = stopped.changed() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    if !write(&mut stream, vec![*byte]).await {
                        return;
                    }
                }
            }
        }
    }
}
