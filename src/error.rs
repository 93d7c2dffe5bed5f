//! Errors graphcache makes itself, rendered once, at the edge, in Graph's own
//! error envelope so SDK clients parse them like any Graph error.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::client_batch::BatchInputError;
use crate::upstream::UpstreamError;

/// Marks a response as made by graphcache rather than by Graph.
pub const PROXY_ERROR_HEADER: &str = "x-graphcache-error";

/// Why graphcache answered a request itself with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("graphcache is a reverse proxy for its configured upstream only; absolute-form targets naming another host are refused")]
    ForeignTarget,
    #[error("the CONNECT method is not supported: graphcache is not a forward proxy")]
    Connect,
    #[error("the method {0} is not one the Graph API accepts")]
    MethodNotAllowed(http::Method),
    #[error("request headers are larger than the configured limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body was not received in time")]
    ClientTimeout,
    #[error("reading the request body failed: {0}")]
    ClientBody(#[source] Arc<hyper::Error>),
    #[error("the request body broke off or is malformed: {0}")]
    ClientBodyStream(#[source] Arc<hyper_util::client::legacy::Error>),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("graphcache is overloaded ({0}); retry shortly")]
    Overloaded(&'static str),
    #[error("the shared upstream call for this request did not finish within {0:?}")]
    CoalesceTimeout(std::time::Duration),
    #[error("the shared upstream call for this request failed")]
    FlightLost,
    #[error("{0}")]
    BadBatch(#[from] BatchInputError),
    #[error("(#{code}) Graph is throttling this app or account; graphcache answers for it until access returns in {} s", remaining.as_secs())]
    Throttled {
        code: i64,
        remaining: std::time::Duration,
    },
    #[error("the upstream answered with a content encoding the client does not accept")]
    UpstreamEncoding,
}

impl ProxyError {
    /// The HTTP status the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_)
            | Self::ForeignTarget
            | Self::ClientBody(_)
            | Self::ClientBodyStream(_)
            | Self::BadBatch(_)
            | Self::Throttled { .. } => StatusCode::BAD_REQUEST,
            Self::Connect | Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Upstream(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(_) | Self::UpstreamEncoding | Self::FlightLost => {
                StatusCode::BAD_GATEWAY
            }
            Self::CoalesceTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Graph's error code for the envelope: 100 (invalid parameter) for the
    /// client's mistakes, 2 (service temporarily unavailable, which SDK retry
    /// logic treats as transient) for upstream trouble.
    fn graph_code(&self) -> i64 {
        if let Self::Throttled { code, .. } = self {
            *code
        } else if matches!(self, Self::BadBatch(BatchInputError::TooMany)) {
            // What Graph answers for more than 50 items.
            1
        } else if self.status().is_server_error() {
            2
        } else {
            100
        }
    }

    /// Short label for logs and the marker header.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::ForeignTarget => "foreign_target",
            Self::Connect => "connect",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::ClientBody(_) | Self::ClientBodyStream(_) => "client_body",
            Self::ClientTimeout => "client_timeout",
            Self::Upstream(e) => e.kind(),
            Self::UpstreamEncoding => "upstream_encoding",
            Self::CoalesceTimeout(_) => "coalesce_timeout",
            Self::Overloaded(_) => "overloaded",
            Self::FlightLost => "flight_lost",
            Self::BadBatch(_) => "bad_batch",
            Self::Throttled { .. } => "throttled",
        }
    }

    /// Graph's own error type where graphcache answers as Graph would.
    fn graph_type(&self) -> &'static str {
        match self {
            Self::BadBatch(_) => "GraphBatchException",
            // What Graph uses for its own throttling answers.
            Self::Throttled { .. } => "OAuthException",
            _ => "GraphcacheException",
        }
    }

    /// Graph's error envelope for this error, as JSON text.
    pub fn envelope(&self) -> String {
        let status = self.status();
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.graph_type(),
                "code": self.graph_code(),
                "is_transient": status.is_server_error() || matches!(self, Self::Throttled { .. }),
                "fbtrace_id": format!("graphcache-{:016x}", rand::random::<u64>()),
            }
        })
        .to_string()
    }

    /// The Graph-envelope response for this error.
    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(Bytes::from(self.envelope())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(self.kind()));
        if matches!(self, Self::Connect | Self::MethodNotAllowed(_)) {
            headers.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
            );
        }
        if let Self::Overloaded(_) = self {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Self::Throttled { remaining, .. } = self {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(remaining.as_secs().max(1)),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope_has_graph_fields_and_status() {
        let err = ProxyError::HeadersTooLarge { limit: 10 };
        let response = err.to_response();
        assert_eq!(response.status(), 431);
        assert_eq!(response.headers()[PROXY_ERROR_HEADER], "headers_too_large");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], 100);
        assert_eq!(v["error"]["type"], "GraphcacheException");
        assert!(v["error"]["message"].as_str().unwrap().contains("10 bytes"));
        assert!(v["error"]["fbtrace_id"]
            .as_str()
            .unwrap()
            .starts_with("graphcache-"));
    }

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::BadRequest("x").status(), 400);
        assert_eq!(ProxyError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(
            ProxyError::from(UpstreamError::Timeout(std::time::Duration::ZERO)).status(),
            504
        );
        assert_eq!(ProxyError::from(UpstreamError::Lost).status(), 502);
        assert_eq!(
            ProxyError::from(UpstreamError::TooLarge { limit: 1 }).kind(),
            "upstream_too_large"
        );
        assert_eq!(ProxyError::UpstreamEncoding.status(), 502);
        assert_eq!(ProxyError::Connect.status(), 405);
        let trace = ProxyError::MethodNotAllowed(http::Method::TRACE).to_response();
        assert_eq!(trace.status(), 405);
        assert!(trace.headers()["allow"].to_str().unwrap().contains("POST"));
    }
}
