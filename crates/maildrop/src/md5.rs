//! The APOP digest (RFC 1939 §7): lowercase hex MD5 of timestamp and secret, via the `md-5` crate.
//! MD5 is broken as a general hash; APOP needs it because the protocol fixes it.

use md5::{Digest, Md5};

/// Lowercase hex of the MD5 digest, the form APOP puts on the wire. (md-5 0.11 has no hex output.)
pub fn hex_digest(input: &[u8]) -> String {
    Md5::digest(input)
        .iter()
        .fold(String::with_capacity(32), |mut s, b| {
            use std::fmt::Write;
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_1939_apop_example_and_rfc_1321_vectors() {
        assert_eq!(
            hex_digest(b"<1896.697170952@dbc.mtview.ca.us>tanstaaf"),
            "c4c9334bac560ecc979e58001b3e22fb"
        );
        assert_eq!(hex_digest(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex_digest(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }
}
