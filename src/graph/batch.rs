//! The Graph batch wire format (contract §2): building the upstream batches
//! graphcache packs, and reading Graph's batch replies.
//!
//! A reply is a JSON array with exactly one entry per item, in order; an
//! entry is `{code, headers: [{name, value}], body: "<json string>"}`, or
//! `null` when the item was not executed.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use crate::graph::query::CREDENTIAL_PARAMS;
use crate::graph::routes::is_version_segment;
use crate::headers::strip_hop_by_hop;

/// Graph's hard limit on items per batch.
pub const MAX_ITEMS: usize = 50;

/// One GET item of a batch graphcache builds.
#[derive(Debug, Serialize)]
pub struct GetItem<'a> {
    pub method: &'static str,
    pub relative_url: &'a str,
    /// `"Name: value"` strings, the documented form.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// One entry of a batch reply, as a response.
#[derive(Debug, Clone)]
pub struct ItemReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `None` for a `body: null` entry (a 304, or an omitted dependency).
    pub body: Option<Bytes>,
}

/// Why a batch reply could not be read; the whole batch then counts as failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchReplyError {
    #[error("batch reply is not a JSON array: {0}")]
    NotArray(String),
    #[error("batch reply has {got} entries for {expected} items")]
    WrongLength { expected: usize, got: usize },
    #[error("batch reply entry {index} is malformed: {reason}")]
    BadEntry { index: usize, reason: String },
}

#[derive(Deserialize)]
struct RawEntry {
    code: u16,
    #[serde(default)]
    headers: Option<Vec<RawHeader>>,
    #[serde(default)]
    body: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawHeader {
    name: String,
    value: String,
}

/// The `batch` JSON for `items`.
pub fn encode_items(items: &[GetItem<'_>]) -> String {
    serde_json::to_string(items).expect("batch items serialise")
}

/// The form body of a batch POST: `access_token` (and `appsecret_proof`)
/// when the group's token travels in the query, `include_headers=true` so
/// item ETags and usage headers come back, and `batch`.
pub fn form_body(
    access_token: Option<&str>,
    appsecret_proof: Option<&str>,
    batch_json: &str,
) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    if let Some(token) = access_token {
        form.append_pair("access_token", token);
    }
    if let Some(proof) = appsecret_proof {
        form.append_pair("appsecret_proof", proof);
    }
    form.append_pair("include_headers", "true");
    form.append_pair("batch", batch_json);
    form.finish()
}

/// Reads a batch reply for `expected` items.
pub fn decode_reply(
    body: &[u8],
    expected: usize,
) -> Result<Vec<Option<ItemReply>>, BatchReplyError> {
    let entries: Vec<Option<RawEntry>> =
        match serde_json::from_slice::<Vec<serde_json::Value>>(body) {
            Ok(values) => {
                if values.len() != expected {
                    return Err(BatchReplyError::WrongLength {
                        expected,
                        got: values.len(),
                    });
                }
                values
                    .into_iter()
                    .enumerate()
                    .map(|(index, v)| {
                        if v.is_null() {
                            return Ok(None);
                        }
                        serde_json::from_value(v)
                            .map(Some)
                            .map_err(|e| BatchReplyError::BadEntry {
                                index,
                                reason: e.to_string(),
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
            Err(e) => return Err(BatchReplyError::NotArray(e.to_string())),
        };
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| entry.map(|e| item_reply(index, e)).transpose())
        .collect()
}

fn item_reply(index: usize, entry: RawEntry) -> Result<ItemReply, BatchReplyError> {
    let status = StatusCode::from_u16(entry.code).map_err(|_| BatchReplyError::BadEntry {
        index,
        reason: format!("code {}", entry.code),
    })?;
    let mut headers = HeaderMap::new();
    for h in entry.headers.unwrap_or_default() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.append(name, value);
        }
    }
    strip_hop_by_hop(&mut headers);
    headers.remove(http::header::CONTENT_LENGTH);
    let body = match entry.body {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(Bytes::from(s)),
        // Tolerate a body sent as JSON rather than as a string.
        Some(other) => Some(Bytes::from(other.to_string())),
    };
    Ok(ItemReply {
        status,
        headers,
        body,
    })
}

/// The version segment a path starts with (`v26.0`), if any.
pub fn api_version(path: &str) -> Option<&str> {
    let first = path.trim_start_matches('/').split('/').next()?;
    is_version_segment(first).then_some(first)
}

/// A batch item's `relative_url` for a GET of `path?query`: no leading slash,
/// no version (the batch is posted to the versioned root, and items inherit
/// it), credential parameters removed, everything else kept as sent.
pub fn relative_url(path: &str, query: Option<&str>) -> String {
    let trimmed = path.trim_start_matches('/');
    let rest = match api_version(path) {
        Some(version) => trimmed[version.len()..].trim_start_matches('/'),
        None => trimmed,
    };
    let mut url = rest.to_owned();
    if let Some(query) = query_without(query, &CREDENTIAL_PARAMS) {
        url.push('?');
        url.push_str(&query);
    }
    url
}

/// The query string without the parameters whose decoded name is in
/// `names`, everything else kept exactly as sent; None when nothing is left.
pub fn query_without(query: Option<&str>, names: &[&str]) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            let decoded = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(n, _)| n);
            !decoded.is_some_and(|n| names.contains(&n.as_ref()))
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_urls_drop_version_slash_and_credentials() {
        assert_eq!(
            relative_url("/v26.0/123/", Some("access_token=t&fields=name%2Cid")),
            "123/?fields=name%2Cid"
        );
        assert_eq!(
            relative_url("/act_1/ads", Some("appsecret_proof=p&access_token=t")),
            "act_1/ads"
        );
        assert_eq!(
            relative_url("/v26.0/", Some("ids=1,2&access_token=t")),
            "?ids=1,2"
        );
        assert_eq!(api_version("/v26.0/x"), Some("v26.0"));
        assert_eq!(
            query_without(Some("a=1&batch=x&b=%2C"), &["batch"]).as_deref(),
            Some("a=1&b=%2C")
        );
        assert_eq!(query_without(Some("batch=x"), &["batch"]), None);
        assert_eq!(query_without(None, &["batch"]), None);
        assert_eq!(api_version("/x"), None);
    }

    #[test]
    fn items_use_the_documented_string_headers() {
        let json = encode_items(&[
            GetItem {
                method: "GET",
                relative_url: "1?fields=a",
                headers: vec![],
            },
            GetItem {
                method: "GET",
                relative_url: "2",
                headers: vec!["If-None-Match: \"abc\"".into()],
            },
        ]);
        assert_eq!(
            json,
            r#"[{"method":"GET","relative_url":"1?fields=a"},{"method":"GET","relative_url":"2","headers":["If-None-Match: \"abc\""]}]"#
        );
        let form = form_body(Some("tok"), None, &json);
        assert!(form.starts_with("access_token=tok&include_headers=true&batch=%5B"));
    }

    #[test]
    fn replies_decode_with_nulls_304s_and_errors() {
        let body = br#"[
            {"code":200,"headers":[{"name":"ETag","value":"\"e1\""},{"name":"Content-Type","value":"application/json"}],"body":"{\"id\":\"1\"}"},
            null,
            {"code":304,"headers":[],"body":null},
            {"code":400,"body":"{\"error\":{\"code\":100}}"}
        ]"#;
        let items = decode_reply(body, 4).unwrap();
        let first = items[0].as_ref().unwrap();
        assert_eq!(first.status, 200);
        assert_eq!(first.headers["etag"], "\"e1\"");
        assert_eq!(first.body.as_deref(), Some(&b"{\"id\":\"1\"}"[..]));
        assert!(items[1].is_none());
        assert_eq!(items[2].as_ref().unwrap().status, 304);
        assert!(items[2].as_ref().unwrap().body.is_none());
        assert_eq!(items[3].as_ref().unwrap().status, 400);
    }

    #[test]
    fn whole_batch_failures_are_reported() {
        assert!(matches!(
            decode_reply(b"{\"error\":{}}", 1),
            Err(BatchReplyError::NotArray(_))
        ));
        assert_eq!(
            decode_reply(b"[null]", 2).unwrap_err(),
            BatchReplyError::WrongLength {
                expected: 2,
                got: 1
            }
        );
        assert!(matches!(
            decode_reply(b"[{\"x\":1}]", 1),
            Err(BatchReplyError::BadEntry { .. })
        ));
        assert!(matches!(
            decode_reply(b"", 1),
            Err(BatchReplyError::NotArray(_))
        ));
    }
}
