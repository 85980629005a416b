//! The streamed response body: upstream frames pass through unchanged while
//! they are hashed and scanned, a stall ends the stream with an SSE error
//! frame, and a hook fires exactly once at the end, whatever the end was.
//!
//! The hook fires *before* the frame that carries the terminal event is
//! handed to the client, so a client that asks for the signature right after
//! `[DONE]` always finds it; and the stream ends with that frame: anything an
//! upstream sends after its terminal event is not passed on, so the hash
//! covers exactly what the client received.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio::time::{Instant, Sleep};

use crate::sse::{after_blank_lines, error_frame, SseScan, DONE_AFTER_EVENT, DONE_EVENT};
use crate::upstream::client::body_error_kind;
use crate::usage_chunk::UsageStrip;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// Terminal event seen, or the upstream closed cleanly.
    Completed,
    /// No bytes within the idle deadline (or the first-byte deadline).
    IdleTimeout,
    /// The upstream connection failed mid-body.
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
    /// The upstream sent more than the configured bound.
    TooLarge,
}

impl EndCause {
    pub fn label(self) -> &'static str {
        match self {
            EndCause::Completed => "completed",
            EndCause::IdleTimeout => "idle_timeout",
            EndCause::UpstreamError => "upstream_error",
            EndCause::ClientGone => "client_disconnect",
            EndCause::TooLarge => "too_large",
        }
    }
}

pub struct End {
    pub cause: EndCause,
    /// SHA-256 of every byte the client was handed (unless not hashed:
    /// see `Observed::hashing`).
    pub response_sha256: Option<[u8; 32]>,
    pub bytes: u64,
    pub frames: u64,
    /// SSE events the upstream sent (streams only), for usage estimates.
    pub events: u64,
    pub scan: SseScan,
    /// When the first upstream chunk arrived, and when the stream ended
    /// (streams only; the end is when the last chunk was handled).
    pub first_chunk: Option<std::time::Instant>,
    pub last_chunk: Option<std::time::Instant>,
}

pub trait OnEnd: Send + 'static {
    fn on_end(self, end: End);
    /// The first upstream chunk arrived (the model has started answering).
    fn on_first_chunk(&mut self) {}
}

pub struct Observed<S, H: OnEnd> {
    upstream: S,
    /// Fires at the first-byte deadline, then every `idle`. A chunk only sets
    /// `active` (no clock read, no timer reset per chunk); a firing with no
    /// activity since the last one is a stall. So a stall is detected
    /// between `idle` and `2 * idle` after the last byte.
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with: while the task's waker is
    /// the same, a frame costs no timer work at all.
    timer_waker: Option<Waker>,
    active: bool,
    idle: Duration,
    /// An answer larger than this is cut with an error frame.
    max_bytes: u64,
    hasher: Option<Sha256>,
    scan: SseScan,
    bytes: u64,
    frames: u64,
    events: u64,
    first_chunk: Option<std::time::Instant>,
    hook: Option<H>,
    state: State,
    /// Leaves the usage event out of the hashed bytes, and out of what is
    /// passed on when `strip_passed` (see `with_usage_stripped`).
    strip: Option<UsageStrip>,
    strip_passed: bool,
}

enum State {
    Streaming,
    /// A final error frame to send, then the end.
    Failing(Bytes, EndCause),
    Finished,
}

impl<S, H: OnEnd> Observed<S, H> {
    /// `timer` is the request's one timer (it kept the deadline for the
    /// answer's headers); it now counts to the first byte, then the idle gaps.
    pub fn new(
        upstream: S,
        mut timer: Pin<Box<Sleep>>,
        first_byte: Duration,
        idle: Duration,
        hook: H,
    ) -> Self {
        timer.as_mut().reset(Instant::now() + first_byte);
        Observed {
            max_bytes: u64::MAX,
            upstream,
            timer,
            timer_waker: None,
            active: false,
            idle,
            hasher: Some(Sha256::new()),
            scan: SseScan::default(),
            bytes: 0,
            frames: 0,
            events: 0,
            first_chunk: None,
            hook: Some(hook),
            state: State::Streaming,
            strip: None,
            strip_passed: false,
        }
    }

    /// The client did not ask for the usage event the upstream was asked
    /// for: it is not hashed, and not passed on when `passed` (a sidecar
    /// answering a peer passes it on for the peer's accounting; the peer
    /// removes it, so the hash here still covers what the client gets).
    pub fn with_usage_stripped(mut self, passed: bool) -> Self {
        self.strip = Some(UsageStrip::default());
        self.strip_passed = passed;
        self
    }

    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// `false`: the bytes are not hashed (an answer nobody signs), and the
    /// end has no `response_sha256`.
    pub fn hashing(mut self, on: bool) -> Self {
        if !on {
            self.hasher = None;
        }
        self
    }

    fn fire(&mut self, cause: EndCause) {
        if let Some(hook) = self.hook.take() {
            hook.on_end(End {
                cause,
                response_sha256: self.hasher.take().map(|h| h.finalize().into()),
                bytes: self.bytes,
                frames: self.frames,
                events: self.events,
                scan: std::mem::take(&mut self.scan),
                first_chunk: self.first_chunk,
                last_chunk: self.first_chunk.map(|_| std::time::Instant::now()),
            });
        }
    }

    /// Counts, scans and hashes an upstream chunk; returns what to pass on
    /// (possibly nothing yet, while the usage filter holds a partial event).
    fn pass(&mut self, chunk: Bytes) -> Bytes {
        self.frames += 1;
        let ends = event_ends(&chunk);
        self.events += ends;
        if self.hook.is_none() {
            self.bytes += chunk.len() as u64;
            return chunk;
        }
        self.scan.feed_counted(&chunk, Some(ends));
        // What is passed on, and what is hashed when that differs (`None`:
        // the same bytes). Most chunks pass as they came: no copies and no
        // reference-count traffic.
        let filtered = self.strip.as_mut().and_then(|s| s.filter_ref(&chunk));
        let (hashed, passed) = match filtered {
            None => (None, chunk),
            Some(view) if self.strip_passed => (None, view),
            Some(view) => (Some(view), chunk),
        };
        let (hashed, passed) = if self.scan.done {
            (hashed.map(through_done), through_done(passed))
        } else {
            (hashed, passed)
        };
        self.bytes += passed.len() as u64;
        if let Some(h) = &mut self.hasher {
            h.update(hashed.as_deref().unwrap_or(&passed));
        }
        if self.scan.done {
            self.fire(EndCause::Completed);
        }
        passed
    }

    /// The upstream body ended: a partial event the usage filter held.
    fn finish(&mut self) -> Bytes {
        let Some(tail) = self.strip.as_mut().map(UsageStrip::finish) else {
            return Bytes::new();
        };
        // (After the end fired there is no hasher left.)
        if let Some(h) = &mut self.hasher {
            h.update(&tail);
        }
        if self.strip_passed {
            self.bytes += tail.len() as u64;
            tail
        } else {
            Bytes::new()
        }
    }
}

// Nothing in `Observed` is structurally pinned (the timer is boxed, the
// upstream Unpin), so it may move freely whatever the hook is.
impl<S: Unpin, H: OnEnd> Unpin for Observed<S, H> {}

impl<S, H: OnEnd> Stream for Observed<S, H>
where
    S: http_body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.state, State::Streaming) {
                State::Finished => {
                    this.state = State::Finished;
                    return Poll::Ready(None);
                }
                State::Failing(frame, cause) => {
                    let mut out = this.finish().to_vec();
                    out.extend_from_slice(&this.pass(frame));
                    this.fire(cause);
                    this.state = State::Finished;
                    return Poll::Ready(Some(Ok(out.into())));
                }
                State::Streaming => {}
            }
            // The upstream body's frames, read directly (no stream adapter);
            // trailers carry nothing to pass on.
            let polled = match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(chunk) => Poll::Ready(Some(Ok(chunk))),
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
            match polled {
                Poll::Ready(Some(Ok(chunk)))
                    if this.bytes + chunk.len() as u64 > this.max_bytes =>
                {
                    let msg = format!(
                        "upstream answer exceeds {} bytes; stream ended",
                        this.max_bytes
                    );
                    this.state =
                        State::Failing(error_frame(msg, "upstream_too_large"), EndCause::TooLarge);
                }
                Poll::Ready(Some(Ok(chunk))) => {
                    this.active = true;
                    if this.first_chunk.is_none() {
                        // From now on the deadline is the idle one.
                        let now = Instant::now();
                        this.first_chunk = Some(now.into_std());
                        this.timer.as_mut().reset(now + this.idle);
                        if let Some(hook) = this.hook.as_mut() {
                            hook.on_first_chunk();
                        }
                    }
                    let passed = this.pass(chunk);
                    if this.hook.is_none() {
                        // The terminal event passed: nothing after it is.
                        this.state = State::Finished;
                    } else if passed.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(passed)));
                }
                Poll::Ready(Some(Err(e))) => {
                    let msg = format!(
                        "upstream connection failed mid-stream: {}",
                        body_error_kind(&e)
                    );
                    this.state = State::Failing(
                        error_frame(msg, "upstream_disconnected"),
                        EndCause::UpstreamError,
                    );
                }
                Poll::Ready(None) => {
                    let tail = this.finish();
                    this.fire(EndCause::Completed);
                    this.state = State::Finished;
                    if tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(tail)));
                }
                Poll::Pending => {
                    if !this.timer.is_elapsed() {
                        let same = this.timer_waker.as_ref();
                        if same.is_some_and(|w| w.will_wake(cx.waker())) {
                            return Poll::Pending;
                        }
                        if this.timer.as_mut().poll(cx).is_pending() {
                            this.timer_waker = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                    }
                    // The timer fired: a reset re-arms it, and the next
                    // `Pending` registers this task again.
                    this.timer_waker = None;
                    if std::mem::take(&mut this.active) {
                        let next = Instant::now() + this.idle;
                        this.timer.as_mut().reset(next);
                        continue;
                    }
                    let msg = if this.frames == 0 {
                        "upstream sent no body in time; stream ended".to_owned()
                    } else {
                        format!(
                            "upstream sent nothing for over {} ms; stream ended",
                            this.idle.as_millis()
                        )
                    };
                    this.state =
                        State::Failing(error_frame(msg, "upstream_timeout"), EndCause::IdleTimeout);
                }
            }
        }
    }
}

/// Handed to the server as a body itself (no stream adapter per frame).
impl<S, H: OnEnd> http_body::Body for Observed<S, H>
where
    S: http_body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.poll_next(cx)
            .map(|item| item.map(|r| r.map(http_body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Finished)
    }
}

impl<S, H: OnEnd> Drop for Observed<S, H> {
    fn drop(&mut self) {
        self.fire(EndCause::ClientGone);
    }
}

/// How many events end in `chunk` (`\n\n`s): one newline search, where a
/// substring search cost three times as much per frame.
fn event_ends(chunk: &[u8]) -> u64 {
    let (mut n, mut from) = (0, 0);
    while let Some(i) = memchr::memchr(b'\n', &chunk[from..]) {
        let at = from + i;
        if chunk.get(at + 1) == Some(&b'\n') {
            n += 1;
            from = at + 2;
        } else {
            from = at + 1;
        }
    }
    n
}

/// `chunk` up to the end of its `[DONE]` event, if it holds one: what an
/// upstream sends after its terminal event is not passed on.
fn through_done(chunk: Bytes) -> Bytes {
    let lead = chunk.len() - after_blank_lines(&chunk).len();
    let end = if chunk[lead..].starts_with(DONE_EVENT) {
        Some(lead + DONE_EVENT.len())
    } else {
        // `\n\n` + `[DONE]` event: the event starts after the blank line.
        DONE_AFTER_EVENT
            .find(&chunk)
            .map(|i| i + 2 + DONE_EVENT.len())
    };
    match end {
        Some(end) if end < chunk.len() => chunk.slice(..end),
        _ => chunk,
    }
}

#[cfg(test)]
mod tests {
    use super::event_ends;

    #[test]
    fn counts_each_event_end_once() {
        assert_eq!(event_ends(b"data: {}\n\n"), 1);
        assert_eq!(event_ends(b"data: a\n\ndata: b\n\ndata: [DONE]\n\n"), 3);
        assert_eq!(event_ends(b"event: x\ndata: y\n"), 0);
        assert_eq!(event_ends(b"\n\n\n\n"), 2);
        assert_eq!(event_ends(b"\n\n\n"), 1);
        assert_eq!(event_ends(b""), 0);
    }
}
