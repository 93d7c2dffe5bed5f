//! Building the reply to a client batch: exactly one entry per item, in
//! request order (§2.5), each `{code, headers, body}` with `body` a string.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;
use serde_json::{Map, Value};

use crate::body::ResponseBody;
use crate::client_batch::parse::Item;
use crate::headers::{if_none_match_matches, CACHE_STATUS};

/// One entry of the reply: `{code, headers, body}`; `headers` left out when
/// the client asked `include_headers=false`.
pub fn reply_entry<'h>(
    code: u16,
    headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    body: Option<&Bytes>,
    include_headers: bool,
) -> Value {
    let mut entry = Map::new();
    entry.insert("code".into(), Value::from(code));
    if include_headers {
        let list: Vec<Value> = headers
            .into_iter()
            .map(|(n, v)| {
                serde_json::json!({"name": graph_header_name(n.as_str()), "value": String::from_utf8_lossy(v.as_bytes())})
            })
            .collect();
        entry.insert("headers".into(), Value::Array(list));
    }
    entry.insert(
        "body".into(),
        match body {
            Some(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
            None => Value::Null,
        },
    );
    Value::Object(entry)
}

/// Header names as Graph spells them in batch items (`ETag`, `Content-Type`).
fn graph_header_name(name: &str) -> String {
    if name == "etag" {
        return "ETag".to_owned();
    }
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// An item's answer (a stored entry, or a 200 fetched for it): 304 with no
/// body when the item sent its own matching `If-None-Match`, else 200 with
/// the body. A 304 goes only to an item that asked for one (§2.6).
pub fn conditional_entry<'h>(
    item: &Item,
    etag: Option<&HeaderValue>,
    headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    body: &Bytes,
    include_headers: bool,
) -> Value {
    let matches = match (item.if_none_match(), etag) {
        (Some(theirs), Some(ours)) => match HeaderValue::from_str(theirs) {
            Ok(v) => {
                let mut asked = HeaderMap::new();
                asked.insert(header::IF_NONE_MATCH, v);
                if_none_match_matches(&asked, ours)
            }
            Err(_) => false,
        },
        _ => false,
    };
    if matches {
        reply_entry(304, headers, None, include_headers)
    } else {
        reply_entry(200, headers, Some(body), include_headers)
    }
}

/// Rewrites the `body` strings of reply entries with `rewrite` (paging
/// links); an entry whose body changed gets a weak ETag, as a single
/// response would.
pub fn rewrite_bodies(
    entries: &mut [Value],
    has_links: impl Fn(&[u8]) -> bool,
    rewrite: impl Fn(&Bytes) -> Bytes,
) {
    for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
        let Some(Value::String(body)) = entry.get("body") else {
            continue;
        };
        if !has_links(body.as_bytes()) {
            continue;
        }
        let original = Bytes::from(body.clone());
        let rewritten = rewrite(&original);
        if rewritten == original {
            continue;
        }
        entry.insert(
            "body".into(),
            Value::String(String::from_utf8_lossy(&rewritten).into_owned()),
        );
        for h in entry
            .get_mut("headers")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let is_etag = h
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n.eq_ignore_ascii_case("etag"));
            if let (true, Some(Value::String(tag))) = (is_etag, h.get_mut("value")) {
                if !tag.starts_with("W/") {
                    tag.insert_str(0, "W/");
                }
            }
        }
    }
}

/// The reply array, with Graph's headers from the upstream batch when there
/// was one.
pub fn batch_reply(
    entries: &[Value],
    upstream: Option<&HeaderMap>,
    cache_status: HeaderValue,
) -> Response<ResponseBody> {
    let body = Bytes::from(serde_json::to_vec(entries).expect("reply serialises"));
    let mut response = Response::new(ResponseBody::full(body));
    let headers = response.headers_mut();
    if let Some(upstream) = upstream {
        headers.extend(upstream.iter().map(|(n, v)| (n.clone(), v.clone())));
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static(
            "private, no-cache, no-store, must-revalidate",
        ));
    headers.insert(CACHE_STATUS, cache_status);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_entries_honour_include_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"e\""));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let body = Bytes::from_static(b"{\"id\":\"1\"}");
        let entry = reply_entry(200, &headers, Some(&body), true);
        assert_eq!(entry["code"], 200);
        assert_eq!(entry["headers"][0]["name"], "ETag");
        assert_eq!(entry["headers"][1]["name"], "Content-Type");
        assert_eq!(entry["body"], "{\"id\":\"1\"}");
        let bare = reply_entry(304, &headers, None, false);
        assert!(bare.get("headers").is_none());
        assert!(bare["body"].is_null());
    }

    #[test]
    fn rewritten_bodies_get_weak_tags() {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"e\""));
        let mut entries = vec![
            reply_entry(200, &headers, Some(&Bytes::from_static(b"old")), true),
            reply_entry(200, &headers, Some(&Bytes::from_static(b"same")), true),
            Value::Null,
        ];
        rewrite_bodies(
            &mut entries,
            |b| b == b"old",
            |b| {
                if &b[..] == b"old" {
                    Bytes::from_static(b"new")
                } else {
                    b.clone()
                }
            },
        );
        assert_eq!(entries[0]["body"], "new");
        assert_eq!(entries[0]["headers"][0]["value"], "W/\"e\"");
        assert_eq!(entries[1]["headers"][0]["value"], "\"e\"");
        assert!(entries[2].is_null());
    }
}
