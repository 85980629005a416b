//! hyper answers a request whose headers exceed the size cap with a bare
//! 431 of its own (no body, no hook to change it) and closes. This socket
//! wrapper swaps exactly that response for the same status with an OpenAI
//! error body, so every error a client gets has one shape.
//!
//! It recognises hyper's response by shape: status 431 with no headers but
//! `content-length: 0`, `date` and `connection: close`. Handlers never produce 431, and anything
//! an upstream sends carries more headers, so nothing else is touched. The
//! check looks at the first bytes of a write only, so the per-chunk cost on
//! streams is one comparison.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    pub struct HeaderLimitIo<T> {
        #[pin]
        inner: T,
        // The replacement response and how much of it is written.
        replacement: Option<(Vec<u8>, usize)>,
        limit: usize,
    }
}

impl<T> HeaderLimitIo<T> {
    pub fn new(inner: T, limit: usize) -> Self {
        HeaderLimitIo {
            inner,
            replacement: None,
            limit,
        }
    }
}

/// hyper's own 431 head: status line and only the headers hyper adds itself.
fn is_hypers_431(head: &[u8]) -> bool {
    let Some(rest) = head
        .strip_prefix(b"HTTP/1.1 431 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 431 "))
    else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return false;
    };
    let Some((head, "")) = text.split_once("\r\n\r\n") else {
        return false;
    };
    // What hyper adds to an automatic response: the length, the date, and
    // `connection: close` as it closes after a parse error.
    head.split("\r\n").skip(1).all(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        match name.to_ascii_lowercase().as_str() {
            "content-length" => value.trim() == "0",
            "date" => true,
            "connection" => value.trim().eq_ignore_ascii_case("close"),
            _ => false,
        }
    })
}

fn response(limit: usize) -> Vec<u8> {
    let body = crate::error::error_json(
        format!("Request headers are larger than the limit of {limit} bytes."),
        "invalid_request_error",
        "request_header_fields_too_large",
    );
    let mut out = format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl<T: AsyncWrite> HeaderLimitIo<T> {
    /// Write the replacement out; report hyper's bytes as written.
    fn poll_replacement(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        claimed: usize,
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        let Some((bytes, written)) = this.replacement.as_mut() else {
            return Poll::Ready(Ok(claimed));
        };
        while *written < bytes.len() {
            let n = ready!(this.inner.as_mut().poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(claimed))
    }
}

impl<T: AsyncWrite> AsyncWrite for HeaderLimitIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacement.is_none() && is_hypers_431(buf) {
            let limit = self.limit;
            *self.as_mut().project().replacement = Some((response(limit), 0));
        }
        if self.replacement.is_some() {
            // After its 431 hyper closes the connection; whatever it might
            // still write belongs to the response replaced.
            return self.poll_replacement(cx, buf.len());
        }
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty()).map(|b| &b[..]);
        if self.replacement.is_none() && first.is_some_and(is_hypers_431) {
            let limit = self.limit;
            *self.as_mut().project().replacement = Some((response(limit), 0));
        }
        if self.replacement.is_some() {
            let total = bufs.iter().map(|b| b.len()).sum();
            return self.poll_replacement(cx, total);
        }
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

impl<T: AsyncRead> AsyncRead for HeaderLimitIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_431_is_recognised() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 19:00:00 GMT\r\n\r\n";
        assert!(is_hypers_431(hyper));
        let closing = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert!(is_hypers_431(closing));
        // An upstream's 431 (or any other response) has more headers or a body.
        assert!(!is_hypers_431(b"HTTP/1.1 431 Too Large\r\ncontent-type: application/json\r\ncontent-length: 2\r\ndate: x\r\n\r\n{}"));
        assert!(!is_hypers_431(
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\n"
        ));
        assert!(!is_hypers_431(
            b"HTTP/1.1 431 X\r\ncontent-length: 5\r\ndate: x\r\n\r\n"
        ));
        assert!(!is_hypers_431(b"data: HTTP/1.1 431 "));
    }

    #[test]
    fn the_replacement_is_an_openai_error_body() {
        let out = String::from_utf8(response(65536)).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "request_header_fields_too_large");
        assert!(v["error"]["message"].as_str().unwrap().contains("65536"));
    }
}
