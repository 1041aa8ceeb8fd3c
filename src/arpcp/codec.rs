//! Framing: one message per line, `\n` or `\r\n`, with a hard cap on line length so a
//! peer cannot make a receiver buffer more than the cap. Empty lines are skipped.

use bytes::{Buf, BytesMut};
use serde::Serialize;
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("line is longer than the limit of {limit} bytes")]
    LineTooLong { limit: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Splits a byte stream into lines of at most `max_len` bytes (terminator excluded).
#[derive(Debug, Clone)]
pub struct LineCodec {
    max_len: usize,
    /// Bytes already searched for `\n`, so a slow sender does not make us rescan.
    scanned: usize,
}

impl LineCodec {
    pub fn new(max_len: usize) -> Self {
        LineCodec {
            max_len,
            scanned: 0,
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
        loop {
            let Some(pos) = buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = buf.len();
                // `\r` of a `\r\n` may be in the buffer while `\n` is not yet: allow one byte.
                if buf.len() > self.max_len + 1 {
                    return Err(CodecError::LineTooLong {
                        limit: self.max_len,
                    });
                }
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

    #[test]
    fn encodes_one_line_with_crlf() {
        let mut c = LineCodec::new(100);
        let mut dst = BytesMut::new();
        c.encode(&serde_json::json!({"k": "a\nb"}), &mut dst)
            .unwrap();
        assert_eq!(&dst[..], b"{\"k\":\"a\\nb\"}\r\n");
    }
}
