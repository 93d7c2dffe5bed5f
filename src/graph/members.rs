//! The Graph objects an answer shows, besides the one it was asked for: the
//! members of a listing (`data[].id`), the objects of an `?ids=` answer (its
//! keys), and nested objects (`campaign{id,name}`). An entry indexed under
//! them is dropped by a write to any of them, which is what makes a fresh TTL
//! above 0 safe for listings. Read at store time only, never on a hit.

use serde_json::Value;

use crate::graph::routes::ObjectId;

/// How deep into an answer ids are looked for, counting every object and
/// array: enough for two levels of field expansion in a listing
/// (`data[].adsets{data[].ads{data[].id}}`). Deeper content counts as
/// objects that could not be indexed.
const MAX_DEPTH: usize = 10;

/// The objects `body` shows, deduplicated, or `None` when it may show more
/// than `cap` or nests deeper than graphcache looks (the caller then cannot
/// index them all). Bodies that are not a JSON object show none.
pub fn members_of(body: &[u8], cap: usize) -> Option<Vec<ObjectId>> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Some(Vec::new());
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Some(Vec::new());
    };
    let mut found = Vec::new();
    collect(&value, 0, &mut found, cap)?;
    found.sort();
    found.dedup();
    (found.len() <= cap).then_some(found)
}

fn collect(value: &Value, depth: usize, found: &mut Vec<ObjectId>, cap: usize) -> Option<()> {
    if depth > MAX_DEPTH {
        // Ids may hide below: say so rather than index part of them.
        return match value {
            Value::Object(map) if !map.is_empty() => None,
            Value::Array(items) if !items.is_empty() => None,
            _ => Some(()),
        };
    }
    match value {
        Value::Object(map) => {
            for (name, field) in map {
                match (name.as_str(), field) {
                    ("id", Value::String(id)) => push(found, id, cap)?,
                    ("id", Value::Number(id)) => push(found, &id.to_string(), cap)?,
                    // Cursors and paging links name no object.
                    ("paging" | "summary", _) => {}
                    // An `?ids=` answer is keyed by id.
                    (key, Value::Object(_)) if depth == 0 && is_numeric_id(key) => {
                        push(found, key, cap)?;
                        collect(field, depth + 1, found, cap)?;
                    }
                    (_, Value::Object(_) | Value::Array(_)) => {
                        collect(field, depth + 1, found, cap)?
                    }
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect(item, depth + 1, found, cap)?;
            }
        }
        _ => {}
    }
    Some(())
}

fn push(found: &mut Vec<ObjectId>, raw: &str, cap: usize) -> Option<()> {
    if let Some(id) = ObjectId::parse(raw) {
        found.push(id);
        // Duplicates count until the end; twice the cap bounds the work.
        if found.len() > cap * 2 {
            found.sort();
            found.dedup();
            if found.len() > cap {
                return None;
            }
        }
    }
    Some(())
}

fn is_numeric_id(key: &str) -> bool {
    let bare = key.strip_prefix("act_").unwrap_or(key);
    !bare.is_empty() && bare.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(body: &str) -> Vec<String> {
        members_of(body.as_bytes(), 100)
            .unwrap()
            .into_iter()
            .map(|o| o.as_str().to_owned())
            .collect()
    }

    #[test]
    fn listing_members_nested_objects_and_ids_answers() {
        assert_eq!(
            ids(
                r#"{"data":[{"id":"555","campaign":{"id":"77","name":"c"}},{"id":"556"}],
                 "paging":{"cursors":{"after":"QVFI"},"next":"https://x/?id=9"}}"#
            ),
            ["555", "556", "77"]
        );
        assert_eq!(
            ids(r#"{"555":{"id":"555","name":"a"},"act_9":{"id":"act_9"}}"#),
            ["555", "9"]
        );
        assert_eq!(ids(r#"{"id":"act_12","name":"n"}"#), ["12"]);
        assert_eq!(ids(r#"{"data":[]}"#), Vec::<String>::new());
        assert_eq!(ids("[1,2]"), Vec::<String>::new());
        assert_eq!(ids("not json"), Vec::<String>::new());
    }

    #[test]
    fn two_levels_of_expansion_are_indexed_and_deeper_nesting_is_none() {
        let body = r#"{"data":[{"id":"1","adsets":{"data":[{"id":"2","ads":{"data":[{"id":"3","creative":{"id":"4"}}]}}]}}]}"#;
        assert_eq!(ids(body), ["1", "2", "3", "4"]);
        let mut deep = r#"{"id":"9"}"#.to_owned();
        for _ in 0..12 {
            deep = format!(r#"{{"x":{deep}}}"#);
        }
        assert!(members_of(deep.as_bytes(), 100).is_none());
    }

    #[test]
    fn more_members_than_the_cap_is_none() {
        let data: Vec<String> = (0..101).map(|i| format!(r#"{{"id":"{i}"}}"#)).collect();
        let body = format!(r#"{{"data":[{}]}}"#, data.join(","));
        assert!(members_of(body.as_bytes(), 100).is_none());
        assert_eq!(members_of(body.as_bytes(), 101).unwrap().len(), 101);
        // Repeats of one id are one object.
        let same = format!(r#"{{"data":[{}]}}"#, vec![r#"{"id":"5"}"#; 500].join(","));
        assert_eq!(members_of(same.as_bytes(), 100).unwrap().len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_panics_and_respects_the_cap(body in proptest::collection::vec(any::<u8>(), 0..512), cap in 0usize..8) {
            if let Some(found) = members_of(&body, cap) {
                prop_assert!(found.len() <= cap);
            }
        }
    }
}
