//! popgate's runtime log lines (reload outcomes) and admin and store warnings, captured in memory for every test of one binary: the
//! tracing subscriber is global to the test process.

use std::sync::{Mutex, OnceLock, PoisonError};

/// Starts capturing (once per process) and returns the buffer.
pub fn captured_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct Sink(&'static Mutex<Vec<u8>>);
        impl std::io::Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // Only the runtime's lines (reload outcomes) and the admin server's and store connections'
        // warnings: per-session lines of load tests would pile up.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "popgate::runtime=info,popgate::admin=warn,popgate::store::connection=warn",
            ))
            .with_ansi(false)
            .with_writer(move || Sink(buf))
            .try_init();
        buf
    })
}

/// Everything captured so far.
pub fn captured_text() -> String {
    String::from_utf8_lossy(
        &captured_log()
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    )
    .into_owned()
}

/// The captured "config reload refused" entries, each with its continuation lines.
pub fn logged_refusals() -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in captured_text().lines() {
        // An entry starts with its timestamp; the reasons follow on indented lines.
        if line.starts_with(|c: char| c.is_ascii_digit()) {
            entries.push(line.to_string());
        } else if let Some(last) = entries.last_mut() {
            last.push('\n');
            last.push_str(line);
        }
    }
    entries.retain(|e| e.contains("config reload refused"));
    entries
}
