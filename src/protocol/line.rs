//! CRLF line framing with a length bound that never buffers more than the bound.
//!
//! A line longer than the bound is reported once as [`Frame::TooLong`]; its bytes are dropped as they arrive
//! until the next LF, where framing resynchronises. A bare LF also ends a line (clients in the wild send it).

use bytes::{Buf, BytesMut};

/// One framing result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its CRLF (or LF).
    Line(Vec<u8>),
    /// A line exceeded the bound; its bytes are being discarded.
    TooLong,
}

/// Splits a byte stream into bounded lines. Holds only the "discarding an over-long line" state;
/// the bytes live in the caller's buffer.
#[derive(Debug, Clone, Default)]
pub struct LineFramer {
    discarding: bool,
}

impl LineFramer {
    /// A framer at the start of a line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next frame from `buf`, or `None` when more bytes are needed.
    /// `max` counts the line terminator too (RFC 2449 counts CRLF in its 255).
    pub fn next_frame(&mut self, buf: &mut BytesMut, max: usize) -> Option<Frame> {
        loop {
            if self.discarding {
                match memchr(buf) {
                    Some(i) => {
                        buf.advance(i + 1);
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        buf.clear();
                        return None;
                    }
                }
            }
            let window = buf.len().min(max);
            match memchr(&buf[..window]) {
                Some(i) => {
                    let mut line = buf.split_to(i + 1);
                    line.truncate(i);
                    if line.last() == Some(&b'\r') {
                        line.truncate(i - 1);
                    }
                    return Some(Frame::Line(line.to_vec()));
                }
                None if buf.len() >= max => {
                    // Drop the over-long line; if its end is already buffered, keep what follows it.
                    match memchr(buf) {
                        Some(i) => buf.advance(i + 1),
                        None => {
                            buf.clear();
                            self.discarding = true;
                        }
                    }
                    return Some(Frame::TooLong);
                }
                None => return None,
            }
        }
    }
}

fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes and collects every frame.
    fn replay(input: &[u8], chunk: usize, max: usize) -> Vec<Frame> {
        let mut framer = LineFramer::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(f) = framer.next_frame(&mut buf, max) {
                out.push(f);
            }
            assert!(
                buf.len() < max.max(chunk) + chunk,
                "framer buffered beyond its bound"
            );
        }
        out
    }

    #[test]
    fn same_frames_whatever_the_chunking() {
        let long = vec![b'x'; 400];
        let mut input = b"USER a\r\nPASS b c\r\n\r\nNOOP\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\r\nQUIT\r\n");
        let expected = vec![
            Frame::Line(b"USER a".to_vec()),
            Frame::Line(b"PASS b c".to_vec()),
            Frame::Line(b"".to_vec()),
            Frame::Line(b"NOOP".to_vec()),
            Frame::TooLong,
            Frame::Line(b"QUIT".to_vec()),
        ];
        for chunk in 1..=input.len() {
            assert_eq!(replay(&input, chunk, 255), expected, "chunk size {chunk}");
        }
    }

    #[test]
    fn bound_counts_the_terminator() {
        let mut ok = vec![b'a'; 253];
        ok.extend_from_slice(b"\r\n");
        assert_eq!(replay(&ok, 300, 255), vec![Frame::Line(vec![b'a'; 253])]);
        let mut over = vec![b'a'; 254];
        over.extend_from_slice(b"\r\n");
        assert_eq!(replay(&over, 300, 255), vec![Frame::TooLong]);
    }

    #[test]
    fn megabyte_without_newline_is_not_buffered() {
        let mut framer = LineFramer::new();
        let mut buf = BytesMut::new();
        let mut too_long = 0;
        for _ in 0..1024 {
            buf.extend_from_slice(&[b'z'; 1024]);
            while let Some(f) = framer.next_frame(&mut buf, 255) {
                assert_eq!(f, Frame::TooLong);
                too_long += 1;
            }
            assert!(buf.len() < 255 + 1024);
        }
        assert_eq!(too_long, 1);
        buf.extend_from_slice(b"\r\nQUIT\r\n");
        assert_eq!(
            framer.next_frame(&mut buf, 255),
            Some(Frame::Line(b"QUIT".to_vec()))
        );
    }
}
