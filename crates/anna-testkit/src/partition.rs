//! A TCP proxy on loopback that can be cut like a network partition: after [`Proxy::cut`] no
//! byte goes through in either direction, and the connections stay open (as when a cable is
//! pulled, nobody is told). For tests of what a process does when it loses its database.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Proxy {
    /// Forwards a new loopback port to `upstream` (a loopback address).
    pub async fn start(upstream: SocketAddr) -> Self {
        assert!(upstream.ip().is_loopback(), "the proxy only forwards to loopback, not {upstream}");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("proxy cannot listen: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("proxy address: {e}"));
        let (cut, cut_seen) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, upstream, cut_seen.clone()));
            }
        });
        Self { addr, cut }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on nothing goes through; open connections hang, new ones are accepted and hang.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    let already_cut = *cut.borrow();
    if already_cut {
        // Accepted, then silence.
        std::future::pending::<()>().await;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        let _ = client.shutdown().await;
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let was_cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        seen = cut.wait_for(|cut| *cut) => seen.is_ok(),
    };
    if was_cut {
        // Hold both ends open, forwarding nothing.
        std::future::pending::<()>().await;
    }
}
