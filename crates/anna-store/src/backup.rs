//! Online backups of the embedded SQLite database: `VACUUM INTO` copies the database as one
//! read transaction sees it, so the copy is consistent while writers go on (WAL mode lets them).
//! Postgres is backed up with its own tools (`pg_dump`; see docs/operations.md).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

/// How long the copy waits for a write lock held elsewhere before it gives up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("anna backup copies the embedded SQLite database; back Postgres up with pg_dump (docs/operations.md)")]
    NotSqlite,
    #[error("there is no database at {0}")]
    NoDatabase(PathBuf),
    #[error("{0} already exists: give a new file name (a backup never overwrites)")]
    TargetExists(PathBuf),
    #[error("the database holds no anna schema (was `anna migrate` or `anna serve` ever run on this DATABASE_URL?)")]
    NotMigrated,
    #[error("the copy failed its integrity check: {0}")]
    Damaged(String),
    #[error("database error while copying: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot write the backup: {0}")]
    Io(#[from] std::io::Error),
}

/// What a backup wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub took: Duration,
}

/// Copies the SQLite database of `database_url` (`sqlite:…`) to `target`, a file that must
/// not exist yet, while the database is in use. The copy is readable by its owner only. The copy is written beside the target under a
/// temporary name, checked (`PRAGMA integrity_check`, and that it holds anna's schema), flushed
/// to disk, and only then given its name: an interrupted backup never leaves a file that looks
/// complete.
pub async fn backup_sqlite(database_url: &str, target: &Path) -> Result<BackupReport, BackupError> {
    if !database_url.starts_with("sqlite:") {
        return Err(BackupError::NotSqlite);
    }
    let started = Instant::now();
    let options = SqliteConnectOptions::from_str(database_url)?.create_if_missing(false).busy_timeout(BUSY_TIMEOUT);
    if !options.get_filename().exists() {
        return Err(BackupError::NoDatabase(options.get_filename().to_owned()));
    }
    if target.exists() {
        return Err(BackupError::TargetExists(target.to_owned()));
    }
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = target.with_file_name(format!(".{name}.partial-{}", uuid::Uuid::new_v4().simple()));
    let result = async {
        // Created first, readable by the owner only: the copy holds password hashes and
        // WhatsApp device keys. VACUUM INTO fills an empty file.
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        drop(file.open(&partial)?);
        let mut source = SqliteConnection::connect_with(&options).await?;
        sqlx::query("VACUUM INTO $1").bind(partial.to_string_lossy().into_owned()).execute(&mut source).await?;
        source.close().await?;
        check_integrity(&partial).await?;
        std::fs::File::open(&partial)?.sync_all()?;
        // A hard link fails when the name is taken: no copy overwrites another file, even one
        // that appeared while this one was written.
        match std::fs::hard_link(&partial, target) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(BackupError::TargetExists(target.to_owned()));
            }
            // A filesystem without hard links (some network and FAT mounts): renamed instead,
            // after checking the name is still free.
            Err(_) if !target.exists() => std::fs::rename(&partial, target)?,
            Err(_) => return Err(BackupError::TargetExists(target.to_owned())),
        }
        Ok::<_, BackupError>(())
    }
    .await;
    let _ = std::fs::remove_file(&partial);
    result?;
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(BackupReport { path: target.to_owned(), bytes: std::fs::metadata(target)?.len(), took: started.elapsed() })
}

async fn check_integrity(path: &Path) -> Result<(), BackupError> {
    let options = SqliteConnectOptions::from_str("sqlite:")?.filename(path).read_only(true);
    let mut connection = SqliteConnection::connect_with(&options).await?;
    let verdicts: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check").fetch_all(&mut connection).await?;
    let migrations: Result<i64, _> =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&mut connection).await;
    connection.close().await?;
    match verdicts.as_slice() {
        [ok] if ok == "ok" => {}
        problems => return Err(BackupError::Damaged(problems.join("; "))),
    }
    match migrations {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(BackupError::NotMigrated),
    }
}
