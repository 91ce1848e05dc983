//! Fresh Postgres databases for tests: every call creates a new, empty database.
//!
//! The server is, in order of preference:
//! - the one named by `ANNA_TEST_DATABASE_URL`: a URL to an existing database on a server where
//!   the tests may `CREATE DATABASE` (for example `postgres://postgres@127.0.0.1:5432/postgres`);
//! - otherwise a throwaway cluster built from the system's binaries (`initdb`, `pg_ctl` under
//!   `/usr/lib/postgresql/<version>/bin` or on `PATH`), in `<temp dir>/anna-test-pg-<port>`,
//!   listening on 127.0.0.1 at `ANNA_TEST_PG_PORT` (default 55432) with trust authentication and
//!   durability switched off. It is started by the first test process that needs it and left
//!   running, so the next test processes skip the start-up; `scripts/test` stops it at the end
//!   (`pg_ctl -D <temp dir>/anna-test-pg-<port> stop`).
//!
//! Created databases are never dropped: they die with the throwaway cluster, and on a shared
//! server they are easy to spot (`anna_test_<uuid>`).
//!
//! Missing binaries or a failed start-up panic with what is missing: a test never skips.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const DEFAULT_PORT: u16 = 55432;
const INSTALL_HINT: &str = "install the Postgres server binaries (Debian/Ubuntu: `apt-get install postgresql`) \
     or set ANNA_TEST_DATABASE_URL to a database on a server where the tests may CREATE DATABASE";

/// The URL of a brand-new empty database.
pub async fn fresh_database_url() -> String {
    let admin = admin_url();
    let name = format!("anna_test_{}", Uuid::new_v4().simple());
    // One connection, not a pool: each test runs its own tokio runtime, and a pool kept in a
    // static would outlive the runtime its connections were made on.
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test Postgres server {}: {e}", redact(&admin)));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name} on {}: {e}", redact(&admin)));
    // The database exists either way; a failed goodbye is not worth a failed test.
    let _ = conn.close().await;
    with_database(&admin, &name)
}

fn admin_url() -> String {
    if let Ok(url) = std::env::var("ANNA_TEST_DATABASE_URL")
        && !url.trim().is_empty()
    {
        return url.trim().to_owned();
    }
    static CLUSTER: OnceLock<String> = OnceLock::new();
    CLUSTER.get_or_init(ensure_cluster).clone()
}

fn port() -> u16 {
    match std::env::var("ANNA_TEST_PG_PORT") {
        Ok(raw) if !raw.trim().is_empty() => {
            raw.trim().parse().unwrap_or_else(|e| panic!("ANNA_TEST_PG_PORT={raw:?} is not a port number: {e}"))
        }
        _ => DEFAULT_PORT,
    }
}

/// Starts the throwaway cluster unless it already runs, and returns the URL of its `postgres`
/// database.
fn ensure_cluster() -> String {
    let port = port();
    let bin = find_bin_dir();
    let dir = std::env::temp_dir().join(format!("anna-test-pg-{port}"));
    // Several test binaries may start at once; only one of them may initdb / start.
    let lock_path = std::env::temp_dir().join(format!("anna-test-pg-{port}.lock"));
    let lock =
        File::create(&lock_path).unwrap_or_else(|e| panic!("cannot create the lock file {}: {e}", lock_path.display()));
    lock.lock().unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));

    let as_postgres = running_as_root();
    let status = run(pg_tool(&bin, "pg_ctl", as_postgres).arg("status").arg("-D").arg(&dir));
    if !status.status.success() {
        if !dir.join("PG_VERSION").is_file() {
            init_cluster(&bin, &dir, as_postgres);
        }
        start_cluster(&bin, &dir, port, as_postgres);
    }
    drop(lock);
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

fn init_cluster(bin: &Path, dir: &Path, as_postgres: bool) {
    // A folder without PG_VERSION is what an interrupted initdb leaves; initdb wants it empty.
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("cannot remove {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    if as_postgres {
        let chown = run(Command::new("chown").arg("postgres:postgres").arg(dir));
        if !chown.status.success() {
            panic!(
                "cannot hand {} to the postgres user (initdb refuses to run as root): {}\n{INSTALL_HINT}",
                dir.display(),
                output_text(&chown)
            );
        }
    }
    let init = run(pg_tool(bin, "initdb", as_postgres)
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "-D"])
        .arg(dir));
    if !init.status.success() {
        panic!("initdb failed for the test cluster in {}: {}\n{INSTALL_HINT}", dir.display(), output_text(&init));
    }
}

fn start_cluster(bin: &Path, dir: &Path, port: u16, as_postgres: bool) {
    let log = dir.join("log");
    let server_options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=300",
        dir.display()
    );
    let start = run(pg_tool(bin, "pg_ctl", as_postgres)
        .arg("-w")
        .arg("-D")
        .arg(dir)
        .arg("-o")
        .arg(server_options)
        .arg("start")
        .arg("-l")
        .arg(&log));
    if !start.status.success() {
        let server_log = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = server_log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        panic!(
            "cannot start the test Postgres cluster in {} on port {port}: {}\nserver log:\n{}\n\
             (is the port taken? choose another with ANNA_TEST_PG_PORT)",
            dir.display(),
            output_text(&start),
            tail.join("\n")
        );
    }
}

/// The highest version under /usr/lib/postgresql, else the first PATH entry that has both tools.
fn find_bin_dir() -> PathBuf {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.split('.').map(str::parse).collect::<Result<Vec<u32>, _>>().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    std::env::var_os("PATH").iter().flat_map(std::env::split_paths).find(|dir| has_tools(dir)).unwrap_or_else(|| {
        panic!(
            "no Postgres server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH: {INSTALL_HINT}"
        )
    })
}

/// initdb and postgres refuse to run as root.
fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn pg_tool(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        command
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}\n{INSTALL_HINT}"))
}

fn output_text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)).trim().to_owned()
}

/// Swaps the database of a `postgres://` URL, keeping its query string.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let root = base[authority..].find('/').map_or(base, |slash| &base[..authority + slash]);
    match query {
        Some(query) => format!("{root}/{database}?{query}"),
        None => format!("{root}/{database}"),
    }
}

/// The URL without its password, for panic messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let user = url[scheme_end + 3..at].split(':').next().unwrap_or_default();
            format!("{}://{user}:***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_the_database_and_keeps_the_rest() {
        assert_eq!(with_database("postgres://u:p@h:5432/postgres", "x"), "postgres://u:p@h:5432/x");
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(with_database("postgres://h/db?sslmode=disable", "x"), "postgres://h/x?sslmode=disable");
        assert_eq!(with_database("postgresql://h:1/?host=/tmp", "x"), "postgresql://h:1/x?host=/tmp");
    }

    #[test]
    fn hides_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
