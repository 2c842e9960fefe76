//! Store-to-client bytes through a pipe with `splice(2)` when both legs are plain TCP: the bytes never enter
//! popgate's memory, and a 20 MiB RETR costs a few hundred syscall pairs instead of copies through a buffer.
//!
//! A session has a pipe only while a transfer streams: `relay.rs` opens one when a read through memory fills
//! the whole scratch buffer (a long reply, not a one-line answer, which gains nothing from a pipe and would
//! pay for its setup), and closes it as soon as the store has nothing more ready and the pipe is empty. An
//! idle session holds no pipe and no descriptor beyond its two sockets.

use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll, ready};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per `splice` call at most. A larger pipe than Linux's 64 KiB default cuts the syscalls of a
/// long RETR; the kernel allocates pipe pages only as they fill.
const PIPE_SIZE: usize = 256 * 1024;

/// A pipe and the number of bytes in it.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    len: usize,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // A smaller pipe still works (the limit is a sysctl); only the syscall count grows.
        let capacity = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
            len: 0,
        })
    }
}

/// What one poll of the store-to-client pipe ended with.
#[derive(Debug)]
pub(super) enum Spliced {
    /// The store closed its side (all its bytes were delivered).
    StoreEof,
    /// Reading from the store failed.
    StoreError,
    /// Writing to the client failed.
    ClientError,
    /// The store has nothing ready and the pipe is empty: the transfer has paused or ended, so the caller
    /// closes the pipe. The store's readiness is registered with the task.
    Quiet,
}

/// Moves store bytes to the client through `pipe` until the client cannot take more (`Pending`, bytes left in
/// the pipe) or one of the ends in `Spliced`. `moved` counts bytes delivered.
pub(super) fn poll_splice(
    cx: &mut Context<'_>,
    store: &TcpStream,
    client: &TcpStream,
    pipe: &mut Pipe,
    moved: &mut u64,
) -> Poll<Spliced> {
    loop {
        while pipe.len > 0 {
            if ready!(client.poll_write_ready(cx)).is_err() {
                return Poll::Ready(Spliced::ClientError);
            }
            let out = client.try_io(Interest::WRITABLE, || {
                Ok(splice(
                    &pipe.read,
                    None,
                    client,
                    None,
                    pipe.len,
                    SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                )?)
            });
            match out {
                Ok(0) => return Poll::Ready(Spliced::ClientError),
                Ok(n) => {
                    pipe.len -= n;
                    *moved += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Spliced::ClientError),
            }
        }
        match store.poll_read_ready(cx) {
            Poll::Pending => return Poll::Ready(Spliced::Quiet),
            Poll::Ready(Err(_)) => return Poll::Ready(Spliced::StoreError),
            Poll::Ready(Ok(())) => {}
        }
        // The pipe is empty, so WouldBlock can only mean the store has nothing: readiness is cleared for it.
        let got = store.try_io(Interest::READABLE, || {
            Ok(splice(
                store,
                None,
                &pipe.write,
                None,
                pipe.capacity,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            )?)
        });
        match got {
            Ok(0) => return Poll::Ready(Spliced::StoreEof),
            Ok(n) => pipe.len = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(Spliced::StoreError),
        }
    }
}
