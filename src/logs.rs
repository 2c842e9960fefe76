//! The log writer: lines are appended to a shared buffer, and one thread writes the buffer out every
//! [`FLUSH_INTERVAL`] (sooner when it fills). A session's worker never waits in `write(2)` and never
//! wakes another thread to log a line.
//!
//! Why not `tracing_appender::non_blocking`: it hands every line to its thread through a channel, so every
//! line costs a futex wake and the thread's spin-and-yield before it sleeps again. With two lines per
//! session that was a tenth of popgate's CPU per login on a 2-core machine (BENCHMARKS.md); here a line
//! costs an uncontended lock and a copy.
//!
//! Nothing is dropped: when the writer falls behind by [`BUFFER_LIMIT`] (stderr blocked), logging waits
//! for it. [`LogGuard`] writes what is left when it is dropped, so `main` holds it to the end.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A buffer this full is written at once.
const WRITE_AT: usize = 64 * 1024;
/// Loggers wait while this much is waiting to be written.
pub const BUFFER_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, Default)]
struct State {
    pending: Vec<u8>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here for a full buffer or the close.
    full: Condvar,
    /// Loggers wait here while the buffer is at its limit.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where log lines go: cheap to clone, one per subscriber (`tracing_subscriber`'s `MakeWriter`).
#[derive(Debug, Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Ends the writer thread when dropped, after it wrote everything logged before.
#[derive(Debug)]
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn batch_writer(out: impl Write + Send + 'static) -> io::Result<(BatchWriter, LogGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("popgate-log".into())
            .spawn(move || write_out(&shared, out))?
    };
    Ok((
        BatchWriter {
            shared: shared.clone(),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

/// The writer thread: swaps the buffer for an empty one and writes it, until closed and drained.
fn write_out(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut state = shared.lock();
            if !state.closed && state.pending.len() < WRITE_AT {
                state = shared
                    .full
                    .wait_timeout(state, FLUSH_INTERVAL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut batch, &mut state.pending);
            state.closed
        };
        shared.room.notify_all();
        if !batch.is_empty() {
            // Nowhere to report a failed write of the log itself; the lines are lost, popgate goes on.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // A burst's buffer is not kept for good.
            batch.shrink_to(WRITE_AT);
        }
        if closed && shared.lock().pending.is_empty() {
            return;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.full.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        while state.pending.len() >= BUFFER_LIMIT && !state.closed {
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let was = state.pending.len();
        state.pending.extend_from_slice(bytes);
        if was < WRITE_AT && state.pending.len() >= WRITE_AT {
            self.shared.full.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A sink the test can read while the writer thread owns its other handle.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_whole_by_the_guard_at_the_latest() {
        let sink = Sink::default();
        let (writer, guard) = batch_writer(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        w.write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> =
                (0..5_000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(own, expected, "thread {t}'s lines lost or out of order");
        }
    }

    #[test]
    fn a_quiet_line_is_written_without_the_guard() {
        let sink = Sink::default();
        let (mut writer, _guard) = batch_writer(sink.clone()).unwrap();
        writer.write_all(b"one line\n").unwrap();
        let start = std::time::Instant::now();
        while sink.0.lock().unwrap().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the line never reached the output"
            );
            std::thread::yield_now();
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"one line\n");
    }

    /// An output that blocks until the test opens it, like a stderr pipe nobody reads.
    struct Gate(Arc<(Mutex<bool>, Condvar)>, Sink);

    impl Write for Gate {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            self.1.write(bytes)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_makes_loggers_wait_instead_of_dropping_or_growing_without_bound() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (writer, guard) = batch_writer(Gate(gate.clone(), sink.clone())).unwrap();
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        let total_lines = 3 * BUFFER_LIMIT / line.len();
        let logger = {
            let mut w = writer.clone();
            let line = line.clone();
            std::thread::spawn(move || {
                for _ in 0..total_lines {
                    w.write_all(&line).unwrap();
                }
            })
        };
        // The logger must stop at the limit: wait until it has filled the buffer, and check it is still
        // running (held back) rather than done.
        let start = std::time::Instant::now();
        while writer.shared.lock().pending.len() < BUFFER_LIMIT {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "buffer never filled"
            );
            std::thread::yield_now();
        }
        assert!(!logger.is_finished(), "the logger ran past the limit");
        assert!(writer.shared.lock().pending.len() < BUFFER_LIMIT + line.len());
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        logger.join().unwrap();
        drop(guard);
        assert_eq!(sink.0.lock().unwrap().len(), total_lines * line.len());
    }
}
