//! The few Redis commands cluster-wide quotas need, over one connection
//! (TCP `host:port` or `unix:/path`), speaking RESP directly: one script,
//! run with EVAL, answering two integers. A failed or slow call drops the
//! connection; the next call reconnects.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// GCRA in Redis, on Redis's clock (so sidecars' clocks never disagree).
/// ARGV: unit cost in microseconds, burst in microseconds, cost (negative
/// gives back), force (1: charge even past the limit). Answers
/// `{1, 0}` taken, or `{0, wait_us}`.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local unit = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local nxt = tat + unit * cost
if cost > 0 and ARGV[4] ~= '1' and nxt > now + burst then
  return {0, nxt - now - burst}
end
if nxt < now then nxt = now end
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.floor((nxt - now + burst) / 1000) + 1000)
return {1, 0}
"#;

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

pub struct Redis {
    addr: String,
    conn: Mutex<Option<BufReader<Box<dyn Conn>>>>,
    timeout: Duration,
}

/// What the script said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gcra {
    Taken,
    Wait(Duration),
}

impl Redis {
    pub fn new(addr: impl Into<String>) -> Self {
        Redis {
            addr: addr.into(),
            conn: Mutex::new(None),
            timeout: Duration::from_millis(200),
        }
    }

    async fn connect(&self) -> io::Result<Box<dyn Conn>> {
        match self.addr.strip_prefix("unix:") {
            #[cfg(unix)]
            Some(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
            _ => Ok(Box::new(tokio::net::TcpStream::connect(&self.addr).await?)),
        }
    }

    /// Run the GCRA script on `key`.
    pub async fn gcra(
        &self,
        key: &str,
        unit_us: u64,
        burst_us: u64,
        cost: i64,
        force: bool,
    ) -> io::Result<Gcra> {
        let args = [
            "EVAL".to_owned(),
            GCRA.to_owned(),
            "1".to_owned(),
            key.to_owned(),
            unit_us.to_string(),
            burst_us.to_string(),
            cost.to_string(),
            if force { "1" } else { "0" }.to_owned(),
        ];
        let answer = tokio::time::timeout(self.timeout, self.call(&args))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "redis timed out"))
            .and_then(|r| r);
        if answer.is_err() {
            // Whatever state the connection is in, it is not trusted again.
            *self.conn.lock().await = None;
        }
        match answer?.as_slice() {
            [1, _] => Ok(Gcra::Taken),
            [0, wait] => Ok(Gcra::Wait(Duration::from_micros((*wait).max(0) as u64))),
            other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    async fn call(&self, args: &[String]) -> io::Result<Vec<i64>> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(BufReader::new(self.connect().await?));
        }
        let conn = guard
            .as_mut()
            .ok_or_else(|| io::Error::other("no connection"))?;
        conn.get_mut().write_all(&encode(args)).await?;
        read_int_array(conn).await
    }
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[String]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn read_line(conn: &mut BufReader<Box<dyn Conn>>) -> io::Result<String> {
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "redis closed"));
    }
    Ok(line.trim_end().to_owned())
}

/// An array of integers (`*2\r\n:1\r\n:0\r\n`); an error reply is an error.
async fn read_int_array(conn: &mut BufReader<Box<dyn Conn>>) -> io::Result<Vec<i64>> {
    let head = read_line(conn).await?;
    let bad = |what: &str| io::Error::other(format!("redis: {what}"));
    if let Some(err) = head.strip_prefix('-') {
        return Err(bad(err));
    }
    let n: usize = head
        .strip_prefix('*')
        .and_then(|n| n.parse().ok())
        .filter(|n| *n <= 16)
        .ok_or_else(|| bad("expected an array"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let item = read_line(conn).await?;
        out.push(
            item.strip_prefix(':')
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("expected an integer"))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        let got = encode(&["EVAL".into(), "return 1".into(), "0".into()]);
        assert_eq!(got, b"*3\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n$1\r\n0\r\n");
    }
}
