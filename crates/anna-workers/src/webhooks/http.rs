//! The HTTP side of a webhook attempt: a client that refuses to reach the operator's network,
//! follows no redirect, bounds connect and response times, and reads at most a configured
//! number of bytes of a response.
//!
//! The address policy (`anna_domain::net`) is applied to IP literals before a request is
//! made, and to every address a host name resolves to by the client's own resolver, right
//! before it connects: a name that resolves to a private address (or starts to, after the
//! endpoint was created) is refused like a literal. Proxies from the environment are ignored,
//! since a proxy would resolve names beyond this check.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anna_domain::net;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Limits of a webhook attempt.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `WEBHOOKS_ALLOW_PRIVATE`.
    pub allow_private: bool,
    /// `WEBHOOKS_CONNECT_TIMEOUT_MS`.
    pub connect_timeout: Duration,
    /// `WEBHOOKS_TIMEOUT_MS`: the whole attempt, response included.
    pub timeout: Duration,
    /// `WEBHOOKS_RESPONSE_MAX_BYTES`: bytes of a response read and kept in the log.
    pub response_max_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            allow_private: false,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            response_max_bytes: 4096,
        }
    }
}

/// Why an address may not be called, when the policy refuses it.
pub fn refused_address(ip: IpAddr, allow_private: bool) -> Option<&'static str> {
    if allow_private { None } else { net::forbidden_reason(ip) }
}

/// Resolves with the system resolver and drops the addresses the policy refuses; a name left
/// with none fails to resolve, and no connection is attempted.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    allow_private: bool,
    /// Who calls, for the refusals' messages (`webhooks`, `media URLs`).
    caller: &'static str,
}

impl GuardedResolver {
    pub fn new(allow_private: bool) -> Self {
        Self::calling_for(allow_private, "webhooks")
    }

    /// A resolver whose refusals name `caller`.
    pub fn calling_for(allow_private: bool, caller: &'static str) -> Self {
        Self { allow_private, caller }
    }

    /// The addresses of `resolved` that may be called, or why none may.
    pub fn admit(&self, host: &str, resolved: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
        if !self.allow_private && net::is_local_name(host) {
            return Err(format!("{host} names this machine, which {} may not call", self.caller));
        }
        let mut refused = None;
        let admitted: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|addr| match refused_address(addr.ip(), self.allow_private) {
                Some(reason) => {
                    refused = Some(reason);
                    false
                }
                None => true,
            })
            .collect();
        match (admitted.is_empty(), refused) {
            (true, Some(reason)) => Err(format!("{host} resolves to {reason}, which {} may not call", self.caller)),
            (true, None) => Err(format!("{host} has no address")),
            (false, _) => Ok(admitted),
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let admitted = guard.admit(&host, resolved)?;
            Ok(Box::new(admitted.into_iter()) as Addrs)
        })
    }
}

/// What one attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status, when a response came.
    pub status: Option<u16>,
    pub latency: Duration,
    /// Why the attempt failed, when it did before a status or because of it (a redirect).
    pub error: Option<String>,
    /// The response's first `response_max_bytes` bytes, as text.
    pub body: Option<String>,
}

impl Response {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// A request's headers and body.
pub struct Request<'a> {
    pub url: &'a str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

#[derive(Clone)]
pub struct WebhookClient {
    client: reqwest::Client,
    settings: HttpSettings,
}

impl WebhookClient {
    pub fn new(settings: HttpSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("anna-webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver::new(settings.allow_private)))
            .build()?;
        Ok(Self { client, settings })
    }

    /// Posts `request`; never fails, the outcome says what happened.
    pub async fn post(&self, request: Request<'_>) -> Response {
        let started = Instant::now();
        let failed =
            |error: String| Response { status: None, latency: started.elapsed(), error: Some(error), body: None };
        let url = match reqwest::Url::parse(request.url) {
            Ok(url) => url,
            Err(error) => return failed(format!("invalid URL: {error}")),
        };
        // IP literals do not go through the resolver.
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(reason) = literal.and_then(|ip| refused_address(ip, self.settings.allow_private)) {
            return failed(format!("the URL points to {reason}, which webhooks may not call"));
        }
        let mut builder = self.client.post(url).header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        let mut response = match builder.body(request.body).send().await {
            Ok(response) => response,
            Err(error) => return failed(describe(&error)),
        };
        let status = response.status();
        let mut body: Vec<u8> = Vec::new();
        let mut read_error = None;
        while body.len() < self.settings.response_max_bytes {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.settings.response_max_bytes - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                Err(error) => {
                    read_error = Some(describe(&error));
                    break;
                }
            }
        }
        let error = if status.is_redirection() {
            let to = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("");
            Some(format!("redirects are not followed ({} to {})", status.as_u16(), cut(to, 200)))
        } else if status.is_success() {
            // The receiver answered: a body cut short does not undo that.
            None
        } else {
            read_error
        };
        Response {
            status: Some(status.as_u16()),
            latency: started.elapsed(),
            error,
            body: (!body.is_empty()).then(|| storable(&String::from_utf8_lossy(&body))),
        }
    }
}

/// A transport error in a few words, without the URL (its query may carry a receiver's token).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the response broke off"
    } else if error.is_request() {
        "the request failed"
    } else {
        "failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() { kind.to_owned() } else { format!("{kind}: {}", cut(&detail, 300)) }
}

fn cut(text: &str, max_chars: usize) -> String {
    storable(&text.chars().take(max_chars).collect::<String>())
}

/// Text a database keeps as it is: Postgres refuses NUL in text, and a receiver's answer may
/// hold any bytes.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn addrs(ips: &[&str]) -> Vec<SocketAddr> {
        ips.iter().map(|ip| SocketAddr::new(ip.parse().expect("ip"), 443)).collect()
    }

    #[test]
    fn the_resolver_refuses_what_the_policy_refuses() {
        let guard = GuardedResolver::new(false);
        let refused = guard.admit("internal.example", addrs(&["10.0.0.8"])).expect_err("private");
        assert!(refused.contains("private address"), "{refused}");
        let metadata = guard.admit("metadata.example", addrs(&["169.254.169.254"])).expect_err("metadata");
        assert!(metadata.contains("link-local"), "{metadata}");
        assert!(guard.admit("v6.example", addrs(&["::1"])).is_err());
        assert!(guard.admit("localhost", addrs(&["8.8.8.8"])).is_err());
        // Mixed answers keep only the public addresses.
        assert_eq!(guard.admit("mixed.example", addrs(&["127.0.0.1", "8.8.8.8"])), Ok(addrs(&["8.8.8.8"])));
        assert!(GuardedResolver::new(true).admit("localhost", addrs(&["127.0.0.1"])).is_ok());
    }

    #[tokio::test]
    async fn literals_are_refused_before_any_connection() {
        let client = WebhookClient::new(HttpSettings::default()).expect("client");
        for url in ["http://127.0.0.1:9/", "http://[::1]:9/", "http://169.254.169.254/latest", "http://10.1.1.1/"] {
            let response = client.post(Request { url, headers: Vec::new(), body: "{}".into() }).await;
            assert_eq!(response.status, None);
            // This message comes from the check made before connecting, never from a connection.
            assert!(response.error.as_deref().is_some_and(|e| e.contains("may not call")), "{url}: {response:?}");
        }
    }
}
