//! Redaction of credentials from anything that is logged.

use crate::graph::query::CREDENTIAL_PARAMS;

/// Further query parameters that carry secrets: OAuth flows, and `batch`,
/// whose items may carry their own `access_token`.
const OTHER_SECRETS: [&str; 5] = [
    "client_secret",
    "fb_exchange_token",
    "input_token",
    "code",
    "batch",
];

/// The path and query with every credential value replaced by `REDACTED`.
/// Works on the raw text so the logged URL looks like what was sent.
pub fn redact_target(path: &str, query: Option<&str>) -> String {
    let Some(query) = query else {
        return path.to_owned();
    };
    let mut out = String::with_capacity(path.len() + 1 + query.len());
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded: String = form_urlencoded::parse(name.as_bytes())
            .next()
            .map(|(n, _)| n.into_owned())
            .unwrap_or_default();
        if is_secret(&decoded) && !value.is_empty() {
            out.push_str(name);
            out.push_str("=REDACTED");
        } else {
            out.push_str(pair);
        }
    }
    out
}

/// Case-insensitive: `ACCESS_TOKEN=` is as secret as `access_token=`.
fn is_secret(name: &str) -> bool {
    CREDENTIAL_PARAMS
        .iter()
        .chain(OTHER_SECRETS.iter())
        .any(|secret| secret.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_proofs_are_redacted_everything_else_kept() {
        assert_eq!(
            redact_target(
                "/v1/me",
                Some("fields=id&access_token=EAAB&appsecret_proof=99&limit=5")
            ),
            "/v1/me?fields=id&access_token=REDACTED&appsecret_proof=REDACTED&limit=5"
        );
        // Encoded names are recognised too.
        assert_eq!(
            redact_target("/x", Some("access%5Ftoken=s")),
            "/x?access%5Ftoken=REDACTED"
        );
        assert_eq!(redact_target("/x", None), "/x");
        assert_eq!(
            redact_target("/x", Some("client_secret=a&x")),
            "/x?client_secret=REDACTED&x"
        );
        // Any case: Graph treats names as sent, the log must not.
        assert_eq!(
            redact_target("/x", Some("ACCESS_TOKEN=s&Appsecret_Proof=p")),
            "/x?ACCESS_TOKEN=REDACTED&Appsecret_Proof=REDACTED"
        );
    }
}
