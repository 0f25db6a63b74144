//! Request and response bodies of the fault layer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use grpc_resilience_core::BoxError;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep};
use tonic::{Code, Status};

use crate::ResetStream;
use crate::fault::{HeaderEdit, ResetReason, apply_edits};
use crate::stats::{Call, CallGuard};

pin_project! {
    /// The request body the handler reads: counts its bytes and digests
    /// them into the call's record.
    #[derive(Debug)]
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        call: Arc<Call>,
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn new(inner: B, call: Arc<Call>) -> Self {
        RequestBody { inner, call }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            this.call.received(data);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts gRPC messages (5-byte prefix: flag and big-endian length) across
/// data frames.
#[derive(Debug)]
struct MessageCounter {
    left: usize,
    prefix: [u8; 5],
    prefix_len: usize,
    payload_left: u64,
}

impl MessageCounter {
    /// Scans `data`; returns the offset just past the message that brings
    /// the count to zero, if it is in `data`.
    fn scan(&mut self, data: &[u8]) -> Option<usize> {
        let mut pos = 0;
        while pos < data.len() {
            if self.payload_left > 0 {
                let take = self.payload_left.min((data.len() - pos) as u64);
                pos += take as usize;
                self.payload_left -= take;
                if self.payload_left == 0 && self.complete() {
                    return Some(pos);
                }
                continue;
            }
            let take = (5 - self.prefix_len).min(data.len() - pos);
            self.prefix[self.prefix_len..self.prefix_len + take]
                .copy_from_slice(&data[pos..pos + take]);
            self.prefix_len += take;
            pos += take;
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                self.payload_left = u64::from(len);
                if self.payload_left == 0 && self.complete() {
                    return Some(pos);
                }
            }
        }
        None
    }

    fn complete(&mut self) -> bool {
        self.left = self.left.saturating_sub(1);
        self.left == 0
    }
}

#[derive(Debug)]
enum Mode {
    Pass,
    Truncate {
        counter: MessageCounter,
        // What ends the cut stream, taken when sent.
        end: Option<End>,
    },
    Slow {
        gap: Duration,
        sent_data: bool,
    },
}

/// How a cut response stream ends.
#[derive(Debug)]
pub(crate) enum End {
    /// With these trailers.
    Trailers(HeaderMap),
    /// With a reset of the stream.
    Reset(ResetReason),
}

/// Trailers (or Trailers-Only headers) carrying `code` and `message`, with
/// a fault's raw edits applied.
pub(crate) fn status_headers(code: Code, message: &str, edits: &[HeaderEdit]) -> HeaderMap {
    let (mut parts, ()) = Status::new(code, message).into_http::<()>().into_parts();
    parts.headers.remove(http::header::CONTENT_TYPE);
    apply_edits(edits, &mut parts.headers);
    parts.headers
}

pin_project! {
    /// The response body of the fault layer: the handler's body, cut
    /// short or slowed down as the fault says, or empty for a synthesized
    /// Trailers-Only response.
    #[derive(Debug)]
    pub struct FaultBody<B> {
        #[pin]
        inner: Option<B>,
        #[pin]
        sleep: Option<Sleep>,
        mode: Mode,
        guard: Option<CallGuard>,
    }
}

impl<B> FaultBody<B> {
    pub(crate) fn empty() -> Self {
        FaultBody {
            inner: None,
            sleep: None,
            mode: Mode::Pass,
            guard: None,
        }
    }

    pub(crate) fn pass(inner: B, guard: CallGuard) -> Self {
        Self::with_mode(inner, guard, Mode::Pass)
    }

    /// Lets `messages` response messages through, then ends with `end`.
    pub(crate) fn truncate(inner: B, guard: CallGuard, messages: usize, end: End) -> Self {
        let counter = MessageCounter {
            left: messages,
            prefix: [0; 5],
            prefix_len: 0,
            payload_left: 0,
        };
        let mode = Mode::Truncate {
            counter,
            end: Some(end),
        };
        let mut body = Self::with_mode(inner, guard, mode);
        if messages == 0 {
            body.inner = None;
        }
        body
    }

    pub(crate) fn slow(inner: B, guard: CallGuard, gap: Duration) -> Self {
        Self::with_mode(
            inner,
            guard,
            Mode::Slow {
                gap,
                sent_data: false,
            },
        )
    }

    fn with_mode(inner: B, guard: CallGuard, mode: Mode) -> Self {
        FaultBody {
            inner: Some(inner),
            sleep: None,
            mode,
            guard: Some(guard),
        }
    }
}

impl<B> Body for FaultBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
            ready!(sleep.poll(cx));
            this.sleep.set(None);
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            // The handler's body is done or cut: send the injected end, if
            // any, once.
            if let Mode::Truncate { end, .. } = this.mode
                && let Some(end) = end.take()
            {
                finish(this.guard);
                return Poll::Ready(Some(match end {
                    End::Trailers(trailers) => Ok(Frame::trailers(trailers)),
                    // hyper resets the stream with the h2 reason it finds in
                    // a body error's source chain.
                    End::Reset(reason) => Err(ResetStream::new(reason).into()),
                }));
            }
            finish(this.guard);
            return Poll::Ready(None);
        };
        let frame = match ready!(inner.poll_frame(cx)) {
            None => {
                finish(this.guard);
                return Poll::Ready(None);
            }
            Some(Err(err)) => {
                finish(this.guard);
                return Poll::Ready(Some(Err(err.into())));
            }
            Some(Ok(frame)) => frame,
        };
        if frame.is_trailers() {
            finish(this.guard);
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.mode {
            Mode::Pass => Poll::Ready(Some(Ok(frame))),
            Mode::Slow { gap, sent_data } => {
                if frame.is_data() {
                    *sent_data = true;
                    this.sleep.set(Some(sleep(*gap)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Mode::Truncate { counter, .. } => {
                let Ok(mut data) = frame.into_data() else {
                    return Poll::Ready(None);
                };
                if let Some(cut) = counter.scan(data.chunk()) {
                    data.truncate(cut);
                    // Dropping the handler's body ends its stream.
                    this.inner.set(None);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let trailers_due = matches!(&self.mode, Mode::Truncate { end: Some(_), .. });
        !trailers_due && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.mode) {
            (Some(inner), Mode::Pass | Mode::Slow { .. }) => inner.size_hint(),
            (None, Mode::Pass) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

fn finish(guard: &mut Option<CallGuard>) {
    if let Some(mut guard) = guard.take() {
        guard.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn counter(n: usize) -> MessageCounter {
        MessageCounter {
            left: n,
            prefix: [0; 5],
            prefix_len: 0,
            payload_left: 0,
        }
    }

    #[test]
    fn counts_messages_across_and_within_frames() {
        let mut stream = message(b"one");
        stream.extend(message(b""));
        stream.extend(message(b"three!"));
        // Every split point, byte by byte: the cut is right after message 2.
        let cut_after_two = message(b"one").len() + message(b"").len();
        for split in 0..stream.len() {
            let mut c = counter(2);
            let (a, b) = stream.split_at(split);
            let found = c.scan(a).or_else(|| c.scan(b).map(|p| p + a.len()));
            assert_eq!(found, Some(cut_after_two), "split at {split}");
        }
        let mut c = counter(4);
        assert_eq!(c.scan(&stream), None);
    }
}
