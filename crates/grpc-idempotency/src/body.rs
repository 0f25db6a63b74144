//! The request and response bodies the layer hands on.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The request body the wrapped service receives: the caller's own body
    /// for calls the layer passes through, or the bytes it read to hash the
    /// request.
    #[derive(Debug)]
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[derive(Debug)]
    #[project = RequestBodyProj]
    enum RequestKind<B> {
        Passthrough {
            #[pin]
            inner: B,
        },
        Buffered {
            data: Option<Bytes>,
        },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        RequestBody {
            kind: RequestKind::Passthrough { inner },
        }
    }

    pub(crate) fn buffered(data: Bytes) -> Self {
        RequestBody {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestBodyProj::Passthrough { inner } => inner.poll_frame(cx),
            RequestBodyProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Passthrough { inner } => inner.is_end_stream(),
            RequestKind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Passthrough { inner } => inner.size_hint(),
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

pin_project! {
    /// The response body the layer returns: the handler's own body, a
    /// recorded (or replayed) response, or the part of a response the layer
    /// read followed by the rest.
    pub struct ResponseBody<B: Body> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseBodyProj]
    enum ResponseKind<B: Body> {
        Passthrough {
            #[pin]
            inner: B,
        },
        Full {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        Prefixed {
            frames: VecDeque<Frame<Bytes>>,
            rest: Pin<Box<B>>,
        },
        Failed {
            frames: VecDeque<Frame<Bytes>>,
            error: Option<B::Error>,
        },
    }
}

impl<B: Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ResponseKind::Passthrough { .. } => "Passthrough",
            ResponseKind::Full { .. } => "Full",
            ResponseKind::Prefixed { .. } => "Prefixed",
            ResponseKind::Failed { .. } => "Failed",
        };
        f.debug_tuple("ResponseBody").field(&kind).finish()
    }
}

impl<B: Body> ResponseBody<B> {
    fn of(kind: ResponseKind<B>) -> Self {
        ResponseBody { kind }
    }

    pub(crate) fn passthrough(inner: B) -> Self {
        Self::of(ResponseKind::Passthrough { inner })
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self::of(ResponseKind::Full {
            data: (!data.is_empty()).then_some(data),
            trailers,
        })
    }

    pub(crate) fn empty() -> Self {
        Self::of(ResponseKind::Full {
            data: None,
            trailers: None,
        })
    }

    pub(crate) fn prefixed(frames: VecDeque<Frame<Bytes>>, rest: Pin<Box<B>>) -> Self {
        Self::of(ResponseKind::Prefixed { frames, rest })
    }

    pub(crate) fn failed(frames: VecDeque<Frame<Bytes>>, error: B::Error) -> Self {
        Self::of(ResponseKind::Failed {
            frames,
            error: Some(error),
        })
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseBodyProj::Passthrough { inner } => inner.poll_frame(cx),
            ResponseBodyProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ResponseBodyProj::Prefixed { frames, rest } => match frames.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => rest.as_mut().poll_frame(cx),
            },
            ResponseBodyProj::Failed { frames, error } => match frames.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => Poll::Ready(error.take().map(Err)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Passthrough { inner } => inner.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Prefixed { frames, rest } => frames.is_empty() && rest.is_end_stream(),
            ResponseKind::Failed { frames, error } => frames.is_empty() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Passthrough { inner } => inner.size_hint(),
            ResponseKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Prefixed { .. } | ResponseKind::Failed { .. } => SizeHint::default(),
        }
    }
}
