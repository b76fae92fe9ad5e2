//! Accepting connections for a server plane: bounded, with handshakes off the accept loop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{CertInfo, Reloading};

/// A TLS handshake that has not finished in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that has not sent its opening bytes (see [`OPENING_BYTES`]) this long
/// after it was accepted is closed: idle connections must not hold the plane's slots.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// What every protocol a plane speaks opens with at least: HTTP/2's preface and the peer
/// frames' magic are 24 bytes, an HTTP/1 request line and its `Host` more. Until they have
/// arrived, the first-byte timeout runs and the connection counts as pending (one byte,
/// then silence, would otherwise hold a slot for good: the HTTP/2 server waits for the
/// rest of the preface without a timer).
const OPENING_BYTES: usize = 24;
/// Connections from one address that have not finished their handshake or sent their
/// opening bytes yet, at most (loopback excepted). A stranger holding connections open
/// without a word (or in a handshake that never ends) holds these, not the plane's slots:
/// each lasts up to the timeouts above, and one address could otherwise fill every slot
/// of the plane and keep members and clients out. Members and clients finish both in
/// milliseconds.
const PENDING_PER_ADDRESS: usize = 64;

/// What a service learns about the connection a request came on (tonic puts it in the
/// request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The address the connection was made to (this instance's side).
    pub local: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate the TLS handshake verified (mutual TLS only).
    pub peer_cert: Option<Arc<CertInfo>>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection; holds one of the plane's connection slots until dropped.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
    /// Until the opening bytes have arrived: when it fires, reads fail and the server
    /// closes.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes received so far, until [`OPENING_BYTES`].
    opened: usize,
    /// Counts it among its address's pending connections until the opening bytes arrive.
    pending: Option<PendingGuard>,
    /// Bytes read to tell the protocol apart, served again before the socket's.
    prefix: Vec<u8>,
}

impl Conn {
    fn new(
        io: Io,
        info: ConnInfo,
        slot: OwnedSemaphorePermit,
        pending: Option<PendingGuard>,
    ) -> Self {
        Self {
            io,
            info,
            _slot: slot,
            first_byte: Some(Box::pin(tokio::time::sleep(FIRST_BYTE_TIMEOUT))),
            opened: 0,
            pending,
            prefix: Vec::new(),
        }
    }

    /// Who is at the other end (address, verified client certificate).
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// Reads the connection's first bytes: true if they are `magic` (consumed), false if
    /// not (they are read again by whoever reads the connection next).
    async fn starts_with(&mut self, magic: &[u8]) -> io::Result<bool> {
        use tokio::io::AsyncReadExt as _;
        let mut first = vec![0; magic.len()];
        self.read_exact(&mut first).await?;
        if first == magic {
            return Ok(true);
        }
        self.prefix = first;
        Ok(false)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some(timer) = this.first_byte.as_mut() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    this.opened += buf.filled().len() - before;
                    if this.opened >= OPENING_BYTES {
                        this.first_byte = None;
                        this.pending = None;
                    }
                }
                Poll::Pending if timer.as_mut().poll(cx).is_ready() => {
                    tracing::debug!(remote = %this.info.remote, "connection sent too little within {FIRST_BYTE_TIMEOUT:?}; closed");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the first-byte timeout",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of one plane, ready for the HTTP/2 server.
pub struct Incoming {
    rx: mpsc::Receiver<Conn>,
}

impl Stream for Incoming {
    type Item = Result<Conn, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// A second protocol a plane takes beside HTTP/2: connections whose first bytes are
/// `magic` (consumed) are given to `serve` instead of the HTTP/2 server.
#[derive(Clone)]
pub struct Alongside {
    pub magic: &'static [u8],
    pub serve: Arc<dyn Fn(Conn) + Send + Sync>,
}

/// Hands `conn` to the protocol its first bytes name; a connection that sends fewer
/// bytes than the magic within the first-byte timeout is closed.
async fn route(mut conn: Conn, alongside: Option<&Alongside>, tx: &mpsc::Sender<Conn>) {
    let Some(other) = alongside else {
        let _ = tx.send(conn).await;
        return;
    };
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, conn.starts_with(other.magic)).await {
        Ok(Ok(true)) => (other.serve)(conn),
        Ok(Ok(false)) => {
            let _ = tx.send(conn).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(remote = %conn.info.remote, error = %e, "connection closed before it named its protocol")
        }
        Err(_) => {
            tracing::debug!(remote = %conn.info.remote, "connection sent too little within {FIRST_BYTE_TIMEOUT:?}; closed")
        }
    }
}

/// The connections from each address that have not finished their handshake or sent their
/// opening bytes yet (see [`PENDING_PER_ADDRESS`]).
#[derive(Clone)]
struct Pending {
    by_address: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    limit: usize,
    /// Whether loopback addresses are counted (not in service: sidecar proxies and local
    /// tools all come from there).
    loopback_too: bool,
}

/// One pending connection of an address; its count goes down when this is dropped.
struct PendingGuard {
    pending: Pending,
    address: std::net::IpAddr,
}

impl Pending {
    /// A guard for a new connection from `address`, or `Err` when it has too many pending.
    fn enter(&self, address: std::net::IpAddr) -> Result<Option<PendingGuard>, usize> {
        // IPv4 on a dual-stack listener comes as `::ffff:a.b.c.d`.
        let address = address.to_canonical();
        if address.is_loopback() && !self.loopback_too {
            return Ok(None);
        }
        let mut by_address = self.by_address.lock().expect("pending lock");
        let count = by_address.entry(address).or_insert(0);
        if *count >= self.limit {
            return Err(*count);
        }
        *count += 1;
        Ok(Some(PendingGuard {
            pending: self.clone(),
            address,
        }))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut by_address = self.pending.by_address.lock().expect("pending lock");
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// Accepts on `listener` until `cancel`: at most `max_connections` open at once (further
/// ones wait in the kernel's backlog), at most 64 (`PENDING_PER_ADDRESS`) from one address
/// before their handshake and opening bytes (further ones are closed at once),
/// `TCP_NODELAY`, and with `tls` a handshake per connection in its own task. Failed
/// handshakes are logged and dropped. With `alongside`, connections are told apart by
/// their first bytes (in a task of their own).
pub fn incoming(
    plane: &'static str,
    listener: TcpListener,
    tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
    max_connections: usize,
    cancel: CancellationToken,
    alongside: Option<Alongside>,
) -> Incoming {
    let pending = Pending {
        by_address: Default::default(),
        limit: PENDING_PER_ADDRESS,
        loopback_too: false,
    };
    accept_loop(
        plane,
        listener,
        tls,
        max_connections,
        cancel,
        alongside,
        pending,
    )
}

fn accept_loop(
    plane: &'static str,
    listener: TcpListener,
    tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
    max_connections: usize,
    cancel: CancellationToken,
    alongside: Option<Alongside>,
    pending: Pending,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        let mut full_logged = false;
        let mut refused_logged: Option<tokio::time::Instant> = None;
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(s) => {
                    full_logged = false;
                    s
                }
                Err(_) => {
                    if !full_logged {
                        tracing::warn!(
                            plane,
                            max_connections,
                            "connection limit reached; new connections wait"
                        );
                        full_logged = true;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        s = slots.clone().acquire_owned() => s.expect("never closed"),
                    }
                }
            };
            let (tcp, remote) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, say: wait instead of spinning.
                        tracing::warn!(plane, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let guard = match pending.enter(remote.ip()) {
                Ok(guard) => guard,
                Err(count) => {
                    // Closed at once; its slot is free again. Logged once in 10 s.
                    if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(plane, %remote, pending = count, "too many connections from one address still in their handshake or short of their opening bytes; new ones from it are closed");
                        refused_logged = Some(tokio::time::Instant::now());
                    }
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let Some(tls) = tls.clone() else {
                let info = ConnInfo {
                    remote,
                    local,
                    tls: false,
                    peer_cert: None,
                };
                let conn = Conn::new(Io::Plain(tcp), info, slot, guard);
                if alongside.is_none() {
                    if tx.send(conn).await.is_err() {
                        return;
                    }
                } else {
                    let (tx, alongside) = (tx.clone(), alongside.clone());
                    tokio::spawn(async move { route(conn, alongside.as_ref(), &tx).await });
                }
                continue;
            };
            let (tx, alongside) = (tx.clone(), alongside.clone());
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let peer_cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| CertInfo::parse(c))
                            .map(Arc::new);
                        let info = ConnInfo {
                            remote,
                            local,
                            tls: true,
                            peer_cert,
                        };
                        let conn = Conn::new(Io::Tls(Box::new(stream)), info, slot, guard);
                        route(conn, alongside.as_ref(), &tx).await;
                    }
                    Ok(Err(e)) => {
                        let hint = if e.to_string().contains("InvalidContentType") {
                            " (the client does not speak TLS: a plaintext client on a TLS port?)"
                        } else {
                            ""
                        };
                        tracing::warn!(plane, %remote, error = %e, "TLS handshake failed{hint}")
                    }
                    Err(_) => tracing::warn!(
                        plane,
                        %remote,
                        "TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}; closed"
                    ),
                }
            });
        }
    });
    Incoming { rx }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn mapped_addresses_count_in_their_plain_form() {
        let pending = Pending {
            by_address: Default::default(),
            limit: 1,
            loopback_too: false,
        };
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(pending.enter(ip("::ffff:127.0.0.1")).unwrap().is_none());
        assert!(pending.enter(ip("::1")).unwrap().is_none());
        // IPv4 on a dual-stack listener counts with its plain form.
        let v4 = pending.enter(ip("10.0.0.7")).unwrap();
        assert!(v4.is_some());
        assert_eq!(pending.enter(ip("::ffff:10.0.0.7")).err(), Some(1));
        let v6 = pending.enter(ip("2001:db8:1:2::10")).unwrap();
        assert_eq!(pending.enter(ip("2001:db8:1:2::10")).err(), Some(1));
        assert!(pending.enter(ip("2001:db8:1:2::11")).unwrap().is_some());
        drop((v4, v6));
        assert!(
            pending.by_address.lock().unwrap().is_empty(),
            "counts go back to nothing"
        );
    }

    #[tokio::test]
    async fn an_address_with_too_many_silent_connections_gets_no_more_until_one_speaks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let pending = Pending {
            by_address: Default::default(),
            limit: 2,
            loopback_too: true,
        };
        let cancel = CancellationToken::new();
        let mut incoming = accept_loop("test", listener, None, 8, cancel.clone(), None, pending);

        // Two that say nothing: taken (the plane has slots), and pending.
        let mut first = TcpStream::connect(address).await.unwrap();
        let _second = TcpStream::connect(address).await.unwrap();
        let mut first_conn = incoming.next().await.unwrap().unwrap();
        let _second_conn = incoming.next().await.unwrap().unwrap();
        // A third from the same address: closed at once, never handed on.
        let refused = |mut stream: TcpStream| async move {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
                .await
                .expect("closed, not left waiting");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        };
        refused(TcpStream::connect(address).await.unwrap()).await;

        // One byte is not enough (the HTTP/2 server would wait for the rest of its preface
        // without a timer).
        first.write_all(b"P").await.unwrap();
        let mut read = [0u8; OPENING_BYTES];
        first_conn.read_exact(&mut read[..1]).await.unwrap();
        refused(TcpStream::connect(address).await.unwrap()).await;
        // Once the first has sent its opening bytes, the address has room again.
        first.write_all(&[b'x'; OPENING_BYTES - 1]).await.unwrap();
        first_conn.read_exact(&mut read[1..]).await.unwrap();
        let _fifth = TcpStream::connect(address).await.unwrap();
        let fifth_conn = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("another connection is taken once the first has sent its opening bytes");
        assert!(fifth_conn.unwrap().is_ok());
        cancel.cancel();
    }

    #[tokio::test]
    async fn connections_are_told_apart_by_their_first_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (taken_tx, mut taken) = mpsc::unbounded_channel();
        let alongside = Alongside {
            magic: b"MAGIC",
            serve: Arc::new(move |conn| {
                let _ = taken_tx.send(conn);
            }),
        };
        let cancel = CancellationToken::new();
        let mut incoming = incoming("test", listener, None, 8, cancel.clone(), Some(alongside));

        // The other protocol: the magic is consumed, the rest is read by its server.
        let mut ours = TcpStream::connect(address).await.unwrap();
        ours.write_all(b"MAGIC and then frames").await.unwrap();
        let mut conn = taken.recv().await.unwrap();
        let mut rest = [0; 16];
        conn.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" and then frames");

        // HTTP/2's preface: handed to the HTTP/2 server whole, the sniffed bytes first.
        let mut h2 = TcpStream::connect(address).await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut preface = [0; 16];
        conn.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n");
        assert!(taken.try_recv().is_err());
        cancel.cancel();
    }
}
