//! Engine work runs on a worker thread while the calling thread, GIL released, waits for it
//! and checks for Ctrl-C every few milliseconds. So a signal lands during any phase (load,
//! template, tokenization, a prompt chunk, a token) instead of after it, and a panic in the
//! engine comes back as an exception instead of `PanicException` or an abort.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::Duration;

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

use super::errors::IntoPyResult;
use crate::error::{Error, Operation};

/// How often the waiting thread looks for a pending signal.
const POLL: Duration = Duration::from_millis(20);

/// The ident of Python's main thread, the one signal handlers run on; read when the module
/// is imported, so that asking never runs Python code (which a pending Ctrl-C would
/// interrupt, losing it).
static MAIN_THREAD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

pub(crate) fn record_main_thread(py: Python<'_>) -> PyResult<()> {
    let main = py.import("threading")?.call_method0("main_thread")?;
    let ident: u64 = main.getattr("ident")?.extract()?;
    let _ = MAIN_THREAD.set(ident);
    Ok(())
}

fn on_main_thread() -> bool {
    // SAFETY: reads the calling thread's ident; no Python state is touched.
    #[allow(clippy::useless_conversion)] // c_ulong is u32 on Windows
    let current = u64::from(unsafe { pyo3::ffi::PyThread_get_thread_ident() });
    // Unknown (never recorded): poll as on the main thread, slower but never deaf.
    MAIN_THREAD.get().is_none_or(|&main| main == current)
}

/// Runs `work` on a worker thread; on Ctrl-C, sets `interrupt` (the engine checks it between
/// layers, chunks and tensors), waits for the work to stop, and raises KeyboardInterrupt.
/// A panic in `work` becomes the `Error::Internal` of `operation`. Work that needs no
/// interrupt flag of its own (it ends in bounded time) passes a fresh one.
pub(crate) fn run<T: Send>(
    py: Python<'_>,
    operation: Operation,
    interrupt: &AtomicBool,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    interrupt.store(false, Ordering::Relaxed);
    let result = std::thread::scope(|scope| {
        let (done, mut outcome) = sync_channel(1);
        let worker = std::thread::Builder::new()
            .name("candle-phi-call".into())
            .spawn_scoped(scope, move || {
                let result = catch_unwind(AssertUnwindSafe(work))
                    .unwrap_or_else(|panic| Err(Error::from_panic(operation, panic)));
                // The receiver outlives the scope's threads: this cannot fail.
                let _ = done.send(result);
            });
        if let Err(e) = worker {
            return Ok(Err(Error::Internal {
                operation,
                detail: format!("cannot start a thread: {e}"),
            }));
        }
        if !on_main_thread() {
            // Only the main thread sees signals: another one (an event loop's executor, a
            // user's thread) waits without taking the GIL back every few milliseconds.
            return Ok(py.detach(move || outcome.recv()).unwrap_or_else(|_| {
                Err(Error::Internal {
                    operation,
                    detail: "the worker thread ended without a result".into(),
                })
            }));
        }
        loop {
            let (received, receiver) = py.detach(move || (outcome.recv_timeout(POLL), outcome));
            outcome = receiver;
            match received {
                Ok(result) => return Ok(result),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(signal) = py.check_signals() {
                        interrupt.store(true, Ordering::Relaxed);
                        // The work stops at its next check. If it finished first, its
                        // result (a token's text, say) is not thrown away: it is returned
                        // and the interrupt posted again, to be raised right after.
                        let finished = py.detach(move || outcome.recv());
                        let ctrl_c = signal.is_instance_of::<PyKeyboardInterrupt>(py);
                        return match finished {
                            // Only a Ctrl-C is posted again; another handler's exception
                            // (SystemExit from SIGTERM, ...) is raised now.
                            Ok(result) if ctrl_c && !matches!(result, Err(Error::Interrupted)) => {
                                // SAFETY: called with the GIL held, as the API requires.
                                unsafe { pyo3::ffi::PyErr_SetInterrupt() };
                                Ok(result)
                            }
                            _ => Err(signal),
                        };
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Ok(Err(Error::Internal {
                        operation,
                        detail: "the worker thread ended without a result".into(),
                    }))
                }
            }
        }
    });
    result.and_then(|r| r.py_err(py))
}
