//! Peer frames: Dispatch streams over the peer plane's connection itself (TCP, or TLS
//! with the peer certificates) instead of an HTTP/2 stream, for the forwarding hop's
//! latency (see ARCHITECTURE.md, "Peer frames").
//!
//! A sender opens a connection to the peer port and writes [`MAGIC`], then a frame
//! holding its member id. The receiver answers with a `DispatchResponse` of id 0 as its
//! first frame: accepted when it carries no error (and its `max_in_flight`), refused
//! (and closed) when it does. Then each side writes frames: `DispatchRequest`s one way,
//! `DispatchResponse`s the other, each a 4-byte big-endian length and the protobuf
//! message. Id 0 is the connection's own: each side's writer sends a message of id 0
//! every [`PING_EVERY`] (a ping, not answered), and a request of id 0 with `cancel` set
//! is the sender's clean end. Either side that receives no byte for [`SILENCE`] closes
//! the connection, as the HTTP/2 keepalive does on the gRPC planes; a connection that
//! ends without the clean end is a broken one (the receiver drops the calls not
//! started, as for a reset HTTP/2 stream).

use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The first bytes of a peer-frames connection. As long as HTTP/2's preface (24 bytes,
/// "PRI * HTTP/2.0…"), so the receiver tells the two apart from the same read, and a
/// receiver that only speaks HTTP/2 refuses it at once instead of waiting for more.
pub(crate) const MAGIC: &[u8] = b"LEASEHOLD PEER FRAMES/1\n";
/// How often each side's writer pings the connection.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(1);
/// How long either side waits for a byte (or a write waits to make progress) before it
/// closes the connection.
pub(crate) const SILENCE: Duration = Duration::from_secs(3);
/// Frames written together at most (the writer takes what is queued up to this).
const WRITE_BATCH: usize = 64 * 1024;
/// A writer whose last write is more recent than this is busy: it lets the frames about
/// to be queued catch up with the next write.
const BUSY: Duration = Duration::from_micros(100);

/// A connection either side reads and writes frames on.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Reads frames; cancel safe (bytes read stay in its buffer), so it can lose a `select!`.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max: usize,
    /// When the last bytes arrived, and a tick every second to compare it with: one
    /// timer for the connection rather than one per read.
    last: Instant,
    ticks: tokio::time::Interval,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, max: usize) -> Self {
        let mut ticks = tokio::time::interval(PING_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            max,
            last: Instant::now(),
            ticks,
        }
    }

    /// The next frame's bytes; `None` when the connection ended between frames, an error
    /// of kind `TimedOut` when no byte arrived for [`SILENCE`] (a large frame arriving
    /// slowly is not silence).
    pub(crate) async fn next_bytes(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf, self.max)? {
                return Ok(Some(frame));
            }
            let read = tokio::select! {
                biased;
                r = self.io.read_buf(&mut self.buf) => Some(r?),
                _ = self.ticks.tick() => None,
            };
            match read {
                Some(0) if self.buf.is_empty() => return Ok(None),
                Some(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some(_) => self.last = Instant::now(),
                None if self.last.elapsed() >= SILENCE => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing received for {SILENCE:?}"),
                    ))
                }
                None => {}
            }
        }
    }

    /// Frames longer than `max` bytes are refused from now on.
    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The next frame as a message.
    pub(crate) async fn next<M: prost::Message + Default>(&mut self) -> io::Result<Option<M>> {
        match self.next_bytes().await? {
            Some(b) => M::decode(b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            None => Ok(None),
        }
    }
}

/// Takes a whole frame out of `buf` if it holds one.
fn take_frame(buf: &mut BytesMut, max: usize) -> io::Result<Option<Bytes>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {max}"),
        ));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends `m` as a frame.
pub(crate) fn put(buf: &mut BytesMut, m: &impl prost::Message) {
    let len = m.encoded_len();
    buf.reserve(4 + len);
    buf.put_u32(len as u32);
    m.encode(buf).expect("reserved");
}

/// Appends `bytes` as a frame.
pub(crate) fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
    buf.reserve(4 + bytes.len());
    buf.put_u32(bytes.len() as u32);
    buf.put_slice(bytes);
}

/// Writes what arrives on `rx` as frames (`encode` turns each into a message, or `None`
/// to skip it), taking whatever else is queued into the same write. With `ping`, writes
/// it every [`PING_EVERY`] as well. When `rx` ends, writes `last` (if any) and shuts the
/// connection's sending side.
pub(crate) async fn write_frames<W, T, M>(
    mut io: W,
    mut rx: mpsc::Receiver<T>,
    mut encode: impl FnMut(T) -> Option<M>,
    ping: Option<M>,
    last: Option<M>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    M: prost::Message,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut last_write = Instant::now() - BUSY;
    let mut ticks = tokio::time::interval(PING_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            item = rx.recv() => item,
            _ = ticks.tick(), if ping.is_some() => {
                put(&mut buf, ping.as_ref().expect("checked"));
                write_out(&mut io, &mut buf).await?;
                continue;
            }
        };
        let Some(item) = first else { break };
        if let Some(m) = encode(item) {
            put(&mut buf, &m);
        }
        take_queued(&mut rx, &mut encode, &mut buf);
        // Under load the next frames are a moment away, in tasks ready to run: give them
        // that moment (one turn of the scheduler) so that one write carries them too. A
        // write is a system call, and over loopback it also runs the receiving end's TCP;
        // at one per frame it was a sixth of an instance's time under a Kafka load. Only
        // when the last write was just now: the turn itself costs tens of microseconds
        // when the worker has nothing else to run, which a lone call should not pay.
        if buf.len() < WRITE_BATCH && last_write.elapsed() < BUSY {
            tokio::task::yield_now().await;
            take_queued(&mut rx, &mut encode, &mut buf);
        }
        if !buf.is_empty() {
            write_out(&mut io, &mut buf).await?;
            last_write = Instant::now();
        }
    }
    if let Some(m) = last {
        put(&mut buf, &m);
        write_out(&mut io, &mut buf).await?;
    }
    io.shutdown().await
}

/// Appends the frames queued now to `buf`, up to [`WRITE_BATCH`].
fn take_queued<T, M: prost::Message>(
    rx: &mut mpsc::Receiver<T>,
    encode: &mut impl FnMut(T) -> Option<M>,
    buf: &mut BytesMut,
) {
    while buf.len() < WRITE_BATCH {
        match rx.try_recv() {
            Ok(item) => {
                if let Some(m) = encode(item) {
                    put(buf, &m);
                }
            }
            Err(_) => break,
        }
    }
}

/// Writes all of `buf` and empties it; a write that makes no progress for [`SILENCE`]
/// fails (the other side stopped reading: gone, or cut off).
async fn write_out<W: AsyncWrite + Unpin>(io: &mut W, buf: &mut BytesMut) -> io::Result<()> {
    while !buf.is_empty() {
        let n = tokio::time::timeout(SILENCE, io.write(buf))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "the other side reads nothing")
            })??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf.advance(n);
    }
    tokio::time::timeout(SILENCE, io.flush())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the other side reads nothing"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_proto::v1 as pb;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn frames_written_in_batches_read_back_one_by_one_and_the_end_is_clean() {
        let (a, b) = tokio::io::duplex(64);
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_frames(
            a,
            rx,
            |id: u64| {
                Some(pb::DispatchRequest {
                    id,
                    timeout_ms: 7,
                    ..Default::default()
                })
            },
            None,
            Some(pb::DispatchRequest {
                id: 0,
                cancel: true,
                ..Default::default()
            }),
        ));
        for id in 1..=5 {
            tx.send(id).await.unwrap();
        }
        drop(tx);
        let mut reader = FrameReader::new(b, 1024);
        for id in 1..=5 {
            let m: pb::DispatchRequest = reader.next().await.unwrap().unwrap();
            assert_eq!((m.id, m.timeout_ms), (id, 7));
        }
        let end: pb::DispatchRequest = reader.next().await.unwrap().unwrap();
        assert!(end.id == 0 && end.cancel);
        assert!(reader
            .next::<pb::DispatchRequest>()
            .await
            .unwrap()
            .is_none());
        writer.await.unwrap().unwrap();
    }

    /// Counts the writes that reach the connection.
    struct Counted {
        inner: tokio::io::DuplexStream,
        writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            polled
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A busy writer (its last write just now: the clock is paused) waits one turn of the
    /// scheduler, so a frame queued by a task that runs meanwhile goes out in the same
    /// write; an idle writer (its last write `BUSY` ago) writes a lone frame at once.
    #[tokio::test(start_paused = true)]
    async fn a_busy_writer_takes_the_frames_queued_in_the_next_turn_into_one_write() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Counted {
            inner: a,
            writes: writes.clone(),
        };
        let (tx, rx) = mpsc::channel(16);
        let request = |id: u64| {
            Some(pb::DispatchRequest {
                id,
                ..Default::default()
            })
        };
        let writer = tokio::spawn(write_frames(counted, rx, request, None, None));
        let written = || writes.load(std::sync::atomic::Ordering::Relaxed);
        // The frames are read at the end: a reader's silence timer would let the paused
        // clock jump ahead while the tasks wait.
        async fn until(done: impl Fn() -> bool) {
            for _ in 0..10_000 {
                if done() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("the writer did not get there");
        }

        // Idle: the first frame is written alone.
        tx.send(1).await.unwrap();
        until(|| written() == 1).await;

        // Frame `first` wakes the writer, and the task that queues the next frame is
        // ready to run behind it.
        let two_frames = |first: u64| {
            let tx = tx.clone();
            tokio::spawn(async move {
                tx.send(first).await.unwrap();
                let next = tokio::spawn(async move { tx.send(first + 1).await.unwrap() });
                next.await.unwrap();
            })
        };
        // Busy (frame 1 was written just now): the task runs while the writer gives up
        // its turn, and frame 3 joins frame 2's write.
        two_frames(2).await.unwrap();
        until(|| written() == 2).await;
        // Idle again: frame 4 is written at once, frame 5 on its own after it.
        tokio::time::advance(BUSY).await;
        two_frames(4).await.unwrap();
        until(|| written() >= 3).await;
        drop(tx);
        writer.await.unwrap().unwrap();
        let mut reader = FrameReader::new(b, 1024);
        for id in 1..=5 {
            let m: pb::DispatchRequest = reader.next().await.unwrap().unwrap();
            assert_eq!(m.id, id);
        }
        assert_eq!(
            written(),
            4,
            "frames 2 and 3 in one write, 4 and 5 in one each"
        );
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_or_cut_short_is_an_error() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        put_bytes(&mut buf, &[1; 100]);
        a.write_all(&buf).await.unwrap();
        let mut reader = FrameReader::new(b, 99);
        let e = reader.next_bytes().await.unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");

        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&buf[..50]).await.unwrap();
        drop(a);
        let mut reader = FrameReader::new(b, 1024);
        let e = reader.next_bytes().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_reader_that_lost_a_select_keeps_the_bytes_it_read() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        put_bytes(&mut buf, b"hello");
        let mut reader = FrameReader::new(b, 1024);
        // Half a frame, then the read is dropped.
        a.write_all(&buf[..6]).await.unwrap();
        let lost = tokio::time::timeout(Duration::from_millis(20), reader.next_bytes()).await;
        assert!(lost.is_err());
        a.write_all(&buf[6..]).await.unwrap();
        assert_eq!(reader.next_bytes().await.unwrap().unwrap(), &b"hello"[..]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_silent_for_the_silence_limit_fails_and_one_that_pings_does_not() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut reader = FrameReader::new(b, 1024);
        let pinger = tokio::spawn(async move {
            let mut ping = BytesMut::new();
            put(&mut ping, &pb::DispatchRequest::default());
            for _ in 0..5 {
                a.write_all(&ping).await.unwrap();
                tokio::time::sleep(PING_EVERY).await;
            }
            // Then silence, the connection still open.
            a
        });
        for _ in 0..5 {
            let ping: pb::DispatchRequest = reader.next().await.unwrap().unwrap();
            assert_eq!(ping.id, 0);
        }
        let started = tokio::time::Instant::now();
        let e = reader.next::<pb::DispatchRequest>().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= SILENCE - PING_EVERY && waited <= SILENCE + PING_EVERY,
            "{waited:?}"
        );
        drop(pinger.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_arriving_slowly_is_not_silence() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut frame = BytesMut::new();
        put_bytes(&mut frame, &[7; 100]);
        let writer = tokio::spawn(async move {
            // 104 bytes over about 10 s, a chunk a second.
            for chunk in frame.chunks(10) {
                a.write_all(chunk).await.unwrap();
                tokio::time::sleep(PING_EVERY).await;
            }
            a
        });
        let mut reader = FrameReader::new(b, 1024);
        let got = reader.next_bytes().await.unwrap().unwrap();
        assert_eq!(got.len(), 100);
        drop(writer.await.unwrap());
    }
}
