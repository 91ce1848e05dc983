//! `GET /sessions/{id}/qr`: the current QR code as JSON, or as a scannable image (SVG or PNG,
//! chosen by `Accept` or by the `.svg` / `.png` path suffix).

use anna_domain::SessionStatus;
use anna_domain::user::iso;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use qrcode::QrCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::session_id;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, AuthUser};
use crate::state::AppState;

/// Pixels per QR module in PNG images, and the quiet zone around the code (in modules).
const PNG_SCALE: usize = 8;
const QUIET_ZONE: usize = 4;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QrResponse {
    pub qr: String,
    pub expires_at: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Svg,
    Png,
}

fn format_from(headers: &HeaderMap) -> Format {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if accept.contains("image/svg+xml") {
        Format::Svg
    } else if accept.contains("image/png") {
        Format::Png
    } else {
        Format::Json
    }
}

/// The current QR code: JSON `{qr, expiresAt}`, or an image with `Accept: image/svg+xml` or
/// `image/png` (also as `/sessions/{id}/qr.svg` and `/sessions/{id}/qr.png`). 409 when the session shows no
/// code (connected, or waiting for the worker).
#[utoipa::path(get, path = "/sessions/{id}/qr", tag = "sessions", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, description = "JSON, or an SVG or PNG image by Accept", body = QrResponse),
        (status = 404, body = ErrorBody),
        (status = 409, description = "no QR code to show right now", body = ErrorBody)))]
pub(super) async fn session_qr(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    respond(&state, caller.user_id, &id, format_from(&headers)).await
}

/// `/sessions/{id}/qr.svg` and `/sessions/{id}/qr.png`, for `<img>`-style clients.
pub(super) async fn session_qr_image(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((id, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let format = match file.as_str() {
        "qr.svg" => Format::Svg,
        "qr.png" => Format::Png,
        _ => return Err(ApiError::not_found("not_found", "route not found")),
    };
    respond(&state, caller.user_id, &id, format).await
}

async fn respond(state: &AppState, tenant: uuid::Uuid, id: &str, format: Format) -> Result<Response, ApiError> {
    let session = state.sessions.get(tenant, session_id(id)?).await?;
    let qr = match (&session.qr, session.status) {
        (Some(qr), SessionStatus::PendingQr) => qr.clone(),
        _ => {
            return Err(ApiError::conflict(
                "no_qr",
                format!("the session shows no QR code now (status: {})", session.status.as_str()),
            ));
        }
    };
    match format {
        Format::Json => Ok(axum::Json(QrResponse { qr, expires_at: session.qr_expires_at.map(iso) }).into_response()),
        Format::Svg => image_response("image/svg+xml", svg(&qr)?.into_bytes()),
        Format::Png => image_response("image/png", png(&qr)?),
    }
}

fn image_response(content_type: &'static str, body: Vec<u8>) -> Result<Response, ApiError> {
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

fn code(qr: &str) -> Result<QrCode, ApiError> {
    QrCode::new(qr.as_bytes()).map_err(|e| ApiError::internal(format!("QR code could not be encoded: {e}")))
}

pub fn svg(qr: &str) -> Result<String, ApiError> {
    Ok(code(qr)?.render::<qrcode::render::svg::Color<'_>>().min_dimensions(256, 256).quiet_zone(true).build())
}

/// A greyscale PNG, black modules on white, with the quiet zone scanners need.
pub fn png(qr: &str) -> Result<Vec<u8>, ApiError> {
    let code = code(qr)?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET_ZONE) * PNG_SCALE;
    let mut pixels = vec![255u8; side * side];
    for (index, color) in colors.iter().enumerate() {
        if *color != qrcode::Color::Dark {
            continue;
        }
        let (x, y) = (index % modules + QUIET_ZONE, index / modules + QUIET_ZONE);
        for row in y * PNG_SCALE..(y + 1) * PNG_SCALE {
            pixels[row * side + x * PNG_SCALE..row * side + (x + 1) * PNG_SCALE].fill(0);
        }
    }
    let mut out = Vec::new();
    let side = u32::try_from(side).map_err(|_| ApiError::internal("QR image too large"))?;
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(ApiError::internal)?;
    writer.write_image_data(&pixels).map_err(ApiError::internal)?;
    writer.finish().map_err(ApiError::internal)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_encode_the_code() {
        let svg = svg("2@abc,def=,ghi=,jkl=").unwrap_or_else(|e| panic!("{}", e.message));
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"));
        let png = png("2@abc,def=,ghi=,jkl=").unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(&png[1..4], b"PNG");
        let mut headers = HeaderMap::new();
        assert!(format_from(&headers) == Format::Json);
        headers.insert(header::ACCEPT, HeaderValue::from_static("image/png"));
        assert!(format_from(&headers) == Format::Png);
    }
}
