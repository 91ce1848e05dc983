//! `TCP_NODELAY` for the Postgres connections.
//!
//! sqlx 0.9.0 leaves Nagle's algorithm on (0.8 turned it off; the fix is merged upstream but
//! not released). A statement longer than one TCP segment then waits for the server's delayed
//! ACK, 40 ms on Linux, before its last part leaves: measured on one durable Postgres, a
//! 100,000-row outbox backlog drained at 9,900 events/s over TCP against 16,000 over the Unix
//! socket, and the send → WebSocket latency of sessions swung from tens of milliseconds to
//! seconds. sqlx offers no hook on its socket, so right after connecting anna asks the server
//! which ports it sees, finds the socket of this process with those ports, and sets the option
//! on it (through a duplicate of the descriptor: `pidfd_getfd`, no unsafe code).
//!
//! Best effort: where the duplicate is refused (a seccomp profile without `pidfd_getfd`, a
//! kernel before 5.6) or the ports seen by the server are not ours (a proxy or NAT between),
//! the connection works as before and one warning says so. Remove this module when sqlx sets
//! the option itself.

use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::PgConnection;

/// Whether the warning about connections left with Nagle's algorithm was given.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets `TCP_NODELAY` on `conn`'s socket when it is a TCP socket of this process.
pub(crate) async fn set_on(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    // NULL over a Unix socket, which has no Nagle's algorithm to turn off.
    let (client_port, server_port): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), inet_server_port()").fetch_one(&mut *conn).await?;
    let (Some(local), Some(peer)) = (client_port, server_port) else { return Ok(()) };
    let (Ok(local), Ok(peer)) = (u16::try_from(local), u16::try_from(peer)) else { return Ok(()) };
    match set_on_socket_with_ports(local, peer) {
        Ok(true) => {}
        Ok(false) => warn_once("no socket of this process has the ports the server sees (a proxy or NAT between?)"),
        Err(error) => warn_once(&error.to_string()),
    }
    Ok(())
}

fn warn_once(why: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            why,
            "Postgres connections keep Nagle's algorithm (TCP_NODELAY could not be set): larger \
             statements may wait 40 ms each; a Postgres on the same host is better reached through \
             its Unix socket"
        );
    }
}

/// Finds this process's TCP socket with local port `local` and peer port `peer` and sets
/// `TCP_NODELAY` on it. Returns whether it found one.
#[cfg(target_os = "linux")]
fn set_on_socket_with_ports(local: u16, peer: u16) -> std::io::Result<bool> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    let this_process = pidfd_open(getpid(), PidfdFlags::empty())?;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(number) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Only sockets (the link reads `socket:[inode]`); files and pipes are skipped unopened.
        match std::fs::read_link(entry.path()) {
            Ok(target) if target.as_os_str().as_encoded_bytes().starts_with(b"socket:") => {}
            _ => continue,
        }
        // The descriptor may have been closed (and its number reused) since the listing: the
        // duplicate is whatever it is now, and the ports below tell whether it is ours.
        let Ok(socket) = pidfd_getfd(&this_process, number, PidfdGetfdFlags::empty()) else { continue };
        let ports = |address: Option<rustix::net::SocketAddrAny>| {
            address.and_then(|a| std::net::SocketAddr::try_from(a).ok()).map(|a| a.port())
        };
        let local_port = ports(rustix::net::getsockname(&socket).ok());
        let peer_port = ports(rustix::net::getpeername(&socket).ok().flatten());
        if local_port == Some(local) && peer_port == Some(peer) {
            rustix::net::sockopt::set_tcp_nodelay(&socket, true)?;
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(not(target_os = "linux"))]
fn set_on_socket_with_ports(_local: u16, _peer: u16) -> std::io::Result<bool> {
    Err(std::io::Error::other("only implemented on Linux"))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A connected client socket (Nagle's algorithm on, as sockets start) and its listener.
    fn connected() -> Result<(TcpStream, TcpListener, TcpStream), std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server_side, _) = listener.accept()?;
        Ok((client, listener, server_side))
    }

    #[test]
    fn finds_the_socket_by_its_ports_and_sets_the_option() -> TestResult {
        let (client, _listener, _server_side) = connected()?;
        assert!(!client.nodelay()?);
        let (local, peer) = (client.local_addr()?.port(), client.peer_addr()?.port());
        assert!(set_on_socket_with_ports(local, peer)?);
        assert!(client.nodelay()?);
        Ok(())
    }

    /// The pool's own connections, over TCP to the test Postgres: every one of them has the
    /// option once it is connected.
    #[tokio::test]
    async fn postgres_connections_get_the_option() -> TestResult {
        let url = anna_testkit::pg::fresh_database_url().await;
        let server_port = url::port_of(&url).ok_or("the test database URL has no port")?;
        let store = crate::SqlStore::connect(&url, &crate::ConnectOptions::default()).await?;
        // Three connections at once, so the pool opens three.
        let (a, b, c) =
            tokio::join!(crate::Store::begin(&store), crate::Store::begin(&store), crate::Store::begin(&store));
        let _open = (a?, b?, c?);
        let mut checked = 0;
        let this_process =
            rustix::process::pidfd_open(rustix::process::getpid(), rustix::process::PidfdFlags::empty())?;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let entry = entry?;
            let Some(number) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Ok(socket) =
                rustix::process::pidfd_getfd(&this_process, number, rustix::process::PidfdGetfdFlags::empty())
            else {
                continue;
            };
            let Ok(Some(peer)) = rustix::net::getpeername(&socket) else { continue };
            let Ok(peer) = std::net::SocketAddr::try_from(peer) else { continue };
            if peer.port() == server_port {
                assert!(rustix::net::sockopt::tcp_nodelay(&socket)?, "a Postgres socket without TCP_NODELAY");
                checked += 1;
            }
        }
        assert!(checked >= 3, "found {checked} Postgres sockets");
        Ok(())
    }

    mod url {
        /// The port of a `postgres://…@host:port/…` URL.
        pub fn port_of(url: &str) -> Option<u16> {
            let authority = url.split("://").nth(1)?.split('/').next()?;
            authority.rsplit(':').next()?.parse().ok()
        }
    }

    #[test]
    fn leaves_sockets_with_other_ports_alone() -> TestResult {
        let (client, listener, _server_side) = connected()?;
        // The right local port with another peer port is not this connection.
        let other_peer = listener.local_addr()?.port().wrapping_add(1);
        assert!(!set_on_socket_with_ports(client.local_addr()?.port(), other_peer)?);
        assert!(!client.nodelay()?);
        Ok(())
    }
}
