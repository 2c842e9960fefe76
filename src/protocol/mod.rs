//! POP3 wire formats, without I/O: line framing, client commands, store replies, SASL codecs.
//!
//! Everything here takes bytes and returns values, so it is tested with byte slices replayed in chunks and
//! fuzzed without sockets. Nothing here knows about tenants, stores or sockets.

pub mod command;
pub mod line;
pub mod reply;
pub mod sasl;

/// RFC 2449: a command line, CRLF included, is at most 255 octets.
pub const MAX_COMMAND_LINE: usize = 255;
/// SASL responses may carry OAuth tokens: allow up to 16 KiB for those lines.
pub const MAX_SASL_LINE: usize = 16 * 1024;
/// Longest status line popgate accepts from a store (greeting, login answers).
pub const MAX_REPLY_LINE: usize = 1024;
