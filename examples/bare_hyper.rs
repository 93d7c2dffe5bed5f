//! The ceiling for the performance race (`bench/race/run.sh`): hyper 1.x
//! and tokio answering every path with one prebuilt 2 KB Graph-like body
//! and Graph's headers, 304 on a matching `If-None-Match`; one worker per
//! available core. What a hyper-based cache hit could cost with a free
//! lookup.
//!
//!     cargo run --release --example bare-hyper -- 127.0.0.1:18086

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, EXPIRES, IF_NONE_MATCH};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const ETAG_VALUE: &str = "\"0123456789abcdef0123456789abcdef01234567\"";

fn body() -> Bytes {
    let mut data = String::from("{\"id\":\"1\",\"name\":\"Object 1\",\"data\":\"");
    while data.len() < 2000 {
        data.push_str("0123456789abcdef");
    }
    data.push_str("\"}");
    Bytes::from(data)
}

async fn answer(
    request: Request<Incoming>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let matched = request
        .headers()
        .get(IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == ETAG_VALUE.as_bytes());
    let mut response = if matched {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Full::new(body))
    };
    let headers = response.headers_mut();
    headers.insert(ETAG, HeaderValue::from_static(ETAG_VALUE));
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate"),
    );
    headers.insert(
        EXPIRES,
        HeaderValue::from_static("Sat, 01 Jan 2000 00:00:00 GMT"),
    );
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    Ok(response)
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18086".to_owned())
        .parse()
        .expect("an address such as 127.0.0.1:18086");
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async move {
            let listener = TcpListener::bind(addr).await.expect("binds");
            println!("bare hyper listening on http://{addr} ({workers} workers)");
            let body = body();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |r| answer(r, body.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
}
