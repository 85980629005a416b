//! A request body sent as the slices it is made of: the client's bytes
//! around an edited model name (and the usage request) go out as they came,
//! written with one vectored write, never copied into a new buffer.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// At most two splices (model, usage) make five slices.
const MAX_PARTS: usize = 5;

#[derive(Debug, Default)]
pub struct Chunks {
    parts: [Bytes; MAX_PARTS],
    next: usize,
    remaining: u64,
}

impl Chunks {
    pub fn one(bytes: Bytes) -> Self {
        Chunks::from_parts([bytes])
    }

    /// Empty parts are dropped; parts beyond the fifth are joined into it
    /// (no caller makes more, but a bug must not lose bytes).
    pub fn from_parts(parts: impl IntoIterator<Item = Bytes>) -> Self {
        let mut out = Chunks::default();
        let mut n = 0;
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            out.remaining += part.len() as u64;
            if n < MAX_PARTS {
                out.parts[n] = part;
                n += 1;
            } else {
                let last = &mut out.parts[MAX_PARTS - 1];
                let mut joined = BytesMut::from(&last[..]);
                joined.extend_from_slice(&part);
                *last = joined.freeze();
            }
        }
        out
    }

    pub fn len(&self) -> u64 {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// The whole body in one buffer: the one part itself when there is
    /// only one (no copy).
    pub fn concat(self) -> Bytes {
        let parts = &self.parts[self.next..];
        match parts.iter().filter(|p| !p.is_empty()).count() {
            0 => Bytes::new(),
            1 => parts
                .iter()
                .find(|p| !p.is_empty())
                .cloned()
                .unwrap_or_default(),
            _ => {
                let mut out = BytesMut::with_capacity(self.remaining as usize);
                for p in parts {
                    out.extend_from_slice(p);
                }
                out.freeze()
            }
        }
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        while this.next < MAX_PARTS {
            let part = std::mem::take(&mut this.parts[this.next]);
            this.next += 1;
            if !part.is_empty() {
                this.remaining -= part.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn sends_every_part_in_order_with_an_exact_length() {
        let body = Chunks::from_parts([
            Bytes::from_static(b"{\"model\":"),
            Bytes::new(),
            Bytes::from_static(b"\"up\""),
            Bytes::from_static(b",\"x\":1}"),
        ]);
        assert_eq!(body.size_hint().exact(), Some(20));
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"{\"model\":\"up\",\"x\":1}".as_slice());
    }

    #[test]
    fn one_part_concatenates_without_a_copy() {
        let b = Bytes::from(vec![1u8; 64]);
        assert_eq!(Chunks::one(b.clone()).concat().as_ptr(), b.as_ptr());
    }

    #[test]
    fn more_parts_than_slots_lose_no_bytes() {
        let parts = (0..8u8).map(|i| Bytes::from(vec![b'a' + i]));
        let body = Chunks::from_parts(parts);
        assert_eq!(body.len(), 8);
        assert_eq!(&body.concat()[..], b"abcdefgh".as_slice());
    }
}
