//! Extractors: JSON bodies with clear errors, the client's IP, the authenticated caller.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;
use anna_usecases::Caller;

/// A JSON body. Other content types → 415, malformed JSON → 400, wrong field types → 422,
/// too large → 413; unknown fields are ignored.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let code = match status {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        _ => "malformed_json",
    };
    let message = match status {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "expected a JSON body with Content-Type: application/json".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => "request body is too large".to_owned(),
        _ => rejection.body_text(),
    };
    ApiError::new(status, code, message)
}

/// Parses a path id; anything that is not a UUID is a 400, never a 500.
/// A path parameter, refused with the JSON error shape (axum's own rejection is plain text,
/// for example for invalid percent-encoding).
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(_) => Err(ApiError::bad_request("invalid_path", "the path is not valid")),
        }
    }
}

pub fn parse_uuid(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::bad_request("invalid_id", format!("{what} must be a UUID")))
}

/// The client's IP: the peer address, or — when the peer is a trusted proxy — the nearest
/// untrusted address in `X-Forwarded-For`.
#[derive(Debug, Clone)]
pub struct ClientIp(pub Option<IpAddr>);

impl ClientIp {
    /// The rate-limit key: the address, or its /64 for IPv6 (one subscriber usually holds a
    /// whole /64, so single addresses would be free to rotate through).
    pub fn key(&self) -> String {
        match self.0 {
            None => "unknown".to_owned(),
            Some(IpAddr::V4(ip)) => ip.to_string(),
            Some(IpAddr::V6(ip)) => {
                let [a, b, c, d, ..] = ip.segments();
                format!("{a:x}:{b:x}:{c:x}:{d:x}::/64")
            }
        }
    }
}

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        Ok(Self(resolve_client_ip(peer, parts, &state.config.trusted_proxies)))
    }
}

fn resolve_client_ip(peer: Option<IpAddr>, parts: &Parts, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer?;
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // From the nearest hop outwards: the first address our proxies did not add is the client.
    // An entry that is not a bare IP ends the walk — whatever stands left of it came from the
    // client and cannot be believed — and then the last trusted hop's view is used.
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else { break };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    Some(client)
}

/// `User-Agent`, capped, for the refresh-token row.
pub fn user_agent(parts_headers: &axum::http::HeaderMap) -> Option<String> {
    parts_headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(512).collect())
}

/// The caller, from `Authorization: Bearer <access token>` (the scheme is checked).
pub struct AuthUser(pub Caller);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // A proxy that reads the last of several headers would authenticate someone else than
        // we do: refuse the ambiguity.
        if parts.headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
            return Err(ApiError::bad_request("duplicate_authorization", "send one Authorization header, not several"));
        }
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::trim);
        let Some(header) = header.filter(|h| !h.is_empty()) else {
            return Err(ApiError::unauthorized("missing_access_token", "missing access token"));
        };
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
            _ => return Err(ApiError::unauthorized("invalid_access_token", "invalid access token")),
        };
        state
            .accounts
            .authenticate(token)
            .await?
            .map(AuthUser)
            .ok_or_else(|| ApiError::unauthorized("invalid_access_token", "invalid access token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts_with_xff(xff: &str) -> Parts {
        let (parts, ()) = axum::http::Request::builder()
            .header("x-forwarded-for", xff)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_parts();
        parts
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap_or_else(|e| panic!("{e}"))];
        let parts = parts_with_xff("6.6.6.6, 1.2.3.4, 10.0.0.7");
        assert_eq!(resolve_client_ip(Some(ip("9.9.9.9")), &parts, &trusted), Some(ip("9.9.9.9")));
        assert_eq!(resolve_client_ip(Some(ip("10.0.0.1")), &parts, &trusted), Some(ip("1.2.3.4")));
        assert_eq!(resolve_client_ip(Some(ip("10.0.0.1")), &parts_with_xff("junk"), &trusted), Some(ip("10.0.0.1")));
        assert_eq!(resolve_client_ip(Some(ip("10.0.0.1")), &parts, &[]), Some(ip("10.0.0.1")));
        // An entry that is not an IP stops the walk: what the client wrote left of it is ignored.
        let spoofed = parts_with_xff("6.6.6.6, 1.2.3.4:5678, 10.0.0.7");
        assert_eq!(resolve_client_ip(Some(ip("10.0.0.1")), &spoofed, &trusted), Some(ip("10.0.0.7")));
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let a = ClientIp(Some(ip("2001:db8:1:2:aaaa::1")));
        let b = ClientIp(Some(ip("2001:db8:1:2:bbbb::9")));
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), ClientIp(Some(ip("2001:db8:1:3::1"))).key());
        assert_eq!(ClientIp(Some(ip("1.2.3.4"))).key(), "1.2.3.4");
    }
}
