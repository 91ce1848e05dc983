//! A minimal SMTP server that accepts every message and keeps it in memory.
//!
//! It speaks plain SMTP over TCP on `127.0.0.1` (EHLO/HELO, MAIL FROM, RCPT TO, DATA, RSET,
//! NOOP, VRFY, QUIT), with no TLS and no AUTH: point a sender at [`SmtpSink::url`].
//!
//! [`ReceivedMail::data`] is the raw DATA section (headers and MIME body, dot-unstuffed).
//! lettre encodes bodies with long lines as quoted-printable (soft line breaks `=\r\n` and
//! `=XX` escapes), so a link or code may be split or escaped in the raw text; search
//! [`ReceivedMail::decoded_body`] instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// One accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The reverse-path of `MAIL FROM:<…>`, without the angle brackets.
    pub from: String,
    /// Every `RCPT TO:<…>`, in order, without the angle brackets.
    pub to: Vec<String>,
    /// The raw DATA section, CRLF line endings, dot-unstuffed, without the final `.` line.
    pub data: String,
}

impl ReceivedMail {
    /// `data` with quoted-printable undone: soft line breaks removed and `=XX` turned back
    /// into bytes. Applied to the whole message, which is harmless for the headers lettre
    /// writes; good enough to find a code or a link, not a MIME parser.
    pub fn decoded_body(&self) -> String {
        let bytes = self.data.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'=' {
                if bytes[i + 1..].starts_with(b"\r\n") {
                    i += 3;
                    continue;
                }
                if bytes[i + 1..].starts_with(b"\n") {
                    i += 2;
                    continue;
                }
                if let (Some(hi), Some(lo)) =
                    (bytes.get(i + 1).and_then(hex_value), bytes.get(i + 2).and_then(hex_value))
                {
                    out.push((hi << 4) | lo);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The value of the first header named `name` (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or_default();
        let mut found: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(value) = found.as_mut() {
                if line.starts_with([' ', '\t']) {
                    value.push(' ');
                    value.push_str(line.trim());
                    continue;
                }
                break;
            }
            if let Some((key, value)) = line.split_once(':')
                && key.trim().eq_ignore_ascii_case(name)
            {
                found = Some(value.trim().to_owned());
            }
        }
        found
    }
}

/// Quoted-printable writes upper-case hex; lower case is accepted too.
fn hex_value(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

#[derive(Default)]
struct Shared {
    mails: Mutex<Vec<ReceivedMail>>,
    arrived: Notify,
}

/// The running server; it stops (and drops its connections) when this value is dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl SmtpSink {
    /// Binds `127.0.0.1:0` and starts accepting. Panics if the port cannot be bound: a test
    /// must fail, not skip, when its SMTP server is missing.
    pub async fn start() -> SmtpSink {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("SmtpSink: could not bind 127.0.0.1:0: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("SmtpSink: could not read the bound address: {e}"),
        };
        let shared = Arc::new(Shared::default());
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        SmtpSink { addr, shared, server }
    }

    /// `smtp://127.0.0.1:<port>`, as lettre's `from_url` expects.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.addr.port())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every message accepted so far.
    pub async fn messages(&self) -> Vec<ReceivedMail> {
        self.shared.mails.lock().await.clone()
    }

    /// Waits until at least `n` messages have arrived and returns all of them. When
    /// `timeout` elapses first it returns what has arrived, possibly fewer than `n`: assert
    /// on the length. With `n == 0` it waits the whole timeout, to check that nothing came.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            // Registered before the check, so a message landing in between is not missed.
            arrived.as_mut().enable();
            {
                let mails = self.shared.mails.lock().await;
                if n > 0 && mails.len() >= n {
                    return mails.clone();
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.shared.mails.lock().await.clone();
            }
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owning the connections here means aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                Err(e) => tracing::warn!(error = %e, "SmtpSink: accept failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[derive(Default)]
struct Transaction {
    from: Option<String>,
    to: Vec<String>,
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    if let Err(e) = session(stream, &shared).await {
        tracing::debug!(error = %e, "SmtpSink: connection ended with an error");
    }
}

async fn session(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write.write_all(b"220 anna-testkit SMTP sink ready\r\n").await?;

    let mut tx = Transaction::default();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw).await? == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, rest) = match line.split_once(' ') {
            Some((verb, rest)) => (verb.to_ascii_uppercase(), rest.trim()),
            None => (line.to_ascii_uppercase(), ""),
        };
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => {
                tx = Transaction::default();
                write
                    .write_all(format!("250-anna-testkit greets {rest}\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n").as_bytes())
                    .await?;
                continue;
            }
            "HELO" => {
                tx = Transaction::default();
                b"250 anna-testkit\r\n"
            }
            "MAIL" => match path_after(rest, "FROM:") {
                Some(from) => {
                    tx = Transaction { from: Some(from), to: Vec::new() };
                    b"250 OK\r\n"
                }
                None => b"501 Syntax: MAIL FROM:<address>\r\n",
            },
            "RCPT" => match (&tx.from, path_after(rest, "TO:")) {
                (None, _) => b"503 MAIL first\r\n",
                (Some(_), Some(to)) if !to.is_empty() => {
                    tx.to.push(to);
                    b"250 OK\r\n"
                }
                (Some(_), _) => b"501 Syntax: RCPT TO:<address>\r\n",
            },
            "DATA" => {
                if tx.from.is_none() || tx.to.is_empty() {
                    b"503 MAIL and RCPT first\r\n"
                } else {
                    write.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                    let Some(data) = read_data(&mut reader).await? else {
                        return Ok(());
                    };
                    let done = std::mem::take(&mut tx);
                    let mail = ReceivedMail { from: done.from.unwrap_or_default(), to: done.to, data };
                    shared.mails.lock().await.push(mail);
                    shared.arrived.notify_waiters();
                    b"250 OK: queued\r\n"
                }
            }
            "RSET" => {
                tx = Transaction::default();
                b"250 OK\r\n"
            }
            "NOOP" => b"250 OK\r\n",
            "VRFY" => b"252 Cannot VRFY user, but will accept message\r\n",
            "QUIT" => {
                write.write_all(b"221 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 Command not implemented\r\n",
        };
        write.write_all(reply).await?;
    }
}

/// Extracts `addr` from `FROM:<addr> PARAM=…` (the keyword case-insensitive, spaces after
/// the colon tolerated). `<>` yields an empty string: the null reverse-path.
fn path_after(rest: &str, keyword: &str) -> Option<String> {
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let path = rest[keyword.len()..].trim_start();
    let inner = path.strip_prefix('<')?;
    let end = inner.find('>')?;
    Some(inner[..end].to_owned())
}

/// Reads up to the lone `.` line. `None` when the client hangs up midway.
async fn read_data<R>(reader: &mut R) -> std::io::Result<Option<String>>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some(String::from_utf8_lossy(&data).into_owned()));
        }
        let unstuffed = if line.first() == Some(&b'.') { &line[1..] } else { &line[..] };
        data.extend_from_slice(unstuffed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_body_undoes_quoted_printable() {
        let mail = ReceivedMail {
            from: String::new(),
            to: Vec::new(),
            data: "Subject: x\r\n\r\nhttp://h/verify?userId=3D1&tok=\r\nen=3Dab=C3=A9\r\n".to_owned(),
        };
        assert_eq!(mail.decoded_body(), "Subject: x\r\n\r\nhttp://h/verify?userId=1&token=abé\r\n");
    }

    #[test]
    fn header_is_found_and_unfolded() {
        let mail = ReceivedMail {
            from: String::new(),
            to: Vec::new(),
            data: "From: a@b.c\r\nSubject: Hello\r\n there\r\nTo: x@y.z\r\n\r\nbody\r\n".to_owned(),
        };
        assert_eq!(mail.header("subject").as_deref(), Some("Hello there"));
        assert_eq!(mail.header("To").as_deref(), Some("x@y.z"));
        assert_eq!(mail.header("Cc"), None);
    }

    #[test]
    fn paths_are_extracted() {
        assert_eq!(path_after("FROM:<a@b.c> BODY=8BITMIME", "FROM:").as_deref(), Some("a@b.c"));
        assert_eq!(path_after("to: <x@y.z>", "TO:").as_deref(), Some("x@y.z"));
        assert_eq!(path_after("FROM:<>", "FROM:").as_deref(), Some(""));
        assert_eq!(path_after("FROM a@b.c", "FROM:"), None);
    }

    #[tokio::test]
    async fn accepts_a_raw_session() {
        let sink = SmtpSink::start().await;
        let stream = TcpStream::connect(sink.addr()).await;
        let Ok(stream) = stream else { panic!("connect failed") };
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut transcript = String::new();
        let script =
            ["EHLO test\r\n", "MAIL FROM:<a@b.c>\r\n", "RCPT TO:<x@y.z>\r\n", "RCPT TO:<w@y.z>\r\n", "DATA\r\n"];
        let mut line = String::new();
        let _ = reader.read_line(&mut line).await;
        for command in script {
            let _ = write.write_all(command.as_bytes()).await;
            loop {
                line.clear();
                let _ = reader.read_line(&mut line).await;
                transcript.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    break;
                }
            }
        }
        let _ = write.write_all(b"Subject: t\r\n\r\n..dotted\r\nplain\r\n.\r\nQUIT\r\n").await;
        let mails = sink.wait_for_messages(1, Duration::from_secs(5)).await;
        assert_eq!(mails.len(), 1, "transcript: {transcript}");
        assert_eq!(mails[0].from, "a@b.c");
        assert_eq!(mails[0].to, vec!["x@y.z".to_owned(), "w@y.z".to_owned()]);
        assert_eq!(mails[0].data, "Subject: t\r\n\r\n.dotted\r\nplain\r\n");
    }
}
