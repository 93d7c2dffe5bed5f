//! A request's query string, decoded once: the vocabulary every stage reads
//! parameters through (tokens, `method` overrides, `batch`, ids).

use std::borrow::Cow;

/// Query parameters that carry credentials: never part of a key, never logged.
pub const CREDENTIAL_PARAMS: [&str; 2] = ["access_token", "appsecret_proof"];
/// A request's query string, decoded once and sorted by parameter name
/// (stable, so repeated names keep their relative order).
#[derive(Debug, Default)]
pub struct QueryParams<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> QueryParams<'a> {
    /// Decodes `query` (without the leading `?`). `+` and `%20` decode alike,
    /// as do `%2C` and `,`, so differently encoded spellings share a key.
    pub fn parse(query: Option<&'a str>) -> Self {
        let mut pairs = Vec::new();
        if let Some(q) = query {
            // One allocation, sized up front: this runs on every cache hit.
            pairs.reserve_exact(memchr::memchr_iter(b'&', q.as_bytes()).count() + 1);
            pairs.extend(form_urlencoded::parse(q.as_bytes()));
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Self { pairs }
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        // Sorted by name: a binary search finds the first of a run.
        let start = self.pairs.partition_point(|(n, _)| n.as_ref() < name);
        self.pairs
            .get(start)
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }

    /// How many times `name` appears.
    pub fn count(&self, name: &str) -> usize {
        let start = self.pairs.partition_point(|(n, _)| n.as_ref() < name);
        self.pairs[start..]
            .iter()
            .take_while(|(n, _)| n == name)
            .count()
    }

    /// True when `name` is present, whatever its value.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// True when a `method` parameter turns a GET into a write
    /// (`method=post`, `method=delete`): never cached, never coalesced.
    pub fn overrides_to_write(&self) -> bool {
        // A repeated `method` is ambiguous: treat it as the write it may be.
        self.count("method") > 1
            || self
                .get("method")
                .is_some_and(|m| !m.eq_ignore_ascii_case("get") && !m.eq_ignore_ascii_case("head"))
    }

    /// All pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(n, v)| (n.as_ref(), v.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_get_finds_first_of_repeated_names() {
        let q = QueryParams::parse(Some("b=2&a=1&b=3"));
        assert_eq!(q.get("b"), Some("2"));
        assert_eq!(q.get("a"), Some("1"));
        assert_eq!(q.get("c"), None);
        assert_eq!((q.count("b"), q.count("a"), q.count("c")), (2, 1, 0));
    }

    #[test]
    fn method_overrides() {
        assert!(QueryParams::parse(Some("method=POST")).overrides_to_write());
        assert!(QueryParams::parse(Some("method=delete")).overrides_to_write());
        assert!(!QueryParams::parse(Some("method=get")).overrides_to_write());
        assert!(!QueryParams::parse(Some("method=head")).overrides_to_write());
        assert!(!QueryParams::parse(None).overrides_to_write());
        assert!(QueryParams::parse(Some("method=get&method=post")).overrides_to_write());
        assert!(QueryParams::parse(Some("method=get&method=get")).overrides_to_write());
    }
}
