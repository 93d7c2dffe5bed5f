//! Caller identities: who is asking, derived once per request (or batch item)
//! from every credential it can carry.
//!
//! An identity is a keyed blake3 hash of the access token, the
//! `appsecret_proof` and the `Authorization` credential, with a key drawn at
//! start-up, so even a memory dump of the cache cannot be matched against a
//! guessed token. The proof is part of it: a request with a wrong or missing
//! proof never shares an entry with one that has the right proof, so "Require
//! App Secret" still protects a leaked token. A request whose credentials are
//! ambiguous (two tokens, two proofs, an empty one) has no identity at all
//! and never touches the cache.

use std::borrow::Cow;

use http::header::AUTHORIZATION;
use http::HeaderMap;

/// Who is asking: a keyed hash of the caller's credentials, or the anonymous
/// identity when the request carries none.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TokenIdentity(pub(crate) [u8; 32]);

/// The credentials one request or batch item presents, each at most once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// `access_token`, from the query, a form or a JSON body.
    pub token: Option<&'a str>,
    /// `appsecret_proof`, wherever the token was.
    pub proof: Option<&'a str>,
    /// The `Authorization` credential (see [`authorization_credential`]).
    pub authorization: Option<Cow<'a, str>>,
}

/// Why credentials cannot name one caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ambiguous;

/// The one value of a credential parameter across its sources: each source
/// (query, form, item URL, ...) may hold it at most once and not empty, and
/// sources that hold it must agree. Which copy Graph would use is not ours
/// to guess.
pub fn single_value<'a, I, S>(sources: I) -> Result<Option<&'a str>, Ambiguous>
where
    I: IntoIterator<Item = S>,
    S: IntoIterator<Item = &'a str>,
{
    let mut found: Option<&'a str> = None;
    for source in sources {
        let mut values = source.into_iter();
        let Some(value) = values.next() else { continue };
        if values.next().is_some() || value.is_empty() {
            return Err(Ambiguous);
        }
        match found {
            Some(seen) if seen != value => return Err(Ambiguous),
            _ => found = Some(value),
        }
    }
    Ok(found)
}

/// [`single_value`] over two sources of different kinds (a query and a
/// body), without collecting either.
pub fn agreed<'a>(
    first: impl IntoIterator<Item = &'a str>,
    second: impl IntoIterator<Item = &'a str>,
) -> Result<Option<&'a str>, Ambiguous> {
    match (single_value([first])?, single_value([second])?) {
        (Some(a), Some(b)) if a != b => Err(Ambiguous),
        (a, b) => Ok(a.or(b)),
    }
}

/// Hashes credentials into identities with a per-process secret key.
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

    /// A hasher with a fixed secret: a fleet's shared one, or a test's.
    pub fn with_secret(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    /// The identity of a caller presenting `credentials`. Each field is
    /// hashed, domain-separated, so two callers never share an identity
    /// unless they present exactly the same credentials.
    pub fn identify(&self, credentials: &Credentials<'_>) -> TokenIdentity {
        let mut hasher = blake3::Hasher::new_keyed(&self.secret);
        for field in [
            credentials.token,
            credentials.proof,
            credentials.authorization.as_deref(),
        ] {
            match field {
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn token(t: &str) -> Credentials<'_> {
        Credentials {
            token: Some(t),
            ..Credentials::default()
        }
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
    fn query_token_and_header_token_are_distinct_identities() {
        let h = TokenHasher::with_secret([1; 32]);
        let header = Credentials {
            authorization: Some(Cow::Borrowed("t")),
            ..Credentials::default()
        };
        assert_ne!(h.identify(&token("t")), h.identify(&header));
        assert_ne!(h.identify(&token("t")), h.identify(&Credentials::default()));
    }

    #[test]
    fn the_proof_is_part_of_the_identity() {
        let h = TokenHasher::with_secret([1; 32]);
        let proved = Credentials {
            proof: Some("p"),
            ..token("t")
        };
        let wrong = Credentials {
            proof: Some("q"),
            ..token("t")
        };
        assert_ne!(h.identify(&proved), h.identify(&token("t")));
        assert_ne!(h.identify(&proved), h.identify(&wrong));
        assert_eq!(h.identify(&proved), h.identify(&proved.clone()));
    }

    #[test]
    fn repeated_empty_or_conflicting_values_are_ambiguous() {
        let one = |v: &'static [&'static str]| v.iter().copied();
        assert_eq!(single_value([one(&[])]), Ok(None));
        assert_eq!(single_value([one(&["a"]), one(&[])]), Ok(Some("a")));
        assert_eq!(single_value([one(&["a"]), one(&["a"])]), Ok(Some("a")));
        assert_eq!(single_value([one(&["a"]), one(&["b"])]), Err(Ambiguous));
        assert_eq!(single_value([one(&["a", "a"])]), Err(Ambiguous));
        assert_eq!(single_value([one(&[""])]), Err(Ambiguous));
        assert_eq!(agreed(one(&["a"]), Vec::new()), Ok(Some("a")));
        assert_eq!(agreed(Vec::new(), one(&["b"])), Ok(Some("b")));
        assert_eq!(agreed(one(&["a"]), one(&["b"])), Err(Ambiguous));
        assert_eq!(agreed(one(&["a", "b"]), Vec::new()), Err(Ambiguous));
    }
}
