//! `MEDIA_*` and the predecessor's `S3_*`: where media objects are kept and how they are handed
//! out. With `S3_BUCKET` set, an S3-compatible bucket (every `S3_*` credential then required);
//! otherwise a directory (`MEDIA_DIR`), which processes on several machines must share.

use std::path::PathBuf;

use anna_media::{MediaBackend, S3Settings, StorageSettings};

use super::{ConfigError, Vars};

/// The largest file `POST /media` takes by default: the predecessor's 25 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 25 * 1024 * 1024;

pub(super) fn read<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<StorageSettings, ConfigError> {
    let backend = match vars.get("S3_BUCKET") {
        None => {
            for var in ["S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY"] {
                if vars.get(var).is_some() {
                    return Err(ConfigError::Inconsistent(format!(
                        "{var} is set but S3_BUCKET is not: set S3_BUCKET to store media in a bucket, or unset {var}"
                    )));
                }
            }
            MediaBackend::Local { dir: PathBuf::from(vars.string("MEDIA_DIR", "./data/media")) }
        }
        Some(bucket) => {
            let (Some(access_key), Some(secret_key)) = (vars.get("S3_ACCESS_KEY"), vars.secret("S3_SECRET_KEY")) else {
                return Err(ConfigError::Inconsistent("S3_BUCKET needs S3_ACCESS_KEY and S3_SECRET_KEY".into()));
            };
            let endpoint = vars.get("S3_ENDPOINT");
            let public_endpoint = vars.get("S3_PUBLIC_BASE_URL");
            for (var, value) in [("S3_ENDPOINT", &endpoint), ("S3_PUBLIC_BASE_URL", &public_endpoint)] {
                if let Some(value) = value
                    && url::Url::parse(value)
                        .map_or(true, |url| !matches!(url.scheme(), "http" | "https") || url.host_str().is_none())
                {
                    return Err(ConfigError::Invalid {
                        var,
                        shown: format!("{value:?}"),
                        expected: "an http:// or https:// URL",
                    });
                }
            }
            MediaBackend::S3(S3Settings {
                endpoint,
                region: vars.string("S3_REGION", "us-east-1"),
                bucket,
                access_key,
                secret_key,
                force_path_style: vars.boolean("S3_FORCE_PATH_STYLE", false)?,
                public_endpoint,
                timeout: vars.millis("S3_TIMEOUT_MS", 60_000)?,
            })
        }
    };
    Ok(StorageSettings {
        backend,
        url_ttl: vars.millis("MEDIA_URL_TTL_MS", 900_000)?,
        base_url: vars.string("MEDIA_BASE_URL", "").trim_end_matches('/').to_owned(),
    })
}
