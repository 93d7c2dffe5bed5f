//! Reading a client batch (contract §2.1, §2.2): the `batch` parameter from
//! the query, a form or a JSON body, validated item by item before anything
//! is forwarded.

use http::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

use crate::graph::batch::{api_version, MAX_ITEMS};
use crate::graph::query::QueryParams;
use crate::graph::routes::{objects_of, ObjectId};
use crate::headers::is_media_type;

#[derive(Debug)]
pub struct ClientBatch {
    pub items: Vec<Item>,
    /// Top-level parameters from the body, except `batch` and
    /// `include_headers` (the query string is forwarded as sent).
    pub top_level: Vec<(String, String)>,
    /// The client's `include_headers` (default true).
    pub include_headers: bool,
}

/// One request object of a client batch.
#[derive(Debug)]
pub struct Item {
    /// The object as the client sent it, forwarded unchanged (but for an
    /// added `If-None-Match` when graphcache revalidates).
    pub raw: Map<String, Value>,
    pub method: String,
    pub relative_url: String,
    /// Item headers as (name, value), from either accepted form.
    pub headers: Vec<(String, String)>,
    pub name: Option<String>,
    pub depends_on: Option<String>,
    pub has_files: bool,
    pub body: Option<String>,
}

/// Why a client batch is refused before anything is forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchInputError {
    #[error("the batch parameter is not valid JSON: {0}")]
    Json(String),
    #[error("the batch parameter must be a JSON array of request objects")]
    NotArray,
    #[error("batch item {0} is not an object")]
    NotObject(usize),
    #[error("batch item {0} has no method")]
    NoMethod(usize),
    #[error("batch item {0} has no relative_url")]
    NoRelativeUrl(usize),
    #[error("batch item {0} has a malformed header")]
    BadHeader(usize),
    #[error("Too many requests in batch message. Maximum batch size is 50")]
    TooMany,
}

/// The `batch` parameter and the other top-level parameters of a POST, if it
/// is a batch: from the query string, a form body, or a JSON body (`batch` as
/// an array or as a string). None when the request carries no `batch`.
pub fn parse(
    query: &QueryParams<'_>,
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> Result<Option<ClientBatch>, BatchInputError> {
    let is_json = is_media_type(content_type, "application/json");
    let mut top_level = Vec::new();
    let mut batch: Option<Value> = None;
    let mut include_headers = None;
    if is_json {
        // A JSON body that is not an object carries no parameters: such a
        // POST is a batch only if its query string says so.
        let object = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => object,
            _ => Map::new(),
        };
        for (name, value) in object {
            match name.as_str() {
                "batch" => batch = Some(value),
                "include_headers" => include_headers = Some(flag(&scalar(&value))),
                _ => top_level.push((name, scalar(&value))),
            }
        }
    } else {
        for (name, value) in form_urlencoded::parse(body) {
            match name.as_ref() {
                "batch" => batch = Some(Value::String(value.into_owned())),
                "include_headers" => include_headers = Some(flag(&value)),
                _ => top_level.push((name.into_owned(), value.into_owned())),
            }
        }
    }
    if batch.is_none() {
        batch = query.get("batch").map(|b| Value::String(b.to_owned()));
    }
    if include_headers.is_none() {
        include_headers = query.get("include_headers").map(flag);
    }
    let Some(batch) = batch else { return Ok(None) };
    let batch = match batch {
        Value::String(text) => {
            serde_json::from_str(&text).map_err(|e| BatchInputError::Json(e.to_string()))?
        }
        other => other,
    };
    let Value::Array(values) = batch else {
        return Err(BatchInputError::NotArray);
    };
    if values.len() > MAX_ITEMS {
        return Err(BatchInputError::TooMany);
    }
    let items = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| item(i, v))
        .collect::<Result<_, _>>()?;
    Ok(Some(ClientBatch {
        items,
        top_level,
        include_headers: include_headers.unwrap_or(true),
    }))
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn flag(value: &str) -> bool {
    !matches!(value.trim().to_ascii_lowercase().as_str(), "false" | "0")
}

fn item(index: usize, value: Value) -> Result<Item, BatchInputError> {
    let Value::Object(raw) = value else {
        return Err(BatchInputError::NotObject(index));
    };
    let method = raw
        .get("method")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .ok_or(BatchInputError::NoMethod(index))?
        .trim()
        .to_ascii_uppercase();
    let relative_url = raw
        .get("relative_url")
        .and_then(Value::as_str)
        .ok_or(BatchInputError::NoRelativeUrl(index))?
        .to_owned();
    let mut headers = Vec::new();
    for header in raw
        .get("headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (name, value) = match header {
            Value::String(line) => {
                let (n, v) = line
                    .split_once(':')
                    .ok_or(BatchInputError::BadHeader(index))?;
                (n.trim().to_owned(), v.trim().to_owned())
            }
            Value::Object(o) => (
                o.get("name")
                    .and_then(Value::as_str)
                    .ok_or(BatchInputError::BadHeader(index))?
                    .to_owned(),
                o.get("value")
                    .and_then(Value::as_str)
                    .ok_or(BatchInputError::BadHeader(index))?
                    .to_owned(),
            ),
            _ => return Err(BatchInputError::BadHeader(index)),
        };
        // CR/LF (or any control) would split the header upstream.
        if HeaderName::from_bytes(name.as_bytes()).is_err()
            || HeaderValue::from_str(&value).is_err()
        {
            return Err(BatchInputError::BadHeader(index));
        }
        headers.push((name, value));
    }
    let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
    Ok(Item {
        method,
        name: text("name"),
        depends_on: text("depends_on"),
        body: text("body"),
        has_files: raw.contains_key("attached_files") || raw.contains_key("attachedFiles"),
        relative_url,
        headers,
        raw,
    })
}

impl Item {
    /// The path and query the same request would have as a single call, with
    /// the batch's version applied when the item names none.
    pub fn single_target(&self, outer_path: &str) -> (String, Option<String>) {
        let url = self.relative_url.trim_start_matches('/');
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (url, None),
        };
        let path = if api_version(&format!("/{path}")).is_some() {
            format!("/{path}")
        } else {
            match api_version(outer_path) {
                Some(version) => format!("/{version}/{path}"),
                None => format!("/{path}"),
            }
        };
        (path, query)
    }

    /// The item's own `If-None-Match`, if it sent one.
    pub fn if_none_match(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("if-none-match"))
            .map(|(_, v)| v.as_str())
    }

    /// The objects a write item touches: its node and the ids in its
    /// parameters (relative_url query and form body).
    pub fn objects(&self, outer_path: &str) -> Vec<ObjectId> {
        let (path, query) = self.single_target(outer_path);
        let query = QueryParams::parse(query.as_deref());
        let body: Vec<(String, String)> = self
            .body
            .as_deref()
            .map(|b| form_urlencoded::parse(b.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        objects_of(
            &path,
            query
                .iter()
                .chain(body.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        )
    }

    /// Every value of `name` in the item's `relative_url` query.
    pub fn url_values(&self, name: &str) -> Vec<String> {
        let (_, query) = self.single_target("/");
        let query = QueryParams::parse(query.as_deref());
        query
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.to_owned())
            .collect()
    }

    pub fn is_write(&self) -> bool {
        if self.method != "GET" && self.method != "HEAD" {
            return true;
        }
        let (_, query) = self.single_target("/");
        QueryParams::parse(query.as_deref()).overrides_to_write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_form(body: &str) -> Result<Option<ClientBatch>, BatchInputError> {
        parse(&QueryParams::parse(None), None, body.as_bytes())
    }

    #[test]
    fn python_sdk_form_batch() {
        let batch = r#"[{"method":"GET","relative_url":"111/?fields=name"},{"method":"GET","relative_url":"222/?fields=name","headers":[{"name":"If-None-Match","value":"\"x\""}]}]"#;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", batch)
            .finish();
        let parsed = parse_form(&body).unwrap().unwrap();
        assert_eq!(parsed.items.len(), 2);
        assert!(parsed.include_headers);
        assert_eq!(
            parsed.items[0].single_target("/v26.0/"),
            ("/v26.0/111/".into(), Some("fields=name".into()))
        );
        assert_eq!(parsed.items[1].if_none_match(), Some("\"x\""));
    }

    #[test]
    fn node_sdk_json_batch_and_string_batch() {
        let json = br#"{"batch":[{"method":"GET","relative_url":"111?fields=name,status"}],"include_headers":false}"#;
        let ct = HeaderValue::from_static("application/json");
        let parsed = parse(&QueryParams::parse(Some("access_token=t")), Some(&ct), json)
            .unwrap()
            .unwrap();
        assert!(!parsed.include_headers);
        assert_eq!(
            parsed.items[0].single_target("/v24.0"),
            ("/v24.0/111".into(), Some("fields=name,status".into()))
        );
        let json = br#"{"batch":"[{\"method\":\"get\",\"relative_url\":\"/v25.0/me\"}]","access_token":"t"}"#;
        let parsed = parse(&QueryParams::parse(None), Some(&ct), json)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.items[0].method, "GET");
        assert_eq!(
            parsed.items[0].single_target("/"),
            ("/v25.0/me".into(), None)
        );
        assert_eq!(
            parsed.top_level,
            [("access_token".to_owned(), "t".to_owned())]
        );
    }

    #[test]
    fn query_string_batch_and_bare_query_items() {
        let q = QueryParams::parse(Some("batch=%5B%7B%22method%22%3A%22GET%22%2C%22relative_url%22%3A%22%3Fids%3D1%2C2%22%7D%5D"));
        let parsed = parse(&q, None, b"").unwrap().unwrap();
        assert_eq!(
            parsed.items[0].single_target("/v26.0"),
            ("/v26.0/".into(), Some("ids=1,2".into()))
        );
        assert!(parse(&QueryParams::parse(Some("a=1")), None, b"x=1")
            .unwrap()
            .is_none());
    }

    #[test]
    fn malformed_batches_are_refused() {
        assert!(matches!(
            parse_form("batch=%5Bnot"),
            Err(BatchInputError::Json(_))
        ));
        assert_eq!(
            parse_form("batch=%7B%7D").unwrap_err(),
            BatchInputError::NotArray
        );
        assert_eq!(
            parse_form("batch=%5B1%5D").unwrap_err(),
            BatchInputError::NotObject(0)
        );
        assert_eq!(
            parse_form(r#"batch=[{"relative_url":"me"}]"#).unwrap_err(),
            BatchInputError::NoMethod(0)
        );
        assert_eq!(
            parse_form(r#"batch=[{"method":"GET"}]"#).unwrap_err(),
            BatchInputError::NoRelativeUrl(0)
        );
        let crlf = form_urlencoded::Serializer::new(String::new())
            .append_pair(
                "batch",
                r#"[{"method":"GET","relative_url":"me","headers":["X-A: 1\r\nX-B: 2"]}]"#,
            )
            .finish();
        assert_eq!(
            parse_form(&crlf).unwrap_err(),
            BatchInputError::BadHeader(0)
        );
        let many: Vec<String> = (0..51)
            .map(|i| format!(r#"{{"method":"GET","relative_url":"{i}"}}"#))
            .collect();
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", &format!("[{}]", many.join(",")))
            .finish();
        assert_eq!(parse_form(&body).unwrap_err(), BatchInputError::TooMany);
    }

    proptest::proptest! {
        /// Any body in any encoding: a batch, no batch, or an error; never a
        /// panic.
        #[test]
        fn the_parser_never_panics(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            json in proptest::bool::ANY,
            query in "[a-z_=&%0-9\\[\\]{}\"]{0,40}",
        ) {
            let ct = HeaderValue::from_static("application/json");
            let _ = parse(&QueryParams::parse(Some(&query)), json.then_some(&ct), &body);
        }

        /// Items encoded the documented ways come back as sent, in order.
        #[test]
        fn items_round_trip_through_form_json_and_query(
            urls in proptest::collection::vec("[a-z0-9_/?=&,.]{1,24}", 1..50),
        ) {
            let items: Vec<serde_json::Value> = urls
                .iter()
                .map(|u| serde_json::json!({"method": "GET", "relative_url": u}))
                .collect();
            let text = serde_json::Value::Array(items.clone()).to_string();
            let form = form_urlencoded::Serializer::new(String::new())
                .append_pair("batch", &text)
                .finish();
            let json = serde_json::json!({"batch": items}).to_string();
            let query = format!("batch={}", form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>());
            let ct = HeaderValue::from_static("application/json");
            for parsed in [
                parse(&QueryParams::parse(None), None, form.as_bytes()),
                parse(&QueryParams::parse(None), Some(&ct), json.as_bytes()),
                parse(&QueryParams::parse(Some(&query)), None, b""),
            ] {
                let parsed = parsed.unwrap().unwrap();
                let got: Vec<&str> = parsed.items.iter().map(|i| i.relative_url.as_str()).collect();
                proptest::prop_assert_eq!(got, urls.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
    }
}
