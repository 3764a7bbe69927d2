//! A hook's output: read by a thread per stream, logged line by line and
//! kept (bounded) for the error message when it fails.

use std::io::{self, Read};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use super::{
    HookPhase, MAX_CAPTURE_BYTES, MAX_LOG_LINE_BYTES, OUTPUT_DRAIN_GRACE, STDERR_TAIL_LINES,
    STDERR_TAIL_MAX_BYTES,
};

/// Waits for the output readers to reach end of file, for at most
/// [`OUTPUT_DRAIN_GRACE`].
pub(super) fn drain(done: &Receiver<()>, readers: usize, phase: HookPhase, name: &str) {
    let deadline = Instant::now() + OUTPUT_DRAIN_GRACE;
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                // The reader thread keeps logging until those processes close
                // the pipe; blocking here would stretch the quiesce window.
                tracing::warn!(
                    phase = phase.as_str(),
                    hook = name,
                    "hook exited but left processes holding its stdout/stderr; no longer waiting for their output"
                );
                return;
            }
        }
    }
}

/// Starts a thread that logs `stream` line by line and, if `tail` is given,
/// keeps its last [`MAX_CAPTURE_BYTES`] there. Sends on `done` at end of file.
pub(super) fn spawn_reader<R: Read + Send + 'static>(
    stream: R,
    phase: HookPhase,
    name: &str,
    stream_name: &'static str,
    tail: Option<Arc<Mutex<Vec<u8>>>>,
    done: Sender<()>,
) {
    let name = name.to_owned();
    thread::spawn(move || {
        pump(stream, phase, &name, stream_name, tail.as_deref());
        // The receiver may be gone if the runner stopped waiting.
        let _ = done.send(());
    });
}

pub(super) fn pump<R: Read>(
    mut stream: R,
    phase: HookPhase,
    name: &str,
    stream_name: &'static str,
    tail: Option<&Mutex<Vec<u8>>>,
) {
    let log = |line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::info!(
            phase = phase.as_str(),
            hook = name,
            stream = stream_name,
            "{text}"
        );
    };
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(
                    hook = name,
                    stream = stream_name,
                    "cannot read hook output: {e}"
                );
                break;
            }
        };
        if let Some(tail) = tail {
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            push_bounded(&mut tail, &buf[..n], MAX_CAPTURE_BYTES);
        }
        for piece in buf[..n].split_inclusive(|&b| b == b'\n') {
            line.extend_from_slice(piece);
            if line.ends_with(b"\n") || line.len() >= MAX_LOG_LINE_BYTES {
                log(&line);
                line.clear();
            }
        }
    }
    if !line.is_empty() {
        log(&line);
    }
}

/// Appends `data` to `buf`, then drops bytes from the front so at most `cap`
/// remain.
pub(super) fn push_bounded(buf: &mut Vec<u8>, data: &[u8], cap: usize) {
    buf.extend_from_slice(data);
    if buf.len() > cap {
        let excess = buf.len() - cap;
        buf.drain(..excess);
    }
}

pub(super) fn tail_of(captured: &Mutex<Vec<u8>>) -> String {
    let captured = captured.lock().unwrap_or_else(|e| e.into_inner());
    last_lines(&captured, STDERR_TAIL_LINES, STDERR_TAIL_MAX_BYTES)
}

/// The last `max_lines` lines of `bytes`, at most `max_bytes` long (cut at a
/// character boundary), without trailing blank space.
pub(super) fn last_lines(bytes: &[u8], max_lines: usize, max_bytes: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    let start = text
        .rmatch_indices('\n')
        .nth(max_lines.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    let mut tail = &text[start..];
    if tail.len() > max_bytes {
        let mut cut = tail.len() - max_bytes;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = &tail[cut..];
    }
    tail.to_owned()
}
