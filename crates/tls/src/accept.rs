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
/// A connection that sends nothing (no HTTP/2 preface, no HTTP/1 request) for this long
/// after it was accepted is closed: idle connections must not hold the plane's slots.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a service learns about the connection a request came on (tonic puts it in the
/// request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
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
    /// Until the first byte arrives: when it fires, reads fail and the server closes.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    fn new(io: Io, info: ConnInfo, slot: OwnedSemaphorePermit) -> Self {
        Self {
            io,
            info,
            _slot: slot,
            first_byte: Some(Box::pin(tokio::time::sleep(FIRST_BYTE_TIMEOUT))),
        }
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
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some(timer) = this.first_byte.as_mut() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_byte = None,
                Poll::Pending if timer.as_mut().poll(cx).is_ready() => {
                    tracing::debug!(remote = %this.info.remote, "connection sent nothing within {FIRST_BYTE_TIMEOUT:?}; closed");
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

/// Accepts on `listener` until `cancel`: at most `max_connections` open at once (further
/// ones wait in the kernel's backlog), `TCP_NODELAY`, and with `tls` a handshake per
/// connection in its own task. Failed handshakes are logged and dropped.
pub fn incoming(
    plane: &'static str,
    listener: TcpListener,
    tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
    max_connections: usize,
    cancel: CancellationToken,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        let mut full_logged = false;
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
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                let info = ConnInfo {
                    remote,
                    peer_cert: None,
                };
                let conn = Conn::new(Io::Plain(tcp), info, slot);
                if tx.send(conn).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
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
                        let info = ConnInfo { remote, peer_cert };
                        let conn = Conn::new(Io::Tls(Box::new(stream)), info, slot);
                        let _ = tx.send(conn).await;
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
