//! Cache keys.
//!
//! A key is a blake3 hash over everything that can change a Graph answer: the
//! path as sent (version included; a trailing slash dropped, since Graph
//! answers `/v26.0/123/` and `/v26.0/123` alike and the Python SDK sends the
//! first while other clients send the second), the query parameters decoded and sorted by
//! name, the User-Agent (Graph's ETag and formatting depend on it) and the
//! caller's identity ([`super::identity`]).

use std::fmt;

use crate::cache::identity::TokenIdentity;
use crate::graph::query::{QueryParams, CREDENTIAL_PARAMS};

/// A 256-bit cache key. Hex only for display.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CacheKey([u8; 32]);

impl std::hash::Hash for CacheKey {
    /// The key is already a keyed blake3 hash: its first eight bytes are as
    /// good a table hash as any (and unpredictable without the key).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

/// A hasher for [`CacheKey`]s that passes their bits through instead of
/// hashing them again (SipHash on every lookup was a visible share of a
/// hit over many keys).
#[derive(Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only ever fed by `CacheKey::hash`; anything else still mixes.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Builds [`KeyHasher`]s.
pub type KeyHashing = std::hash::BuildHasherDefault<KeyHasher>;

impl CacheKey {
    /// The key's bytes (the shared tier's key names them in hex).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
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
    put_field(&mut hasher, canonical_path(path).as_bytes());
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

/// The path as keyed: without trailing slashes (the root stays `/`).
pub fn canonical_path(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/"
    } else {
        trimmed
    }
}

fn put_field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::identity::{Credentials, TokenHasher};
    use proptest::prelude::*;

    #[test]
    fn keys_hash_to_their_own_bits() {
        use std::hash::BuildHasher;
        let mut a = [0u8; 32];
        a[0] = 1;
        let mut b = a;
        b[31] = 9; // differs past the first word: same bucket hash, still unequal
        let hashing = KeyHashing::default();
        assert_eq!(hashing.hash_one(CacheKey(a)), 1);
        assert_eq!(hashing.hash_one(CacheKey(a)), hashing.hash_one(CacheKey(b)));
        assert_ne!(CacheKey(a), CacheKey(b));
        let mut c = a;
        c[7] = 2;
        assert_ne!(hashing.hash_one(CacheKey(a)), hashing.hash_one(CacheKey(c)));
    }

    fn tok(t: &str) -> Credentials<'_> {
        Credentials {
            token: Some(t),
            ..Credentials::default()
        }
    }

    fn key(path: &str, query: &str, ua: &str, id: &TokenIdentity) -> CacheKey {
        cache_key(path, &QueryParams::parse(Some(query)), ua.as_bytes(), id)
    }

    #[test]
    fn a_trailing_slash_names_the_same_object() {
        let id = TokenHasher::with_secret([7; 32]).identify(&tok("t"));
        assert_eq!(
            key("/v26.0/123/", "", "ua", &id),
            key("/v26.0/123", "", "ua", &id)
        );
        assert_eq!(
            key("/v26.0/act_1/ads/", "limit=5", "ua", &id),
            key("/v26.0/act_1/ads", "limit=5", "ua", &id)
        );
        assert_ne!(
            key("/v26.0/123", "", "ua", &id),
            key("/v26.0/1234", "", "ua", &id)
        );
        assert_eq!(canonical_path("/"), "/");
        assert_eq!(canonical_path("//"), "/");
        assert_eq!(canonical_path("/v26.0/1//"), "/v26.0/1");
    }

    #[test]
    fn node_sdk_single_and_batch_spellings_share_a_key() {
        let id = TokenHasher::with_secret([7; 32]).identify(&tok("t"));
        assert_eq!(
            key("/v24.0/1", "fields=name%2Cstatus&access_token=t", "ua", &id),
            key("/v24.0/1", "access_token=t&fields=name,status", "ua", &id)
        );
    }

    #[test]
    fn credentials_are_not_part_of_the_key_text() {
        let id = TokenHasher::with_secret([7; 32]).identify(&Credentials::default());
        assert_eq!(
            key("/v1/x", "a=1&appsecret_proof=p&access_token=t", "ua", &id),
            key("/v1/x", "a=1", "ua", &id)
        );
    }

    #[test]
    fn path_user_agent_and_values_change_the_key() {
        let id = TokenHasher::with_secret([7; 32]).identify(&Credentials::default());
        let base = key("/v1/x", "a=1", "ua", &id);
        assert_ne!(base, key("/v2/x", "a=1", "ua", &id));
        assert_ne!(base, key("/v1/x", "a=2", "ua", &id));
        assert_ne!(base, key("/v1/x", "a=1", "ub", &id));
        // (A trailing slash no longer does: issue 12, and the test above.)
        assert_ne!(base, key("/v1/x/y", "a=1", "ua", &id));
        // Length prefixes keep field boundaries apart.
        assert_ne!(
            key("/v1/x", "ab=c", "ua", &id),
            key("/v1/x", "a=bc", "ua", &id)
        );
    }

    proptest! {
        #[test]
        fn keys_differing_only_in_token_never_collide(
            t1 in "[A-Za-z0-9]{1,40}", t2 in "[A-Za-z0-9]{1,40}",
            path in "/v[0-9]{1,2}\\.0/[a-z0-9_]{1,12}", q in "[a-z]{1,5}=[a-z0-9,]{0,8}",
        ) {
            prop_assume!(t1 != t2);
            let h = TokenHasher::random();
            let k1 = key(&path, &format!("{q}&access_token={t1}"), "ua", &h.identify(&tok(&t1)));
            let k2 = key(&path, &format!("{q}&access_token={t2}"), "ua", &h.identify(&tok(&t2)));
            prop_assert_ne!(k1, k2);
        }

        #[test]
        fn query_order_does_not_matter(
            params in proptest::collection::btree_map("[a-z_]{1,8}", "[A-Za-z0-9,]{0,8}", 1..8),
            seed in any::<u64>(),
        ) {
            let id = TokenHasher::with_secret([3; 32]).identify(&tok("tok"));
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
