//! Planning a client batch: which items stand alone (and so may be answered
//! from the cache), whose identity each item reads under, and what each
//! write touched, resolving `{result=name:$.path}` references (§2.4) from the
//! reply where the referenced result is visible.

use std::collections::HashSet;

use serde_json::Value;

use crate::cache::identity::{single_value, Ambiguous, Credentials, TokenHasher, TokenIdentity};
pub use crate::cache::WriteScope;
use crate::client_batch::parse::{ClientBatch, Item};
use crate::graph::query::QueryParams;
use crate::graph::routes::{names_ids, objects_of, ObjectId};

/// Which items graphcache may answer from its cache: GETs that stand alone
/// (not named by a dependency or a `{result=}` reference, no `depends_on`,
/// no reference of their own, no files, no JSONP) and that read no object a
/// write in the same batch touches.
pub fn standalone(batch: &ClientBatch, outer_path: &str) -> Vec<bool> {
    let referenced: HashSet<&str> = batch
        .items
        .iter()
        .flat_map(|item| {
            let mut names: Vec<&str> = item.depends_on.as_deref().into_iter().collect();
            for text in [Some(item.relative_url.as_str()), item.body.as_deref()]
                .into_iter()
                .flatten()
            {
                names.extend(result_references(text));
            }
            names
        })
        .collect();
    let written: HashSet<ObjectId> = batch
        .items
        .iter()
        .filter(|i| i.is_write())
        .flat_map(|i| i.objects(outer_path))
        .collect();
    batch
        .items
        .iter()
        .map(|item| {
            let (path, query) = item.single_target(outer_path);
            let query = QueryParams::parse(query.as_deref());
            item.method == "GET"
                && !item.is_write()
                && item.depends_on.is_none()
                && !item.has_files
                && !item.relative_url.contains("{result=")
                && !query.contains("callback")
                && !item.name.as_deref().is_some_and(|n| referenced.contains(n))
                && !objects_of(&path, query.iter())
                    .iter()
                    .any(|o| written.contains(o))
        })
        .collect()
}

/// Names referenced as `{result=<name>:<jsonpath>}` in `text`.
fn result_references(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices("{result=")
        .filter_map(move |(at, marker)| {
            let rest = &text[at + marker.len()..];
            let end = rest.find([':', '}'])?;
            Some(&rest[..end])
        })
}

/// The credentials of a batch as a whole: its top-level token and proof (query
/// and body, each at most once, agreeing) and its `Authorization`.
#[derive(Debug, Clone, Default)]
pub struct BatchCredentials {
    pub token: Option<String>,
    pub proof: Option<String>,
    pub authorization: Option<String>,
}

impl BatchCredentials {
    /// Reads them from the query and the batch's top-level body parameters.
    pub fn of(
        query: &QueryParams<'_>,
        top_level: &[(String, String)],
        authorization: Option<&str>,
    ) -> Result<Self, Ambiguous> {
        let body = |name: &'static str| {
            top_level
                .iter()
                .filter(move |(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let url = |name: &'static str| {
            query
                .iter()
                .filter(move |(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        let token = single_value([
            url("access_token").collect::<Vec<_>>(),
            body("access_token").collect(),
        ])?;
        let proof = single_value([
            url("appsecret_proof").collect::<Vec<_>>(),
            body("appsecret_proof").collect(),
        ])?;
        Ok(Self {
            token: token.map(str::to_owned),
            proof: proof.map(str::to_owned),
            authorization: authorization.map(str::to_owned),
        })
    }

    /// The identity the batch as a whole speaks for.
    pub fn identity(&self, hasher: &TokenHasher) -> TokenIdentity {
        hasher.identify(&Credentials {
            token: self.token.as_deref(),
            proof: self.proof.as_deref(),
            authorization: self.authorization.as_deref().map(Into::into),
        })
    }
}

/// The identity a read item is answered for: its own token (and proof) when
/// its `relative_url` carries one, else the batch's. None when the item's
/// credentials are ambiguous (repeated, empty, conflicting), when it carries
/// a body or its own `Authorization` header (Graph may read either), or
/// when the batch's own are ambiguous: such an item never touches the cache.
pub fn item_identity(
    item: &Item,
    batch: &Result<BatchCredentials, Ambiguous>,
    hasher: &TokenHasher,
) -> Option<TokenIdentity> {
    let batch = batch.as_ref().ok()?;
    if item.body.is_some()
        || item
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("authorization"))
    {
        return None;
    }
    let tokens = item.url_values("access_token");
    let proofs = item.url_values("appsecret_proof");
    let token = single_value([tokens.iter().map(String::as_str)]).ok()?;
    let proof = single_value([proofs.iter().map(String::as_str)]).ok()?;
    // The batch's proof goes upstream with the batch's token: an item that
    // reads with that token (its own copy of it, or none) carries it too.
    let credentials = match token {
        Some(token) if batch.token.as_deref() != Some(token) => Credentials {
            token: Some(token),
            proof,
            authorization: batch.authorization.as_deref().map(Into::into),
        },
        _ => Credentials {
            token: batch.token.as_deref(),
            proof: single_value([batch.proof.as_deref().into_iter(), proof.into_iter()]).ok()?,
            authorization: batch.authorization.as_deref().map(Into::into),
        },
    };
    Some(hasher.identify(&credentials))
}

/// Whom an item's answer speaks about, for the usage and throttle state:
/// its cache identity when it has one, else the batch's caller. Unlike the
/// cache identity, a write's body does not blur it.
pub fn item_caller(
    item: &Item,
    batch: &Result<BatchCredentials, Ambiguous>,
    hasher: &TokenHasher,
) -> Option<TokenIdentity> {
    let bare = Item {
        body: None,
        headers: Vec::new(),
        raw: Default::default(),
        method: item.method.clone(),
        relative_url: item.relative_url.clone(),
        name: None,
        depends_on: None,
        has_files: false,
    };
    item_identity(&bare, batch, hasher).or_else(|| batch.as_ref().ok().map(|b| b.identity(hasher)))
}

/// What write item `index` touched, with `{result=}` references in its URL
/// and body resolved against the results of the other items (`result` gives
/// the parsed body of a named item, when the reply shows it).
pub fn write_scope(
    batch: &ClientBatch,
    index: usize,
    outer_path: &str,
    result: &(dyn Fn(&str) -> Option<Value> + Sync),
) -> WriteScope {
    let item = &batch.items[index];
    if !references_name_objects(item, outer_path) {
        return WriteScope::of(item.objects(outer_path));
    }
    let Some(relative_url) = resolve_references(&item.relative_url, result) else {
        return WriteScope::Everything;
    };
    let body = match item.body.as_deref() {
        Some(body) => match resolve_references(body, result) {
            Some(resolved) => Some(resolved),
            None => return WriteScope::Everything,
        },
        None => None,
    };
    let resolved = Item {
        relative_url,
        body,
        raw: Default::default(),
        method: item.method.clone(),
        headers: Vec::new(),
        name: None,
        depends_on: None,
        has_files: false,
    };
    WriteScope::of(resolved.objects(outer_path))
}

/// True when a `{result=}` reference stands where the objects a write
/// touches are read from: its path, or an id parameter (`adset_id=…`) of its
/// URL or body. Elsewhere (`creative={"creative_id":…}`) it changes nothing
/// graphcache attributes to the write.
fn references_name_objects(item: &Item, outer_path: &str) -> bool {
    const MARK: &str = "{result=";
    let (path, query) = item.single_target(outer_path);
    if path.contains(MARK) {
        return true;
    }
    let query = QueryParams::parse(query.as_deref());
    let body: Vec<(String, String)> = item
        .body
        .as_deref()
        .map(|b| form_urlencoded::parse(b.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let named = query
        .iter()
        .chain(body.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .any(|(name, value)| names_ids(name) && value.contains(MARK));
    named
}

/// `text` with every `{result=name:$.path}` replaced by the values the path
/// selects in the named result, comma-separated (Graph's form for `ids`);
/// None when a result is not visible or the path selects nothing.
pub fn resolve_references(
    text: &str,
    result: &(dyn Fn(&str) -> Option<Value> + Sync),
) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("{result=") {
        out.push_str(&rest[..at]);
        let reference = &rest[at + "{result=".len()..];
        let end = reference.find('}')?;
        let (name, path) = reference[..end].split_once(':')?;
        let document = result(name)?;
        let values = json_path(&document, path)?;
        let rendered: Vec<String> = values
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        if rendered.is_empty() {
            return None;
        }
        out.push_str(&rendered.join(","));
        rest = &reference[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The values a JSONPath of the kind Graph documents selects: `$`, then
/// `.name`, `.*`, `[n]` or `[*]` steps (`$.id`, `$.data.*.id`,
/// `$.images.*.hash`). None for anything else: the caller then assumes the
/// worst.
fn json_path<'a>(document: &'a Value, path: &str) -> Option<Vec<&'a Value>> {
    let mut rest = path.trim().strip_prefix('$')?;
    let mut current = vec![document];
    while !rest.is_empty() {
        let (step, next) = if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            (&after[..end], &after[end..])
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            (after[..end].trim_matches(['\'', '"']), &after[end + 1..])
        } else {
            return None;
        };
        if step.is_empty() {
            return None;
        }
        current = current
            .into_iter()
            .flat_map(|value| -> Vec<&Value> {
                match (step, value) {
                    ("*", Value::Array(items)) => items.iter().collect(),
                    ("*", Value::Object(map)) => map.values().collect(),
                    (index, Value::Array(items)) => index
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| items.get(i))
                        .into_iter()
                        .collect(),
                    (name, Value::Object(map)) => map.get(name).into_iter().collect(),
                    _ => Vec::new(),
                }
            })
            .collect();
        rest = next;
    }
    Some(current)
}

/// Puts graphcache's own validator on a forwarded read item, replacing the
/// item's own `If-None-Match` (in the documented `"Name: value"` form), or
/// removes the item's conditional when graphcache has none: a miss is
/// fetched whole, stored, and the item's conditional answered locally. An
/// item's `Range`, `If-Range` and other conditionals go too, as they do for
/// a single read: the answer is stored and served whole.
pub fn set_validator(item: &mut Item, tag: Option<&str>) {
    let had_headers = item.raw.contains_key("headers");
    let mut headers: Vec<Value> = item
        .raw
        .get("headers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|h| {
            let name = match h {
                Value::String(line) => line.split(':').next().unwrap_or(""),
                Value::Object(o) => o.get("name").and_then(Value::as_str).unwrap_or(""),
                _ => "",
            };
            let name = name.trim();
            ![
                "if-none-match",
                "range",
                "if-range",
                "if-match",
                "if-modified-since",
                "if-unmodified-since",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        })
        .collect();
    if let Some(tag) = tag {
        headers.push(Value::String(format!("If-None-Match: {tag}")));
    }
    if headers.is_empty() && !had_headers {
        return;
    }
    item.raw.insert("headers".into(), Value::Array(headers));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_batch::parse::{parse, BatchInputError};

    fn parse_form(body: &str) -> Result<Option<ClientBatch>, BatchInputError> {
        parse(&QueryParams::parse(None), None, body.as_bytes())
    }

    #[test]
    fn dependencies_references_writes_and_files_are_not_standalone() {
        let batch = r#"[
            {"method":"POST","relative_url":"act_1/adcreatives","name":"create_creative","body":"name=x"},
            {"method":"POST","relative_url":"act_1/ads","body":"creative={\"creative_id\":\"{result=create_creative:$.id}\"}"},
            {"method":"GET","relative_url":"act_1/campaigns"},
            {"method":"GET","relative_url":"555","name":"unreferenced"},
            {"method":"GET","relative_url":"556","depends_on":"unreferenced"},
            {"method":"GET","relative_url":"?ids={result=get-friends:$.data.*.id}"},
            {"method":"GET","relative_url":"557","name":"get-friends"},
            {"method":"GET","relative_url":"558?callback=x"},
            {"method":"GET","relative_url":"559","attached_files":"file1"},
            {"method":"POST","relative_url":"560?adset_id=561","body":"x=1"},
            {"method":"GET","relative_url":"561/ads"}
        ]"#;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", batch)
            .finish();
        let parsed = parse_form(&body).unwrap().unwrap();
        let alone = standalone(&parsed, "/v26.0/");
        assert_eq!(
            alone,
            [false, false, false, false, false, false, false, false, false, false, false]
        );
        let reads = r#"[{"method":"GET","relative_url":"1"},{"method":"GET","relative_url":"2","name":"n"}]"#;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", reads)
            .finish();
        assert_eq!(
            standalone(&parse_form(&body).unwrap().unwrap(), "/v26.0/"),
            [true, true]
        );
    }

    fn batch_of(items: &str) -> ClientBatch {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", items)
            .finish();
        parse_form(&body).unwrap().unwrap()
    }

    #[test]
    fn references_resolve_from_visible_results_only() {
        let results = |name: &str| match name {
            "create" => Some(serde_json::json!({"id": "777"})),
            "list" => Some(serde_json::json!({"data": [{"id": "1"}, {"id": "2"}]})),
            _ => None,
        };
        assert_eq!(
            resolve_references("{result=create:$.id}?fields=a", &results).as_deref(),
            Some("777?fields=a")
        );
        assert_eq!(
            resolve_references("?ids={result=list:$.data.*.id}", &results).as_deref(),
            Some("?ids=1,2")
        );
        assert_eq!(
            resolve_references("?ids={result=list:$.data[1].id}", &results).as_deref(),
            Some("?ids=2")
        );
        assert_eq!(resolve_references("{result=omitted:$.id}", &results), None);
        assert_eq!(
            resolve_references("{result=create:$.nothing}", &results),
            None
        );
        assert_eq!(resolve_references("{result=create:id}", &results), None);
        assert_eq!(
            resolve_references("plain", &results).as_deref(),
            Some("plain")
        );
    }

    #[test]
    fn write_scopes_resolve_or_assume_everything() {
        let batch = batch_of(
            r#"[{"method":"POST","relative_url":"act_1/campaigns","name":"create","body":"name=x"},
                {"method":"POST","relative_url":"{result=create:$.id}","body":"status=PAUSED"},
                {"method":"POST","relative_url":"act_1/ads","body":"adset_id={result=create:$.id}"},
                {"method":"POST","relative_url":"?batch_only=1","body":"name=y"},
                {"method":"POST","relative_url":"act_2/ads","body":"creative={\"creative_id\":\"{result=create:$.id}\"}"}]"#,
        );
        let visible = |name: &str| (name == "create").then(|| serde_json::json!({"id": "42"}));
        let hidden = |_: &str| None;
        let ids = |scope: WriteScope| match scope {
            WriteScope::Objects(o) => o.iter().map(|o| o.as_str().to_owned()).collect::<Vec<_>>(),
            WriteScope::Everything => vec!["*".to_owned()],
        };
        assert_eq!(ids(write_scope(&batch, 0, "/v26.0/", &hidden)), ["1"]);
        assert_eq!(ids(write_scope(&batch, 1, "/v26.0/", &visible)), ["42"]);
        assert_eq!(ids(write_scope(&batch, 1, "/v26.0/", &hidden)), ["*"]);
        assert_eq!(
            ids(write_scope(&batch, 2, "/v26.0/", &visible)),
            ["1", "42"]
        );
        assert_eq!(ids(write_scope(&batch, 2, "/v26.0/", &hidden)), ["*"]);
        assert_eq!(ids(write_scope(&batch, 3, "/v26.0/", &hidden)), ["*"]);
        // A reference outside the path and id parameters names nothing.
        assert_eq!(ids(write_scope(&batch, 4, "/v26.0/", &hidden)), ["2"]);
    }

    #[test]
    fn item_identities_cover_every_credential() {
        let hasher = TokenHasher::with_secret([9; 32]);
        let top = |q: &str| BatchCredentials::of(&QueryParams::parse(Some(q)), &[], None);
        let batch = batch_of(
            r#"[{"method":"GET","relative_url":"me"},
                {"method":"GET","relative_url":"me?access_token=B"},
                {"method":"GET","relative_url":"me","body":"access_token=B"},
                {"method":"GET","relative_url":"me?access_token="},
                {"method":"GET","relative_url":"me?access_token=B&access_token=B"},
                {"method":"GET","relative_url":"me","headers":["Authorization: OAuth B"]},
                {"method":"GET","relative_url":"me?appsecret_proof=other"}]"#,
        );
        let a = top("access_token=A&appsecret_proof=pa");
        let id = |i: usize| item_identity(&batch.items[i], &a, &hasher);
        let plain_a = hasher.identify(&Credentials {
            token: Some("A"),
            proof: Some("pa"),
            authorization: None,
        });
        assert_eq!(id(0), Some(plain_a));
        assert_ne!(id(1), Some(plain_a));
        assert!(id(1).is_some());
        for ambiguous in 2..=6 {
            assert_eq!(id(ambiguous), None, "item {ambiguous}");
        }
        // An item repeating the batch's token reads under the batch's proof.
        let repeat = batch_of(r#"[{"method":"GET","relative_url":"me?access_token=A"}]"#);
        assert_eq!(item_identity(&repeat.items[0], &a, &hasher), Some(plain_a));
        // The caller charged for an item's usage survives a write's body.
        let write = batch_of(r#"[{"method":"POST","relative_url":"act_1/ads","body":"name=x"}]"#);
        assert_eq!(item_identity(&write.items[0], &a, &hasher), None);
        assert_eq!(item_caller(&write.items[0], &a, &hasher), Some(plain_a));
        // Two top-level tokens: nothing of the batch is identified.
        let two = BatchCredentials::of(
            &QueryParams::parse(Some("access_token=A")),
            &[("access_token".into(), "B".into())],
            None,
        );
        assert!(two.is_err());
        assert!(top("access_token=A&access_token=A").is_err());
        assert!(top("access_token=").is_err());
        assert!(top("appsecret_proof=p&appsecret_proof=q").is_err());
    }

    #[test]
    fn validators_replace_or_remove_the_item_conditional() {
        let mut batch = batch_of(
            r#"[{"method":"GET","relative_url":"1","headers":["If-None-Match: \"theirs\"","X-A: 1","Range: bytes=0-4",{"name":"if-range","value":"\"theirs\""},"If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT","If-Match: *"]},
                {"method":"GET","relative_url":"2"}]"#,
        );
        set_validator(&mut batch.items[0], None);
        assert_eq!(batch.items[0].raw["headers"], serde_json::json!(["X-A: 1"]));
        set_validator(&mut batch.items[0], Some("\"ours\""));
        assert_eq!(
            batch.items[0].raw["headers"],
            serde_json::json!(["X-A: 1", "If-None-Match: \"ours\""])
        );
        set_validator(&mut batch.items[1], None);
        assert!(!batch.items[1].raw.contains_key("headers"));
    }
}
