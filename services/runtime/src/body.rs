//! Request bodies that fail when the client stops sending.
//!
//! A client may announce a gigabyte, send ten megabytes and fall silent; the
//! handler streaming it to a temporary file would then wait forever, holding
//! the file, its buffers and the connection. [`IdleTimeout`] turns that
//! silence into an error ([`BodyError::Idle`]) after a while, so the handler
//! stops the way it does when the client disconnects, and cleans up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// What handlers get as the request body: hyper's, with [`IdleTimeout`].
pub type RequestBody = IdleTimeout<Incoming>;

/// Why reading a request body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError<E> {
    /// Reading from the connection failed (the client went away, or sent
    /// something that is not HTTP).
    #[error("reading the request body: {0}")]
    Read(#[source] E),
    /// The client sent nothing for this long while the handler waited.
    #[error("the client sent no request body for {0:?}")]
    Idle(Duration),
}

/// A body that fails with [`BodyError::Idle`] when its handler has waited
/// `timeout` for the next frame. Only the handler's waiting counts: a
/// handler that is slow to ask for more (a busy disk) does not make the
/// client look idle.
pub struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    /// Made at the first wait: most requests (GET, PROPFIND) have no body,
    /// or one already buffered, and never need it.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The handler is waiting for a frame since `sleep` was last set.
    waiting: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, timeout: Duration) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            timeout,
            sleep: None,
            waiting: false,
        }
    }
}

impl<B: Body + Unpin> Body for IdleTimeout<B> {
    type Data = B::Data;
    type Error = BodyError<B::Error>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        // Every field is Unpin (the Sleep is boxed), so the body is too.
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::Read)));
        }
        let deadline = Instant::now() + this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.waiting {
            // A new wait starts now: the clock runs from here, not from
            // the last frame, which the handler may have taken long to write.
            this.waiting = true;
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(this.timeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::body::Bytes;
    use std::collections::VecDeque;

    /// A body whose frames arrive when the test says: `None` in the script
    /// is a pause (one `Pending`), a chunk is a frame.
    struct Scripted(VecDeque<Option<&'static str>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.pop_front() {
                None => Poll::Ready(None),
                Some(Some(s)) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(s.as_bytes())))))
                }
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_body_that_keeps_sending_is_read_whole() {
        let body = Scripted(VecDeque::from([
            Some("a"),
            None,
            Some("b"),
            None,
            None,
            Some("c"),
        ]));
        let got = IdleTimeout::new(body, Duration::from_secs(1))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&got[..], b"abc");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_silent_body_fails_with_idle_after_the_timeout() {
        let (_tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
        let mut t = IdleTimeout::new(body, Duration::from_secs(30));
        let start = Instant::now();
        let err = t.frame().await.unwrap().unwrap_err();
        assert!(
            matches!(err, BodyError::Idle(d) if d == Duration::from_secs(30)),
            "{err}"
        );
        // Paused time: the clock moved exactly as far as the timeout.
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn time_the_handler_spends_between_reads_does_not_count_as_idle() {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(4);
        let mut t = IdleTimeout::new(body, Duration::from_secs(10));
        tx.send_data(Bytes::from_static(b"1")).await.unwrap();
        assert!(t.frame().await.unwrap().is_ok());
        // The handler writes for longer than the timeout; the next frame is
        // already there when it asks again.
        tx.send_data(Bytes::from_static(b"2")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(t.frame().await.unwrap().is_ok());
        // And a fresh wait gets the whole timeout again.
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(9)).await;
            tx.send_data(Bytes::from_static(b"3")).await.unwrap();
            tx
        });
        assert!(t.frame().await.unwrap().is_ok());
        drop(sender.await.unwrap());
        assert!(t.frame().await.is_none());
    }
}
