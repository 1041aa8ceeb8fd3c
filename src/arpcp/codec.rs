//! Framing: one message per line, `\n` or `\r\n`, with a hard cap on line length so a
//! peer cannot make a receiver buffer more than the cap. Empty lines are skipped.
//! The read buffers of many connections can also share one byte budget
//! (`InputBudget`), so that many peers each holding an unfinished line below the cap
//! cannot add up to more memory than the daemon means to give them.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use serde::Serialize;
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

use super::UNCHARGED_READ_BUFFER;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("line is longer than the limit of {limit} bytes")]
    LineTooLong { limit: usize },
    #[error(
        "unfinished lines buffered over all connections would exceed {name} = {limit} bytes; \
         this connection holds {held} bytes without a line end"
    )]
    BudgetExceeded {
        name: &'static str,
        limit: usize,
        held: usize,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Bytes of read buffers shared by many connections, up to a limit. Each
/// connection's codec charges what its buffer holds beyond `UNCHARGED_READ_BUFFER`
/// and gives it back when the buffer shrinks or the connection closes.
#[derive(Debug)]
pub struct InputBudget {
    /// The constant the limit comes from, so a refusal names it.
    name: &'static str,
    limit: usize,
    used: AtomicUsize,
}

impl InputBudget {
    pub fn new(name: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(InputBudget {
            name,
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_charge(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        // Never below zero, whatever a caller's bookkeeping: a wrap would block everyone.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

/// What a fresh read buffer holds (`Framed`'s own starting size).
const INITIAL_READ_BUFFER: usize = 8 * 1024;

/// Read buffers larger than `UNCHARGED_READ_BUFFER` let go of so far, process-wide.
static LARGE_BUFFERS_FREED: AtomicU64 = AtomicU64::new(0);

/// For a runtime's `on_thread_park`: if large read buffers were let go of since this
/// thread last looked, has mimalloc (the daemons' allocator) hand this thread's free
/// pages back to the OS. mimalloc keeps a block freed on another thread on its
/// owner's list until the owner collects, and a worker that goes idle never does:
/// without this, memory of a burst of large lines stayed resident after the
/// connections had closed. Costs nothing while no large buffer is freed.
pub fn release_freed_buffers() {
    thread_local!(static SEEN: Cell<u64> = const { Cell::new(0) });
    let freed = LARGE_BUFFERS_FREED.load(Ordering::Relaxed);
    if SEEN.get() != freed {
        SEEN.set(freed);
        // SAFETY: mi_collect only walks the calling thread's own heap and mimalloc's
        // arenas, with mimalloc's own locking; it takes no pointers from us.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

/// Splits a byte stream into lines of at most `max_len` bytes (terminator excluded).
#[derive(Debug)]
pub struct LineCodec {
    max_len: usize,
    /// Bytes already searched for `\n`, so a slow sender does not make us rescan.
    scanned: usize,
    budget: Option<Arc<InputBudget>>,
    /// Bytes this codec has charged to `budget`.
    charged: usize,
    /// The buffer grew past `UNCHARGED_READ_BUFFER`: once the lines in it are
    /// consumed it is replaced by a small one, so its memory goes back.
    oversized: bool,
}

impl LineCodec {
    pub fn new(max_len: usize) -> Self {
        LineCodec {
            max_len,
            scanned: 0,
            budget: None,
            charged: 0,
            oversized: false,
        }
    }

    /// A codec whose buffer is charged to `budget`: when the partial line it holds
    /// does not fit, decoding fails with `CodecError::BudgetExceeded`.
    pub fn with_budget(max_len: usize, budget: Arc<InputBudget>) -> Self {
        LineCodec {
            budget: Some(budget),
            ..LineCodec::new(max_len)
        }
    }

    /// Called when `buf` holds no complete line: gives a large buffer's memory back
    /// if what is left is small, and charges what it holds to the budget.
    fn fit(&mut self, buf: &mut BytesMut) -> Result<(), CodecError> {
        if self.oversized && buf.len() <= UNCHARGED_READ_BUFFER / 2 {
            // Lines split off earlier share the old allocation; it is freed when
            // they are dropped, since the buffer no longer points into it.
            let mut fresh = BytesMut::with_capacity(INITIAL_READ_BUFFER.max(buf.len()));
            fresh.extend_from_slice(buf);
            *buf = fresh;
            self.oversized = false;
            LARGE_BUFFERS_FREED.fetch_add(1, Ordering::Relaxed);
        }
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let want = if self.oversized { buf.capacity() } else { 0 };
        if want > self.charged {
            if !budget.try_charge(want - self.charged) {
                return Err(CodecError::BudgetExceeded {
                    name: budget.name,
                    limit: budget.limit,
                    held: buf.len(),
                });
            }
        } else {
            budget.release(self.charged - want);
        }
        self.charged = want;
        Ok(())
    }
}

impl Drop for LineCodec {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.charged);
        }
        // The buffer goes with the codec (both belong to one `Framed`).
        if self.oversized {
            LARGE_BUFFERS_FREED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn trim_cr(mut line: BytesMut) -> BytesMut {
    if line.last() == Some(&b'\r') {
        line.truncate(line.len() - 1);
    }
    line
}

impl Decoder for LineCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        self.oversized |= buf.capacity() > UNCHARGED_READ_BUFFER;
        loop {
            let Some(pos) = buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = buf.len();
                // `\r` of a `\r\n` may be in the buffer while `\n` is not yet: allow one byte.
                if buf.len() > self.max_len + 1 {
                    return Err(CodecError::LineTooLong {
                        limit: self.max_len,
                    });
                }
                self.fit(buf)?;
                return Ok(None);
            };
            let end = self.scanned + pos;
            self.scanned = 0;
            let line = trim_cr(buf.split_to(end));
            buf.advance(1);
            if line.len() > self.max_len {
                return Err(CodecError::LineTooLong {
                    limit: self.max_len,
                });
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(line));
        }
    }

    /// A peer that writes its last message without a terminator and closes still counts.
    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        self.scanned = 0;
        let rest = trim_cr(buf.split());
        if rest.iter().all(u8::is_ascii_whitespace) {
            Ok(None)
        } else {
            Ok(Some(rest))
        }
    }
}

impl<T: Serialize> Encoder<&T> for LineCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        use bytes::BufMut;
        let mut w = dst.writer();
        serde_json::to_writer(&mut w, msg).map_err(std::io::Error::from)?;
        w.into_inner().extend_from_slice(b"\r\n");
        Ok(())
    }
}

/// A line already encoded, terminator included.
impl Encoder<bytes::Bytes> for LineCodec {
    type Error = CodecError;

    fn encode(&mut self, line: bytes::Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&line);
        Ok(())
    }
}

impl Encoder<super::Response> for LineCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: super::Response, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, String>> {
        let mut c = LineCodec::new(max);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match c.decode_eof(&mut buf) {
                Ok(Some(l)) => out.push(Ok(l.to_vec())),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn splits_on_lf_and_crlf_and_skips_blank_lines() {
        let got = lines(b"a\r\n\r\nb\n\n  \nc", 10);
        let want: Vec<Result<Vec<u8>, String>> =
            vec![Ok(b"a".to_vec()), Ok(b"b".to_vec()), Ok(b"c".to_vec())];
        assert_eq!(got, want);
    }

    #[test]
    fn over_long_line_is_an_error_even_without_terminator() {
        let mut c = LineCodec::new(4);
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(CodecError::LineTooLong { limit: 4 })
        ));
        assert_eq!(lines(b"abcde\n", 4).len(), 1);
        assert!(lines(b"abcde\n", 4)[0].is_err());
        assert_eq!(lines(b"abcd\r\n", 4), vec![Ok(b"abcd".to_vec())]);
    }

    #[test]
    fn partial_lines_wait_for_more() {
        let mut c = LineCodec::new(100);
        let mut buf = BytesMut::from(&b"{\"a\":"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"1}\nrest");
        assert_eq!(&c.decode(&mut buf).unwrap().unwrap()[..], b"{\"a\":1}");
        assert!(c.decode(&mut buf).unwrap().is_none());
    }

    /// Feeds `data` into `buf` the way `Framed` does: grow, read, decode.
    fn feed(c: &mut LineCodec, buf: &mut BytesMut, data: &[u8]) -> Result<Vec<BytesMut>, String> {
        buf.reserve(data.len());
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            match c.decode(buf) {
                Ok(Some(l)) => out.push(l),
                Ok(None) => return Ok(out),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    #[test]
    fn partial_lines_share_one_budget_and_give_it_back() {
        let budget = InputBudget::new("TEST_BUDGET", 300 * 1024);
        let big = vec![b'x'; 100 * 1024];
        let mut first = LineCodec::with_budget(1024 * 1024, budget.clone());
        let mut buf1 = BytesMut::new();
        feed(&mut first, &mut buf1, &big).unwrap();
        assert!(budget.used() >= big.len(), "charged {}", budget.used());
        let mut second = LineCodec::with_budget(1024 * 1024, budget.clone());
        let mut buf2 = BytesMut::new();
        let e = feed(
            &mut second,
            &mut buf2,
            &[&big[..], &big[..], &big[..]].concat(),
        )
        .unwrap_err();
        assert!(e.contains("TEST_BUDGET = 307200"), "{e}");
        assert!(e.contains("307200 bytes without a line end"), "{e}");
        // Small lines never count, even with the budget spent.
        let mut small = LineCodec::with_budget(1024 * 1024, budget.clone());
        let mut buf3 = BytesMut::new();
        let got = feed(
            &mut small,
            &mut buf3,
            &[&vec![b'y'; 20 * 1024][..], b"\n"].concat(),
        );
        assert_eq!(got.unwrap().len(), 1);
        // Once its line ends, the large buffer is replaced and its charge returned.
        let charged = budget.used();
        let lines = feed(&mut first, &mut buf1, b"\nnext").unwrap();
        assert_eq!(lines.len(), 1);
        assert!(
            buf1.capacity() <= UNCHARGED_READ_BUFFER,
            "{}",
            buf1.capacity()
        );
        assert_eq!(&buf1[..], b"next");
        assert!(
            budget.used() < charged,
            "{} then {}",
            charged,
            budget.used()
        );
        drop((first, second, small));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn encodes_one_line_with_crlf() {
        let mut c = LineCodec::new(100);
        let mut dst = BytesMut::new();
        c.encode(&serde_json::json!({"k": "a\nb"}), &mut dst)
            .unwrap();
        assert_eq!(&dst[..], b"{\"k\":\"a\\nb\"}\r\n");
    }
}
