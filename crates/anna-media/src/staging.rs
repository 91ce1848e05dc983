//! A file received from a client, written to a temporary file as it arrives: its size is
//! checked against the limit at every chunk, its SHA-256 computed and its first bytes kept for
//! [`crate::inspect`], so nothing is stored before it has been looked at, and a large upload
//! never sits in memory.

use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{MediaError, SNIFF_BYTES};

/// A file being received.
pub struct Staging {
    file: tokio::fs::File,
    path: tempfile::TempPath,
    limit: u64,
    size: u64,
    hash: Sha256,
    head: Vec<u8>,
}

/// A file received whole. The temporary file is removed when this is dropped.
pub struct StagedFile {
    path: tempfile::TempPath,
    pub size: u64,
    /// Base64 of the SHA-256 of the content.
    pub sha256: String,
    /// The first [`SNIFF_BYTES`] bytes (or all of a smaller file).
    pub head: Vec<u8>,
}

impl Staging {
    /// A new temporary file (in the system's temporary directory) for at most `limit` bytes.
    pub async fn new(limit: u64) -> Result<Self, MediaError> {
        let file = tempfile::NamedTempFile::new().map_err(|e| MediaError::Storage(format!("temporary file: {e}")))?;
        let (file, path) = file.into_parts();
        Ok(Self { file: tokio::fs::File::from_std(file), path, limit, size: 0, hash: Sha256::new(), head: Vec::new() })
    }

    /// Appends a chunk; [`MediaError::TooLarge`] as soon as the file outgrows the limit.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), MediaError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(MediaError::TooLarge { limit: self.limit });
        }
        if self.head.len() < SNIFF_BYTES {
            let wanted = (SNIFF_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..wanted]);
        }
        self.hash.update(chunk);
        self.file.write_all(chunk).await.map_err(|e| MediaError::Storage(format!("temporary file: {e}")))
    }

    pub async fn finish(mut self) -> Result<StagedFile, MediaError> {
        self.file.flush().await.map_err(|e| MediaError::Storage(format!("temporary file: {e}")))?;
        Ok(StagedFile {
            path: self.path,
            size: self.size,
            sha256: base64::engine::general_purpose::STANDARD.encode(self.hash.finalize()),
            head: self.head,
        })
    }
}

impl StagedFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file written whole by someone else (a driver's download): measured, hashed and its
    /// first bytes kept, reading it a chunk at a time.
    pub async fn from_written(path: tempfile::TempPath) -> Result<Self, MediaError> {
        use tokio::io::AsyncReadExt;
        let unreadable = |e: std::io::Error| MediaError::Storage(format!("temporary file: {e}"));
        let mut file = tokio::fs::File::open(&path).await.map_err(unreadable)?;
        let (mut size, mut hash, mut head) = (0u64, Sha256::new(), Vec::new());
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let read = file.read(&mut chunk).await.map_err(unreadable)?;
            if read == 0 {
                break;
            }
            if head.len() < SNIFF_BYTES {
                head.extend_from_slice(&chunk[..(SNIFF_BYTES - head.len()).min(read)]);
            }
            hash.update(&chunk[..read]);
            size += read as u64;
        }
        Ok(Self { path, size, sha256: base64::engine::general_purpose::STANDARD.encode(hash.finalize()), head })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_is_hashed_measured_and_sniffable() {
        let mut staging = Staging::new(100_000).await.unwrap_or_else(|e| panic!("{e}"));
        let chunk = vec![7u8; 6000];
        staging.write(&chunk).await.unwrap_or_else(|e| panic!("{e}"));
        staging.write(&chunk).await.unwrap_or_else(|e| panic!("{e}"));
        let staged = staging.finish().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(staged.size, 12_000);
        assert_eq!(staged.head.len(), SNIFF_BYTES);
        assert_eq!(std::fs::read(staged.path()).map(|b| b.len()).ok(), Some(12_000));
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(vec![7u8; 12_000]));
        assert_eq!(staged.sha256, expected);
        let path = staged.path().to_owned();
        drop(staged);
        assert!(!path.exists(), "the temporary file outlived the upload");
    }

    #[tokio::test]
    async fn a_file_written_elsewhere_is_measured_the_same_way() {
        let file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(file.path(), vec![7u8; 12_000]).unwrap_or_else(|e| panic!("{e}"));
        let staged = StagedFile::from_written(file.into_temp_path()).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((staged.size, staged.head.len()), (12_000, SNIFF_BYTES));
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(vec![7u8; 12_000]));
        assert_eq!(staged.sha256, expected);
    }

    #[tokio::test]
    async fn the_limit_stops_the_file_at_the_chunk_that_passes_it() {
        let mut staging = Staging::new(10).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(staging.write(b"0123456789").await.is_ok());
        assert!(matches!(staging.write(b"x").await, Err(MediaError::TooLarge { limit: 10 })));
    }
}
