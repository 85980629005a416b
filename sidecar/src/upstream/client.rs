//! The connection pool a backend's requests go through: hyper's pooled
//! HTTP/1.1 client, Nagle off, and nothing else on the path (no URL
//! re-parse, no redirect or decompression layers: a backend's redirect is
//! its answer, passed on as it is).

use std::error::Error as _;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::Chunks;
use crate::validate::Endpoint;

pub type Answer = axum::http::Response<hyper::body::Incoming>;
pub type SendError = hyper_util::client::legacy::Error;

#[derive(Clone)]
pub struct HttpClient(Client<HttpConnector, Chunks>);

impl HttpClient {
    /// HTTP/1.1 with Nagle off: a streamed token must not wait 40 ms for an ACK.
    pub fn new(connect_ms: u64) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(connect_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .build(http);
        HttpClient(client)
    }

    pub fn request(
        &self,
        request: axum::http::Request<Chunks>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        self.0.request(request)
    }
}

/// A backend's URI per endpoint, parsed once on first use.
pub struct Uris {
    base: String,
    by_endpoint: [OnceLock<Option<Uri>>; Endpoint::ALL.len()],
}

impl Uris {
    /// `base` without a trailing slash.
    pub fn new(base: &str) -> Self {
        Uris {
            base: base.to_owned(),
            by_endpoint: Default::default(),
        }
    }

    /// None only for a base URL that is not a valid URI.
    pub fn get(&self, endpoint: Endpoint) -> Option<Uri> {
        self.by_endpoint[endpoint as usize]
            .get_or_init(|| join(&self.base, endpoint.path()))
            .clone()
    }
}

pub fn join(base: &str, path: &str) -> Option<Uri> {
    let mut s = String::with_capacity(base.len() + path.len());
    s.push_str(base);
    s.push_str(path);
    s.parse().ok()
}

/// Whether a connect failure was its deadline passing.
pub fn is_connect_timeout(e: &SendError) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// What went wrong mid-body, without echoing upstream content.
pub fn body_error_kind(e: &hyper::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_incomplete_message() || e.is_body_write_aborted() {
        "body"
    } else {
        "transport"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_joins_its_path_to_the_base() {
        let uris = Uris::new("http://10.0.0.7:8000/prefix");
        for e in Endpoint::ALL {
            let uri = uris.get(e).unwrap();
            assert_eq!(
                uri.to_string(),
                format!("http://10.0.0.7:8000/prefix{}", e.path())
            );
        }
        assert!(Uris::new("http://bad host").get(Endpoint::Chat).is_none());
    }
}
