//! Untrusted code (a GGUF's chat template) runs on a thread of its own, within a memory
//! budget, a deadline and a deep stack, so that no template can exhaust the process.
//!
//! minijinja bounds instructions (fuel) and recursion, but one instruction can still
//! allocate without bound (`s ~ s` doubles a string, `'%99999999999s'|format` asks for a
//! terabyte), and in Rust a failed allocation aborts the process. So the process's
//! allocator charges every allocation made on a sandbox thread to that thread's budget, and
//! a thread that would exceed it (or outlives its deadline) is stopped at that allocation,
//! before it is made: it sleeps forever, holding at most its budget, and the caller gets an
//! error. The owner of the code (the chat template) then refuses to run it again, so one
//! hostile template costs at most one budget.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What sandboxed code may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes live on the thread at once.
    pub memory: usize,
    pub time: Duration,
    /// The thread's stack: parsers recurse once per nesting level of the code.
    pub stack: usize,
}

/// Why sandboxed code did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    Memory(usize),
    Time(Duration),
    Panic(String),
    /// No thread could be started.
    Thread(String),
    /// The caller's interrupt flag was set (Ctrl-C).
    Interrupted,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Memory(limit) => write!(f, "it needed more than {} MiB", limit >> 20),
            Stopped::Time(limit) => write!(f, "it ran longer than {:.1} s", limit.as_secs_f64()),
            Stopped::Panic(message) => write!(f, "it failed: {message}"),
            Stopped::Thread(message) => write!(f, "no thread could run it: {message}"),
            Stopped::Interrupted => write!(f, "it was interrupted"),
        }
    }
}

/// The budget of one sandbox thread, shared with the thread that waits for it.
struct Budget {
    used: AtomicUsize,
    limit: usize,
    /// Set by the waiting thread at the deadline: the sandbox stops at its next allocation.
    stop: AtomicBool,
    /// Set by the sandbox thread when it stops for good.
    stopped: AtomicBool,
}

thread_local! {
    // A plain pointer with const initialisation: reading it never allocates, as it must
    // not inside the allocator. Null on every thread but a sandbox's.
    static BUDGET: Cell<*const Budget> = const { Cell::new(std::ptr::null()) };
}

/// The process's allocator for Rust code: the system's, charging sandbox threads.
pub struct Allocator;

impl Allocator {
    fn charge(size: usize) {
        let budget = BUDGET.with(Cell::get);
        if budget.is_null() {
            return;
        }
        // SAFETY: set only by `run`'s thread, to a budget that thread keeps alive.
        let budget = unsafe { &*budget };
        let used = budget.used.load(Ordering::Relaxed).saturating_add(size);
        // A panic is let through: its hook may hold the stderr lock while it allocates.
        let over = used > budget.limit || budget.stop.load(Ordering::Relaxed);
        if over && !std::thread::panicking() {
            budget.stopped.store(true, Ordering::Release);
            // Stop here, before the allocation; sleeping allocates nothing.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        budget.used.store(used, Ordering::Relaxed);
    }

    fn refund(size: usize) {
        let budget = BUDGET.with(Cell::get);
        if !budget.is_null() {
            // SAFETY: as in `charge`.
            let budget = unsafe { &*budget };
            let used = budget.used.load(Ordering::Relaxed).saturating_sub(size);
            budget.used.store(used, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the budget only decides whether
// to forward it now or never.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::charge(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::charge(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::refund(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            Self::charge(new_size - layout.size());
        } else {
            Self::refund(layout.size() - new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// How often the waiting thread looks at the sandbox.
const POLL: Duration = Duration::from_millis(5);

/// Runs `work` in a sandbox thread within `limits`, or until `interrupt` is set.
pub fn run<T: Send + 'static>(
    limits: Limits,
    interrupt: &AtomicBool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Stopped> {
    let budget = Arc::new(Budget {
        used: AtomicUsize::new(0),
        limit: limits.memory,
        stop: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
    });
    let (done, outcome) = sync_channel(1);
    let thread_budget = Arc::clone(&budget);
    let spawned = std::thread::Builder::new()
        .name("candle-phi-sandbox".into())
        .stack_size(limits.stack)
        .spawn(move || {
            BUDGET.with(|b| b.set(Arc::as_ptr(&thread_budget)));
            let result = catch_unwind(AssertUnwindSafe(work));
            BUDGET.with(|b| b.set(std::ptr::null()));
            let result = result.map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned());
                Stopped::Panic(message.unwrap_or_else(|| "a panic".into()))
            });
            // The waiting thread may have given up on us: then nobody reads this.
            let _ = done.send(result);
        });
    if let Err(e) = spawned {
        return Err(Stopped::Thread(e.to_string()));
    }
    let deadline = Instant::now() + limits.time;
    loop {
        match outcome.recv_timeout(POLL) {
            Ok(result) => return result,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Stopped::Panic("the sandbox ended without a result".into()))
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if budget.stopped.load(Ordering::Acquire) {
            return Err(Stopped::Memory(limits.memory));
        }
        // Either way it stops at its next allocation; pure computation is bounded by fuel.
        if interrupt.load(Ordering::Relaxed) {
            budget.stop.store(true, Ordering::Relaxed);
            return Err(Stopped::Interrupted);
        }
        if Instant::now() >= deadline {
            budget.stop.store(true, Ordering::Relaxed);
            return Err(Stopped::Time(limits.time));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        memory: 64 << 20,
        time: Duration::from_secs(60),
        stack: 1 << 20,
    };

    #[test]
    fn work_within_limits_returns_its_result() {
        let out = run(SMALL, &AtomicBool::new(false), || vec![7u8; 1 << 20].len());
        assert_eq!(out, Ok(1 << 20));
    }

    #[test]
    fn an_allocation_past_the_budget_stops_the_thread_before_it_is_made() {
        // A terabyte: the system allocator would fail, and Rust would abort.
        let out = run(SMALL, &AtomicBool::new(false), || vec![1u8; 1 << 40].len());
        assert_eq!(out, Err(Stopped::Memory(64 << 20)));
        // Growth by doubling is stopped too, and freed memory is refunded meanwhile.
        let out = run(SMALL, &AtomicBool::new(false), || {
            let mut s = String::from("x");
            loop {
                s = s.repeat(2);
            }
        });
        assert_eq!(out, Err(Stopped::Memory(64 << 20)));
    }

    #[test]
    fn memory_freed_is_refunded() {
        let out = run(SMALL, &AtomicBool::new(false), || {
            for _ in 0..100 {
                drop(vec![0u8; 32 << 20]);
            }
            "done"
        });
        assert_eq!(out, Ok("done"));
    }

    #[test]
    fn the_deadline_stops_the_thread_at_its_next_allocation() {
        let limits = Limits {
            time: Duration::from_millis(50),
            ..SMALL
        };
        let out = run(limits, &AtomicBool::new(false), || loop {
            std::hint::black_box(vec![0u8; 16]);
        });
        assert_eq!(out, Err(Stopped::Time(Duration::from_millis(50))));
    }

    #[test]
    fn an_interrupt_stops_the_thread() {
        let flag = AtomicBool::new(true);
        let out = run(SMALL, &flag, || loop {
            std::hint::black_box(vec![0u8; 16]);
        });
        assert_eq!(out, Err(Stopped::Interrupted));
    }

    #[test]
    fn a_panic_is_reported() {
        let out: Result<(), _> = run(SMALL, &AtomicBool::new(false), || panic!("boom"));
        assert_eq!(out, Err(Stopped::Panic("boom".into())));
    }
}
