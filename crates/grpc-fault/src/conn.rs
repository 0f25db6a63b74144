//! Connections that a fault can close.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};
use tonic::transport::server::Connected;

#[derive(Debug, Default)]
struct Switch {
    closed: AtomicBool,
    // The waker of the pending read, woken on close.
    reader: Mutex<Option<Waker>>,
}

/// A handle to one accepted connection, found in each request's
/// extensions; [`ConnectionHandle::close`] drops the connection.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    switch: Arc<Switch>,
    remote_addr: Option<SocketAddr>,
}

impl ConnectionHandle {
    /// Closes the connection: its reads end and its writes fail, so the
    /// HTTP/2 connection and every stream on it die at once, as when a
    /// server process or a network path goes away.
    pub fn close(&self) {
        self.switch.closed.store(true, Ordering::Release);
        let reader = self
            .switch
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = reader {
            waker.wake();
        }
    }

    /// Whether [`ConnectionHandle::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.switch.closed.load(Ordering::Acquire)
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    fn park(&self, cx: &Context<'_>) {
        let mut reader = self
            .switch
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &mut *reader {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
    }
}

/// A connection whose [`ConnectionHandle`] can close it.
#[derive(Debug)]
pub struct FaultyIo<IO> {
    io: IO,
    handle: ConnectionHandle,
}

impl FaultyIo<TcpStream> {
    /// Wraps an accepted TCP connection.
    pub fn new(io: TcpStream) -> Self {
        let remote_addr = io.peer_addr().ok();
        FaultyIo {
            io,
            handle: ConnectionHandle {
                switch: Arc::default(),
                remote_addr,
            },
        }
    }
}

impl<IO> FaultyIo<IO> {
    /// The handle that closes this connection.
    pub fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }

    fn closed_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection closed by an injected fault",
        )
    }
}

impl<IO> Connected for FaultyIo<IO> {
    type ConnectInfo = ConnectionHandle;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.handle.clone()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FaultyIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.handle.is_closed() {
            return Poll::Ready(Err(Self::closed_error()));
        }
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if poll.is_pending() {
            self.handle.park(cx);
            if self.handle.is_closed() {
                return Poll::Ready(Err(Self::closed_error()));
            }
        }
        poll
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FaultyIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.handle.is_closed() {
            return Poll::Ready(Err(Self::closed_error()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.handle.is_closed() {
            return Poll::Ready(Err(Self::closed_error()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connections a listener accepts, each wrapped so that
/// [`Fault::drop_connection`](crate::Fault::drop_connection) can close it.
/// Pass it to tonic's `Server::serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<FaultyIo<TcpStream>>> + Send + 'static {
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        // gRPC wants small writes out at once.
        conn.set_nodelay(true)?;
        Ok(FaultyIo::new(conn))
    })
}
