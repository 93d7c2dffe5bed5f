//! An entry as the shared tier stores it: postcard over a versioned,
//! borrowed struct. It holds what [`CachedResponse`] holds, with the stored
//! time on the wall clock (the one clock replicas share) and the policy it
//! was stored under.
//!
//! Graph embeds the caller's `access_token` (and `appsecret_proof`) in
//! paging links. No credential may reach Redis, so their values are
//! replaced by placeholders on the way in and by the reading caller's own
//! on the way out (an entry is only ever read by the identity that stored
//! it, which presents the same credentials).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use memchr::memmem;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::cache::entry::{CachedResponse, StoredHeaders};
use crate::fleet::Stamp;
use crate::graph::routes::{CachePolicy, ObjectId};

/// Bumped with any change below; entries of another version are misses.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    version: u32,
    epoch: u64,
    stamp: u64,
    stored_unix_ms: u64,
    fresh_ms: u64,
    stale_ms: u64,
    always_revalidate: bool,
    members_unindexed: bool,
    paging_links: bool,
    #[serde(borrow)]
    objects: Vec<&'a str>,
    #[serde(borrow)]
    headers: Vec<Header<'a>>,
    #[serde(borrow, with = "serde_bytes")]
    etag: Option<&'a [u8]>,
    #[serde(borrow)]
    vary: Option<Vec<VaryValue<'a>>>,
    #[serde(borrow, with = "serde_bytes")]
    body: &'a [u8],
}

#[derive(Serialize, Deserialize)]
struct Header<'a> {
    name: &'a str,
    #[serde(with = "serde_bytes")]
    value: &'a [u8],
}

#[derive(Serialize, Deserialize)]
struct VaryValue<'a> {
    name: &'a str,
    #[serde(borrow, with = "serde_bytes")]
    value: Option<&'a [u8]>,
}

/// The credentials a reading caller presents, to put back into links.
#[derive(Debug, Clone, Copy, Default)]
pub struct Secrets<'a> {
    /// `access_token`, or the `Authorization` credential.
    pub token: Option<&'a str>,
    pub proof: Option<&'a str>,
}

impl<'a> Secrets<'a> {
    /// A caller's credentials as Graph would embed them: the query's
    /// token, else the `Authorization` credential; the query's proof.
    pub fn of(
        token: Option<&'a str>,
        authorization: Option<&'a str>,
        proof: Option<&'a str>,
    ) -> Self {
        Self {
            token: token.or(authorization),
            proof,
        }
    }

    pub fn to_owned(self) -> OwnedSecrets {
        OwnedSecrets {
            token: self.token.map(str::to_owned),
            proof: self.proof.map(str::to_owned),
        }
    }
}

/// [`Secrets`] kept past the request (a shared fetch).
#[derive(Debug, Clone, Default)]
pub struct OwnedSecrets {
    token: Option<String>,
    proof: Option<String>,
}

impl OwnedSecrets {
    pub fn borrow(&self) -> Secrets<'_> {
        Secrets {
            token: self.token.as_deref(),
            proof: self.proof.as_deref(),
        }
    }
}

/// Link parameters whose values are credentials, with their placeholders.
const CREDENTIAL_PARAMS: [(&[u8], &[u8]); 2] = [
    (b"access_token=", b"%7Bgraphcache-token%7D"),
    (b"appsecret_proof=", b"%7Bgraphcache-proof%7D"),
];

/// Where a parameter value ends inside a JSON-held URL.
fn value_end(byte: u8) -> bool {
    matches!(
        byte,
        b'&' | b'"' | b'\\' | b'#' | b' ' | b'<' | b'>' | b'\''
    )
}

/// `body` with every credential parameter's value replaced by its
/// placeholder; borrowed when it has none.
pub fn scrub(body: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Cow<'_, [u8]> = Cow::Borrowed(body);
    for (param, placeholder) in CREDENTIAL_PARAMS {
        if memmem::find(&out, param).is_none() {
            continue;
        }
        let mut next = Vec::with_capacity(out.len());
        let mut rest: &[u8] = &out;
        while let Some(at) = memmem::find(rest, param) {
            let value = at + param.len();
            next.extend_from_slice(&rest[..value]);
            let len = rest[value..]
                .iter()
                .position(|b| value_end(*b))
                .unwrap_or(rest.len() - value);
            next.extend_from_slice(placeholder);
            rest = &rest[value + len..];
        }
        next.extend_from_slice(rest);
        out = Cow::Owned(next);
    }
    out
}

/// `body` with the placeholders replaced by `secrets`; None when it needs
/// one the caller did not present, or one that would break the JSON.
pub(super) fn restore(body: &[u8], secrets: Secrets<'_>) -> Option<Bytes> {
    let mut out: Cow<'_, [u8]> = Cow::Borrowed(body);
    for ((_, placeholder), secret) in CREDENTIAL_PARAMS.iter().zip([secrets.token, secrets.proof]) {
        if memmem::find(&out, placeholder).is_none() {
            continue;
        }
        let secret = secret.filter(|s| !s.bytes().any(value_end))?;
        let mut next = Vec::with_capacity(out.len() + secret.len());
        let mut rest: &[u8] = &out;
        while let Some(at) = memmem::find(rest, placeholder) {
            next.extend_from_slice(&rest[..at]);
            next.extend_from_slice(secret.as_bytes());
            rest = &rest[at + placeholder.len()..];
        }
        next.extend_from_slice(rest);
        out = Cow::Owned(next);
    }
    Some(match out {
        Cow::Borrowed(b) => Bytes::copy_from_slice(b),
        Cow::Owned(v) => Bytes::from(v),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The bytes of `entry`, stamped `stamp`, as of `now` / `now_unix_ms`,
/// with `body` (its body as [`scrub`] left it).
pub(super) fn encode(
    entry: &CachedResponse,
    body: &[u8],
    stamp: Stamp,
    now: Instant,
    now_unix_ms: u64,
) -> Vec<u8> {
    let wire = Wire {
        version: VERSION,
        epoch: stamp.epoch,
        stamp: stamp.seq,
        stored_unix_ms: now_unix_ms.saturating_sub(millis(entry.age(now))),
        fresh_ms: millis(entry.policy.fresh_ttl),
        stale_ms: millis(entry.policy.max_stale),
        always_revalidate: entry.policy.always_revalidate,
        members_unindexed: entry.members_unindexed,
        paging_links: entry.paging_links,
        objects: entry.objects.iter().map(ObjectId::as_str).collect(),
        headers: entry
            .headers
            .iter()
            .map(|(name, value)| Header {
                name: name.as_str(),
                value: value.as_bytes(),
            })
            .collect(),
        etag: entry.etag.as_ref().map(HeaderValue::as_bytes),
        vary: entry.vary.as_ref().map(|values| {
            values
                .iter()
                .map(|(name, value)| VaryValue {
                    name: name.as_str(),
                    value: value.as_ref().map(HeaderValue::as_bytes),
                })
                .collect()
        }),
        body,
    };
    postcard::to_allocvec(&wire).expect("an entry always serialises")
}

/// The entry in `bytes`, or None when they are not an entry of this
/// version (another release, corruption).
pub(super) fn decode(
    bytes: &[u8],
    now: Instant,
    now_unix_ms: u64,
    secrets: Secrets<'_>,
) -> Option<CachedResponse> {
    let wire: Wire<'_> = postcard::from_bytes(bytes).ok()?;
    if wire.version != VERSION {
        return None;
    }
    let headers = wire
        .headers
        .iter()
        .map(|h| {
            Some((
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                HeaderValue::from_bytes(h.value).ok()?,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    let headers = StoredHeaders::owned(headers);
    let objects = wire
        .objects
        .iter()
        .map(|o| ObjectId::parse(o))
        .collect::<Option<Vec<_>>>()?;
    let vary = match wire.vary {
        None => None,
        Some(values) => Some(
            values
                .into_iter()
                .map(|v| {
                    let name = HeaderName::from_bytes(v.name.as_bytes()).ok()?;
                    let value = match v.value {
                        Some(bytes) => Some(HeaderValue::from_bytes(bytes).ok()?),
                        None => None,
                    };
                    Some((name, value))
                })
                .collect::<Option<Vec<_>>>()?
                .into_boxed_slice(),
        ),
    };
    let policy = CachePolicy {
        fresh_ttl: Duration::from_millis(wire.fresh_ms),
        max_stale: Duration::from_millis(wire.stale_ms),
        cache: true,
        always_revalidate: wire.always_revalidate,
    };
    let etag = match wire.etag {
        Some(tag) => Some(HeaderValue::from_bytes(tag).ok()?),
        None => None,
    };
    let mut entry = CachedResponse::new(
        headers,
        restore(wire.body, secrets)?,
        etag,
        policy,
        objects.into(),
    );
    let age = Duration::from_millis(now_unix_ms.saturating_sub(wire.stored_unix_ms));
    entry.stored_at = now.checked_sub(age).unwrap_or(now);
    entry.members_unindexed = wire.members_unindexed;
    entry.paging_links = wire.paging_links;
    entry.vary = vary;
    entry.fleet_stamp = Some(Stamp {
        epoch: wire.epoch,
        seq: wire.stamp,
    });
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::routes::objects_of;
    use http::HeaderMap;

    #[test]
    fn an_entry_comes_back_as_it_went_with_its_age() {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"a\""));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        let mut entry = CachedResponse::new(
            StoredHeaders::copied(&headers),
            Bytes::from_static(b"{\"id\":\"1\"}"),
            Some(HeaderValue::from_static("\"a\"")),
            CachePolicy::ttls(60, 600),
            objects_of("/v26.0/act_1/ads", []).into(),
        );
        entry.vary = Some(Box::new([(
            HeaderName::from_static("accept-language"),
            None,
        )]));
        let now = Instant::now();
        let stamp = Stamp { epoch: 7, seq: 42 };
        let bytes = encode(&entry, &entry.body, stamp, now, 1_000_000);
        // Read back 1.5 s later on another replica's clocks.
        let later = now + Duration::from_secs(10);
        let back = decode(&bytes, later, 1_001_500, Secrets::default()).unwrap();
        assert_eq!(back.body, entry.body);
        assert_eq!(back.headers, entry.headers);
        assert_eq!(back.etag, entry.etag);
        assert_eq!(back.objects, entry.objects);
        assert_eq!(back.policy, entry.policy);
        assert_eq!(back.vary, entry.vary);
        assert_eq!(back.fleet_stamp, Some(stamp));
        assert_eq!(back.paging_links, entry.paging_links);
        assert_eq!(back.age(later).as_millis(), 1500);
    }

    #[test]
    fn other_versions_and_junk_are_misses() {
        let none = Secrets::default();
        assert!(decode(b"", Instant::now(), 0, none).is_none());
        assert!(decode(&[9, 9, 9], Instant::now(), 0, none).is_none());
        let entry = CachedResponse::new(
            StoredHeaders::default(),
            Bytes::new(),
            None,
            CachePolicy::ttls(1, 1),
            objects_of("/v1/1", []).into(),
        );
        let stamp = Stamp { epoch: 1, seq: 1 };
        let mut bytes = encode(&entry, &entry.body, stamp, Instant::now(), 5);
        bytes[0] = 2; // version 2
        assert!(decode(&bytes, Instant::now(), 5, none).is_none());
    }

    #[test]
    fn credentials_in_links_never_go_out_and_come_back_for_their_caller() {
        let body = br#"{"paging":{"next":"https:\/\/graph.facebook.com\/v26.0\/act_1\/ads?access_token=EAAsecret123&appsecret_proof=abc&limit=25","previous":"x?access_token=EAAsecret123"}}"#;
        let scrubbed = scrub(body);
        assert!(memmem::find(&scrubbed, b"EAAsecret123").is_none());
        assert!(memmem::find(&scrubbed, b"abc&").is_none());
        let secrets = Secrets {
            token: Some("EAAsecret123"),
            proof: Some("abc"),
        };
        assert_eq!(&restore(&scrubbed, secrets).unwrap()[..], &body[..]);
        // A caller without the credential cannot use it: a miss.
        assert!(restore(&scrubbed, Secrets::default()).is_none());
        // Bodies without credentials pass untouched, borrowed.
        assert!(matches!(scrub(b"{\"id\":\"1\"}"), Cow::Borrowed(_)));
    }
}
