//! Throwaway Redis servers for tests, from the system's `redis-server` (Debian: `apt-get install
//! redis-server`). Each one listens on a free 127.0.0.1 port and keeps its data in its own
//! temporary folder.
//!
//! A server never outlives its test process: it runs under a small `sh` watchdog that holds the
//! read end of a pipe from this process, and kills the server (and removes its folder) once that
//! pipe closes, however the process ends. That matters for [`shared_url`], whose server sits in
//! a static that is never dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use uuid::Uuid;

const INSTALL_HINT: &str =
    "install the Redis server (Debian/Ubuntu: `apt-get install redis-server`) or set ANNA_TEST_REDIS_URL";
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Ports tried when the chosen one turns out to be taken by the time the server binds it.
const START_ATTEMPTS: usize = 5;

/// Runs the server in the background, prints its pid, then waits for a line or end of file
/// on stdin: either way the server is killed; the folder is removed unless the line says
/// `keep` (a restart reuses it). Arguments: output file, data folder, command.
const WATCHDOG: &str = r#"
out=$1; dir=$2; shift 2
"$@" >>"$out" 2>&1 </dev/null &
pid=$!
echo "$pid"
line=
read -r line || true
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
if [ "$line" != keep ]; then rm -rf "$dir"; fi
"#;

/// A `redis-server` of this test process. Dropping it stops the server and removes its folder.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    persistent: bool,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`. `persistent`: append-only file with
    /// an fsync per write (what survives [`RedisServer::restart`] is exactly what Redis
    /// acknowledged); otherwise no persistence at all.
    pub fn start(persistent: bool) -> RedisServer {
        let binary = find_binary();
        let dir = std::env::temp_dir().join(format!("anna-test-redis-{}", Uuid::new_v4()));
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            // Dropped on failure, which removes the folder; launch creates it again.
            let mut server = RedisServer { port: free_port(), dir: dir.clone(), persistent, running: None };
            match server.launch(&binary) {
                Ok(()) => return server,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("cannot start redis-server ({}) after {START_ATTEMPTS} attempts: {last_failure}", binary.display());
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL (no chance to save anything beyond what it already
    /// fsynced) and starts it again on the same port and folder, waiting until it answers
    /// `PING` (so after it has loaded its data).
    pub fn restart(&mut self) {
        self.stop(true);
        let binary = find_binary();
        // The old socket is gone with the process, but give the kernel a few tries anyway.
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            match self.launch(&binary) {
                Ok(()) => return,
                Err(failure) => {
                    self.stop(true);
                    last_failure = failure;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("cannot restart redis-server on port {}: {last_failure}", self.port);
    }

    fn launch(&mut self, binary: &Path) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", self.dir.display()));
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--daemonize".into(),
            "no".into(),
            "--logfile".into(),
            String::new(),
        ];
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always", "--save", ""].map(String::from));
        } else {
            args.extend(["--save", "", "--appendonly", "no"].map(String::from));
        }
        let out = self.dir.join("redis.out");
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("anna-redis-watchdog")
            .arg(&out)
            .arg(&self.dir)
            .arg(binary)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sh to start redis-server: {e}"));
        let stdin = watchdog.stdin.take();
        let pid_line = watchdog.stdout.take().map(|stdout| {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            line
        });
        let pid = pid_line.as_deref().unwrap_or_default().trim().parse::<u32>();
        let Ok(pid) = pid else {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            return Err(format!("the watchdog did not report a pid ({pid_line:?})"));
        };
        self.running = Some(Running { watchdog, stdin });

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if answers_ping(self.port) {
                return Ok(());
            }
            if !alive(pid) {
                return Err(format!("redis-server exited during start-up:\n{}", self.output_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server did not answer PING within {READY_TIMEOUT:?}:\n{}",
                    self.output_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server and waits until it is gone; `keep_dir` spares its folder.
    fn stop(&mut self, keep_dir: bool) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        // Dropping stdin closes the pipe, which is what the watchdog waits for.
        if let Some(mut stdin) = running.stdin.take()
            && keep_dir
        {
            let _ = stdin.write_all(b"keep\n");
        }
        let _ = running.watchdog.wait();
    }

    fn output_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("redis.out")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop(false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The URL of a Redis server for tests that only need isolation by key names:
/// `ANNA_TEST_REDIS_URL` if set, else one non-persistent [`RedisServer`] per test process.
pub fn shared_url() -> String {
    if let Ok(url) = std::env::var("ANNA_TEST_REDIS_URL")
        && !url.trim().is_empty()
    {
        return url.trim().to_owned();
    }
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    SHARED.get_or_init(|| RedisServer::start(false)).url()
}

fn find_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .collect::<Vec<_>>();
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no redis-server binary on PATH: {INSTALL_HINT}"))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot bind a free port on 127.0.0.1: {e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("cannot read the bound port: {e}")).port()
}

/// A plain `PING` over TCP; `-LOADING` while the data loads is not an answer yet.
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = conn.set_write_timeout(Some(Duration::from_millis(500)));
    if conn.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 64];
    match conn.read(&mut reply) {
        Ok(n) => reply[..n].starts_with(b"+PONG"),
        Err(_) => false,
    }
}

/// Whether the process runs (a zombie does not: the watchdog reaps it only at the end).
fn alive(pid: u32) -> bool {
    let proc_root = Path::new("/proc");
    if !proc_root.is_dir() {
        // No procfs: rely on the start-up deadline instead.
        return true;
    }
    match std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) {
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_and_cleans_up() {
        let mut server = RedisServer::start(true);
        assert!(answers_ping(server.port()));
        let dir = server.dir.clone();
        server.restart();
        assert!(answers_ping(server.port()));
        assert!(dir.is_dir());
        let port = server.port();
        drop(server);
        assert!(!answers_ping(port));
        assert!(!dir.exists(), "{} should be gone", dir.display());
    }
}
