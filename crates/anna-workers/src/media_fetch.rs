//! Fetching a file a tenant names by URL, to send it. The URL is the tenant's, so the fetch is
//! guarded like a webhook call: the address policy (`anna_domain::net`) on IP literals before
//! anything is sent and on every address a name resolves to right before connecting (no
//! loopback, private, link-local or metadata addresses), no proxies, no redirects (a redirect
//! could lead anywhere), a time limit for the whole fetch and a size limit checked as the body
//! arrives (the file goes to a temporary file, never whole into memory).

use std::sync::Arc;
use std::time::Duration;

use anna_domain::net;
use anna_media::{MediaError, StagedFile, Staging};
use futures::StreamExt;

use crate::webhooks::http::GuardedResolver;

/// `MEDIA_FETCH_*`.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// `MEDIA_FETCH_ALLOW_PRIVATE`: URLs may point to this machine and private networks (for
    /// tests, or files on the operator's own network).
    pub allow_private: bool,
    pub connect_timeout: Duration,
    /// `MEDIA_FETCH_TIMEOUT_MS`: the whole fetch.
    pub timeout: Duration,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self { allow_private: false, connect_timeout: Duration::from_secs(5), timeout: Duration::from_secs(30) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the media URL is not valid: {0}")]
    InvalidUrl(String),
    #[error("the media URL points to {0}, which media URLs may not reach")]
    Refused(&'static str),
    #[error("fetching the media URL failed: {0}")]
    Failed(String),
    #[error("the media URL answered {0}")]
    Status(u16),
    #[error("the file at the media URL is larger than {0} bytes")]
    TooLarge(u64),
}

/// A file fetched from a URL.
pub struct FetchedFile {
    pub file: StagedFile,
    /// The type the server declared.
    pub declared_mime: Option<String>,
    /// The last segment of the URL's path, as a file name.
    pub file_name: Option<String>,
}

#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    settings: FetchSettings,
}

impl Fetcher {
    pub fn new(settings: FetchSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .user_agent(concat!("anna-media/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver::calling_for(settings.allow_private, "media URLs")))
            .build()?;
        Ok(Self { client, settings })
    }

    /// Checks `url` against the address policy before any connection: the scheme, IP literals
    /// and names of this machine. (Names are checked again, resolved, by the client.)
    pub fn admit(&self, url: &str) -> Result<url::Url, FetchError> {
        let parsed = url::Url::parse(url).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(FetchError::InvalidUrl("only http and https URLs are fetched".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(FetchError::InvalidUrl("URLs with credentials are not fetched".into()));
        }
        if self.settings.allow_private {
            return Ok(parsed);
        }
        let refused = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => net::forbidden_reason(ip.into()),
            Some(url::Host::Ipv6(ip)) => net::forbidden_reason(ip.into()),
            Some(url::Host::Domain(name)) => net::is_local_name(name).then_some("a name of this machine"),
            None => return Err(FetchError::InvalidUrl("the URL has no host".into())),
        };
        match refused {
            Some(reason) => Err(FetchError::Refused(reason)),
            None => Ok(parsed),
        }
    }

    /// Fetches `url` into a temporary file, at most `limit` bytes.
    pub async fn fetch(&self, url: &str, limit: u64) -> Result<FetchedFile, FetchError> {
        let parsed = self.admit(url)?;
        let response = self.client.get(parsed.clone()).send().await.map_err(|e| FetchError::Failed(describe(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        if response.content_length().is_some_and(|length| length > limit) {
            return Err(FetchError::TooLarge(limit));
        }
        let declared_mime = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut staging = Staging::new(limit).await.map_err(|e| FetchError::Failed(e.to_string()))?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FetchError::Failed(describe(&e)))?;
            staging.write(&chunk).await.map_err(|error| match error {
                MediaError::TooLarge { limit } => FetchError::TooLarge(limit),
                other => FetchError::Failed(other.to_string()),
            })?;
        }
        let file = staging.finish().await.map_err(|e| FetchError::Failed(e.to_string()))?;
        let file_name = parsed
            .path_segments()
            .and_then(|mut segments| segments.next_back().map(str::to_owned))
            .filter(|name| !name.is_empty());
        Ok(FetchedFile { file, declared_mime, file_name })
    }
}

/// A client error with its causes (reqwest's own message hides the resolver's refusal).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher(allow_private: bool) -> Fetcher {
        Fetcher::new(FetchSettings { allow_private, ..FetchSettings::default() }).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Refused before any connection: these addresses are never contacted by this test.
    #[test]
    fn private_and_local_addresses_are_refused_before_connecting() {
        let guarded = fetcher(false);
        for url in [
            "http://127.0.0.1/file.png",
            "http://[::1]:8080/x",
            "http://localhost/x",
            "http://10.1.2.3/x",
            "http://192.168.0.10/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00::1]/x",
            "http://0.0.0.0/x",
        ] {
            assert!(matches!(guarded.admit(url), Err(FetchError::Refused(_))), "{url} was admitted");
        }
        for url in ["ftp://example.com/x", "file:///etc/passwd", "http://user:pw@example.com/x", "not a url"] {
            assert!(matches!(guarded.admit(url), Err(FetchError::InvalidUrl(_))), "{url} was admitted");
        }
        assert!(guarded.admit("https://example.com/photo.jpg").is_ok());
        assert!(fetcher(true).admit("http://127.0.0.1/file.png").is_ok(), "allowed by the setting");
    }

    #[test]
    fn names_resolving_to_private_addresses_are_refused_by_the_resolver() {
        let resolver = GuardedResolver::calling_for(false, "media URLs");
        let private: Vec<std::net::SocketAddr> =
            ["10.0.0.1:0", "169.254.169.254:0"].iter().filter_map(|a| a.parse().ok()).collect();
        let refused = resolver.admit("files.example.com", private);
        assert!(refused.as_ref().is_err_and(|e| e.contains("media URLs may not call")), "{refused:?}");
    }
}
