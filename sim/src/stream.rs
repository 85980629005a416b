//! Answer bodies, and the faults that strike them mid-body.
//!
//! Streamed answers: the events before the first token and after the last
//! are formatted once per answer; a token's event is assembled from
//! pre-formatted pieces (one allocation, no JSON work). Events are paced by
//! the inter-token delay, each its own body frame, with the mid-stream
//! faults applied. The body owns the request's `Active` guard, so a client
//! that hangs up mid-stream shows in the stats.

use std::fmt::Write;
use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::{stream, StreamExt};
use tokio::time::{interval_at, Instant, Interval};

use super::{Active, Fault};

/// The last event of chat and text completion streams, byte for byte.
pub(super) const DONE: &[u8] = b"data: [DONE]\n\n";
const MALFORMED: &[u8] = b"data: {not json\n\n";

/// Appends the text of completion token `i`.
pub(super) fn write_token(out: &mut impl Write, i: usize) {
    let _ = write!(out, "tok{i} ");
}

/// The whole completion text of `n` tokens.
pub(super) fn text(n: usize) -> String {
    let mut s = String::with_capacity(n * 8);
    (0..n).for_each(|i| write_token(&mut s, i));
    s
}

/// Every event of one streamed answer.
pub(super) struct Script {
    /// Sent at once, before the first token.
    pub lead: Vec<Bytes>,
    pub tokens: usize,
    pub frame: TokenFrame,
    /// Sent at once, after the last token.
    pub tail: Vec<Bytes>,
}

/// Token `i`'s event is `before`, its text, then `after` (`last_after` for
/// the last token, which carries the finish reason). The Responses API
/// numbers its events: there `seq.0 + i` and `seq.1` follow.
pub(super) struct TokenFrame {
    pub before: String,
    pub after: String,
    pub last_after: String,
    pub seq: Option<(usize, String)>,
}

impl TokenFrame {
    pub fn event(&self, i: usize, last: bool) -> Bytes {
        let after = if last { &self.last_after } else { &self.after };
        let mut b = BytesMut::with_capacity(self.before.len() + after.len() + 48);
        b.extend_from_slice(self.before.as_bytes());
        write_token(&mut b, i);
        b.extend_from_slice(after.as_bytes());
        if let Some((first, rest)) = &self.seq {
            let _ = write!(b, "{}", first + i);
            b.extend_from_slice(rest.as_bytes());
        }
        b.freeze()
    }

    /// A last event without text, for an answer of zero tokens.
    pub fn empty_last(&self) -> Bytes {
        Bytes::from([self.before.as_str(), &self.last_after].concat())
    }
}

/// A `text/event-stream` response playing `script`.
pub(super) fn sse(
    script: Script,
    delay: Duration,
    fault: Option<Fault>,
    active: Active,
) -> Response {
    let cut = match fault {
        Some(f @ (Fault::StallAfter(n) | Fault::DropAfter(n) | Fault::MalformedAfter(n))) => {
            Some((script.lead.len() + n.min(script.tokens), f))
        }
        _ => None,
    };
    let pace = Pace {
        script,
        next: 0,
        delay,
        ticks: None,
        cut,
        active,
    };
    let mut resp = Response::new(Body::from_stream(stream::unfold(Some(pace), step)));
    // What Starlette's StreamingResponse sends for vLLM.
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp
}

struct Pace {
    script: Script,
    /// Index of the next event.
    next: usize,
    delay: Duration,
    ticks: Option<Interval>,
    /// Where a mid-stream fault strikes (before that event), and which.
    cut: Option<(usize, Fault)>,
    active: Active,
}

impl Pace {
    /// Waits for the next token's turn: on a fixed-rate schedule rather than
    /// a sleep per token, so the timer's 1 ms granularity does not stretch a
    /// 1 ms/token stream to 2 ms/token.
    async fn pace(&mut self) {
        if self.delay.is_zero() {
            return;
        }
        let delay = self.delay;
        self.ticks
            .get_or_insert_with(|| interval_at(Instant::now() + delay, delay))
            .tick()
            .await;
    }
}

/// The next body frame. The state is dropped when the stream ends: counted
/// completed after the last event, cancelled after a drop fault (or when
/// hyper drops the body because the client went away).
async fn step(pace: Option<Pace>) -> Option<(io::Result<Bytes>, Option<Pace>)> {
    let mut p = pace?;
    if let Some((_, fault)) = p.cut.filter(|(at, _)| *at == p.next) {
        p.cut = None;
        match fault {
            Fault::StallAfter(_) => std::future::pending::<()>().await,
            Fault::DropAfter(_) => {
                // hyper discards what it has not written yet when a body
                // fails: one turn lets it flush the tokens already produced.
                tokio::task::yield_now().await;
                // The error makes hyper close the connection without the
                // chunked terminator: to the client, a cut connection.
                return Some((Err(io::Error::other("vllm-sim: drop-after fault")), None));
            }
            _ => return Some((Ok(Bytes::from_static(MALFORMED)), Some(p))),
        }
    }
    let (lead, tokens, i) = (p.script.lead.len(), p.script.tokens, p.next);
    let event = if i < lead {
        p.script.lead[i].clone()
    } else if i < lead + tokens {
        p.pace().await;
        p.script.frame.event(i - lead, i + 1 == lead + tokens)
    } else if let Some(event) = p.script.tail.get(i - lead - tokens) {
        event.clone()
    } else {
        p.active.done = true;
        return None;
    };
    p.next += 1;
    Some((Ok(event), Some(p)))
}

/// A whole (non-streamed) JSON answer. The mid-stream faults mean here:
/// never answer, cut the body halfway, or send a body that is not JSON.
pub(super) async fn whole(json: Bytes, fault: Option<Fault>, active: Active) -> Response {
    let json_type = [(header::CONTENT_TYPE, "application/json")];
    let json = match fault {
        Some(Fault::StallAfter(_)) => std::future::pending().await,
        Some(Fault::DropAfter(_)) => {
            drop(active);
            let cut = async {
                tokio::task::yield_now().await;
                Err(io::Error::other("vllm-sim: drop-after fault"))
            };
            let body = stream::iter([Ok(json.slice(..json.len() / 2))]).chain(stream::once(cut));
            return (json_type, Body::from_stream(body)).into_response();
        }
        Some(Fault::MalformedAfter(_)) => Bytes::from_static(b"{not json"),
        _ => json,
    };
    active.finish();
    (json_type, json).into_response()
}
