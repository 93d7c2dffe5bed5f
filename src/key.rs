//! Cache keys and token identities.
//!
//! A key is a blake3 hash over everything that can change a Graph answer: the
//! path as sent (version included), the query parameters decoded and sorted by
//! name, the User-Agent (Graph's ETag and formatting depend on it) and the
//! caller's token identity. Tokens themselves are never stored: only a keyed
//! hash of them, with a key drawn at start-up, so even a memory dump of the
//! cache cannot be matched against a guessed token.

use std::borrow::Cow;
use std::fmt;

use http::header::AUTHORIZATION;
use http::HeaderMap;

/// Query parameters that carry credentials: never part of a key, never logged.
pub const CREDENTIAL_PARAMS: [&str; 2] = ["access_token", "appsecret_proof"];

/// A 256-bit cache key. Hex only for display.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Who is asking: a keyed hash of the caller's token(s), or the anonymous
/// identity when the request carries none.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TokenIdentity([u8; 32]);

/// Hashes tokens into identities with a per-process secret key.
#[derive(Clone)]
pub struct TokenHasher {
    secret: [u8; 32],
}

impl TokenHasher {
    /// A hasher with a fresh random secret.
    pub fn random() -> Self {
        Self {
            secret: rand::random(),
        }
    }

    /// A hasher with a fixed secret, for tests.
    pub fn with_secret(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    /// The identity of a caller presenting `query_token` (from the query
    /// string or form) and/or `header_token` (from `Authorization`). Both are
    /// hashed, domain-separated, so two callers never share an identity unless
    /// they present exactly the same credentials.
    pub fn identify(&self, query_token: Option<&str>, header_token: Option<&str>) -> TokenIdentity {
        let mut hasher = blake3::Hasher::new_keyed(&self.secret);
        for token in [query_token, header_token] {
            match token {
                Some(t) => {
                    hasher.update(&[1]);
                    hasher.update(&(t.len() as u64).to_le_bytes());
                    hasher.update(t.as_bytes());
                }
                None => {
                    hasher.update(&[0]);
                }
            }
        }
        TokenIdentity(*hasher.finalize().as_bytes())
    }
}

/// The caller's credential from `Authorization`: the token of a single
/// `OAuth <t>` or `Bearer <t>` header; otherwise, when any `Authorization`
/// header is present, all of their values (marked so they cannot equal a
/// token). A request whose headers authenticate it never falls into the
/// anonymous identity.
pub fn authorization_credential(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let first = values.next()?;
    if values.next().is_none() {
        if let Some(token) = oauth_or_bearer(first) {
            return Some(Cow::Borrowed(token));
        }
    }
    let mut raw = String::from("\0raw:");
    for value in headers.get_all(AUTHORIZATION) {
        raw.push_str(&String::from_utf8_lossy(value.as_bytes()));
        raw.push('\n');
    }
    Some(Cow::Owned(raw))
}

fn oauth_or_bearer(value: &http::HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(|c: char| c.is_ascii_whitespace())?;
    let token = token.trim();
    let known = scheme.eq_ignore_ascii_case("oauth") || scheme.eq_ignore_ascii_case("bearer");
    (known && !token.is_empty()).then_some(token)
}

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
        self.get("method")
            .is_some_and(|m| !m.eq_ignore_ascii_case("get") && !m.eq_ignore_ascii_case("head"))
    }

    /// All pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(n, v)| (n.as_ref(), v.as_ref()))
    }
}

/// The key of a cacheable GET. `query` must come from the same request as
/// `path`; credential parameters in it are skipped.
pub fn cache_key(
    path: &str,
    query: &QueryParams<'_>,
    user_agent: &[u8],
    identity: &TokenIdentity,
) -> CacheKey {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"graphcache-key-v1");
    put_field(&mut hasher, path.as_bytes());
    for (name, value) in query.iter() {
        if CREDENTIAL_PARAMS.contains(&name) {
            continue;
        }
        put_field(&mut hasher, name.as_bytes());
        put_field(&mut hasher, value.as_bytes());
    }
    // A separator no field can forge (fields are length-prefixed).
    hasher.update(&[0xff]);
    put_field(&mut hasher, user_agent);
    hasher.update(&identity.0);
    CacheKey(*hasher.finalize().as_bytes())
}

fn put_field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn key(path: &str, query: &str, ua: &str, id: &TokenIdentity) -> CacheKey {
        cache_key(path, &QueryParams::parse(Some(query)), ua.as_bytes(), id)
    }

    #[test]
    fn node_sdk_single_and_batch_spellings_share_a_key() {
        let id = TokenHasher::with_secret([7; 32]).identify(Some("t"), None);
        assert_eq!(
            key("/v24.0/1", "fields=name%2Cstatus&access_token=t", "ua", &id),
            key("/v24.0/1", "access_token=t&fields=name,status", "ua", &id)
        );
    }

    #[test]
    fn credentials_are_not_part_of_the_key_text() {
        let id = TokenHasher::with_secret([7; 32]).identify(None, None);
        assert_eq!(
            key("/v1/x", "a=1&appsecret_proof=p&access_token=t", "ua", &id),
            key("/v1/x", "a=1", "ua", &id)
        );
    }

    #[test]
    fn path_user_agent_and_values_change_the_key() {
        let id = TokenHasher::with_secret([7; 32]).identify(None, None);
        let base = key("/v1/x", "a=1", "ua", &id);
        assert_ne!(base, key("/v2/x", "a=1", "ua", &id));
        assert_ne!(base, key("/v1/x", "a=2", "ua", &id));
        assert_ne!(base, key("/v1/x", "a=1", "ub", &id));
        assert_ne!(base, key("/v1/x/", "a=1", "ua", &id));
        // Length prefixes keep field boundaries apart.
        assert_ne!(
            key("/v1/x", "ab=c", "ua", &id),
            key("/v1/x", "a=bc", "ua", &id)
        );
    }

    #[test]
    fn authorization_credentials() {
        let mut h = HeaderMap::new();
        assert_eq!(authorization_credential(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("OAuth abc"));
        assert_eq!(authorization_credential(&h).as_deref(), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer\txyz "));
        assert_eq!(authorization_credential(&h).as_deref(), Some("xyz"));
        // Other schemes and repeated headers still identify the caller.
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic dXNlcg=="));
        let basic = authorization_credential(&h).unwrap().into_owned();
        assert!(basic.contains("Basic dXNlcg=="));
        h.append(AUTHORIZATION, HeaderValue::from_static("OAuth abc"));
        let both = authorization_credential(&h).unwrap().into_owned();
        assert_ne!(both, basic);
        assert_ne!(both, "abc");
    }

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
    }

    #[test]
    fn query_token_and_header_token_are_distinct_identities() {
        let h = TokenHasher::with_secret([1; 32]);
        assert_ne!(h.identify(Some("t"), None), h.identify(None, Some("t")));
        assert_ne!(h.identify(Some("t"), None), h.identify(None, None));
    }

    proptest! {
        #[test]
        fn keys_differing_only_in_token_never_collide(
            t1 in "[A-Za-z0-9]{1,40}", t2 in "[A-Za-z0-9]{1,40}",
            path in "/v[0-9]{1,2}\\.0/[a-z0-9_]{1,12}", q in "[a-z]{1,5}=[a-z0-9,]{0,8}",
        ) {
            prop_assume!(t1 != t2);
            let h = TokenHasher::random();
            let k1 = key(&path, &format!("{q}&access_token={t1}"), "ua", &h.identify(Some(&t1), None));
            let k2 = key(&path, &format!("{q}&access_token={t2}"), "ua", &h.identify(Some(&t2), None));
            prop_assert_ne!(k1, k2);
        }

        #[test]
        fn query_order_does_not_matter(
            params in proptest::collection::btree_map("[a-z_]{1,8}", "[A-Za-z0-9,]{0,8}", 1..8),
            seed in any::<u64>(),
        ) {
            let id = TokenHasher::with_secret([3; 32]).identify(Some("tok"), None);
            let mut pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let forward = pairs.join("&");
            // A deterministic shuffle driven by the seed.
            let n = pairs.len();
            for i in (1..n).rev() {
                let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % (i as u64 + 1)) as usize;
                pairs.swap(i, j);
            }
            let shuffled = pairs.join("&");
            prop_assert_eq!(key("/v1/n", &forward, "ua", &id), key("/v1/n", &shuffled, "ua", &id));
        }
    }
}
