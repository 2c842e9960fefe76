//! `LineFramer`: fed in chunks, it yields exactly the frames a whole-stream reading gives, and holds
//! less than its bound whenever it asks for more bytes.
//!
//! The reference reading: split the stream after each LF; a piece of at most `max` bytes (LF included)
//! is a line without its LF and one optional CR before it, a longer piece is one `TooLong`. An unended
//! last piece of `max` bytes or more is already `TooLong`; a shorter one is still pending.

use bytes::BytesMut;
use popgate::protocol::line::{Frame, LineFramer};

/// Input layout: `[max, chunk, stream...]`; `max` is 1..=256 bytes, the stream is fed `chunk` bytes
/// at a time (1..=256), then also all at once and one byte at a time.
pub fn check(data: &[u8]) {
    let [max, chunk, stream @ ..] = data else {
        return;
    };
    let max = usize::from(*max) + 1;
    let want = reference(stream, max);
    for chunk in [usize::from(*chunk).max(1), stream.len().max(1), 1] {
        assert_eq!(
            framed(stream, chunk, max),
            want,
            "max {max}, chunks of {chunk}"
        );
    }
}

/// Frames `stream` fed `chunk` bytes at a time, checking the buffer bound after every call.
fn framed(stream: &[u8], chunk: usize, max: usize) -> Vec<Frame> {
    let mut framer = LineFramer::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let frame = framer.next_frame(&mut buf, max);
            assert!(buf.len() <= before, "the framer grew its buffer");
            match frame {
                Some(Frame::Line(line)) => {
                    assert!(line.len() < max && !line.contains(&b'\n'));
                    out.push(Frame::Line(line));
                }
                Some(Frame::TooLong) => out.push(Frame::TooLong),
                None => {
                    assert!(
                        buf.len() < max,
                        "holds {} bytes with a bound of {max}",
                        buf.len()
                    );
                    break;
                }
            }
        }
    }
    out
}

fn reference(stream: &[u8], max: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        match rest.iter().position(|&b| b == b'\n') {
            Some(lf) if lf < max => {
                let line = &rest[..lf];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                out.push(Frame::Line(line.to_vec()));
                rest = &rest[lf + 1..];
            }
            Some(lf) => {
                out.push(Frame::TooLong);
                rest = &rest[lf + 1..];
            }
            None => {
                if rest.len() >= max {
                    out.push(Frame::TooLong);
                }
                break;
            }
        }
    }
    out
}
