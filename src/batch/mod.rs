//! Continuous batching: the streams of one engine that step at the same time share one
//! forward pass over the weights.
//!
//! Each stream's thread hands its step (a prompt chunk, or the token it just sampled) to
//! the engine's `Batcher` and waits. The first thread to find no pass running leads: it
//! takes every step waiting, up to a row budget, runs them as one pass, hands each its
//! result, and returns with its own. Threads that came meanwhile form the next pass. So a
//! stream joins between passes and leaves when it ends, sampling stays on each stream's own
//! thread, and nothing runs when no stream steps.
//!
//! Streams that were served by the last pass and come back quickly are waited for, briefly,
//! so that they keep sharing a pass instead of splitting into a pass of the first one back
//! and a pass of the rest. "Quickly" is relative to the pass: a thread that only samples
//! comes back in microseconds, a Python consumer under the GIL (a server's streams) in
//! milliseconds, while a decode pass of Phi-3-mini takes hundreds; the wait is at most an
//! eighth of the last pass. A stream whose consumer is slower than that is not waited for.
//! Streams seated within that window and not yet stepped are waited for too, and new
//! streams with nothing else to run wait until arrivals pause for a few milliseconds: a
//! burst of requests then starts in one pass. Taking the first prompt alone put it a pass
//! ahead of the rest, and it stayed ahead (its next request came a pass early): on the
//! server bench, four clients' first tokens came 2 s apart, and the first one's decode
//! steps ran beside the others' prompts.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Operation};
use crate::model::{self, Output, Phi3Model, Segment};

/// The least a leader waits for the streams of the last pass to come back, whatever the
/// pass took: threads that only sample a token come back well within it.
const GATHER_MIN: Duration = Duration::from_millis(3);
/// The most, whatever the pass took.
const GATHER_MAX: Duration = Duration::from_millis(100);
/// The wait as a fraction of the last pass: at most 1/8 more time per pass, for passes that
/// serve every stream instead of splitting in two (which would cost a whole pass).
const GATHER_SHARE: u32 = 8;
/// New streams with nothing else to run (every step waiting is a first one) are gathered
/// until none has arrived for this long, within the gather window: a burst of the server's
/// requests reaches the engine a few milliseconds apart, as the event loop takes them one
/// after another (the next may not be seated yet when the first steps).
const BURST_QUIET: Duration = Duration::from_millis(5);
/// How often a waiting stream checks its interrupt flag while its step is not yet in a pass.
const POLL: Duration = Duration::from_millis(5);
/// Most token rows in one pass: decode steps are one row each; prompt chunks join while
/// they fit, so that a burst of new prompts does not stall the streams already decoding
/// behind one huge pass. A step larger than this runs in a pass of its own.
pub const MAX_PASS_ROWS: usize = 256;
/// Most rows in a pass of prompt chunks alone, which stalls no decoding stream: the first
/// chunks of eight new streams (a burst of a server's requests) in one pass, so that they
/// start decoding together. Its activations take ~60 MB for Phi-3-mini (30 more than 256
/// rows), beside the streams' KV caches (8 x 211-token prompts: 875 MB at the peak).
pub const MAX_PROMPT_PASS_ROWS: usize = 512;

/// A stream's place with the batcher: counted as active while it lives.
pub struct Seat {
    id: u64,
    batcher: Arc<Batcher>,
}

impl Seat {
    /// Feeds `tokens` to `model` in the next pass (see [`Batcher::step`]).
    pub fn step(&self, model: Phi3Model, tokens: Vec<u32>, output: Output) -> Done {
        self.batcher.step(self, model, tokens, output)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.batcher.leave(self.id);
    }
}

/// Passes held back by [`Batcher::hold`] until this is dropped.
pub struct Hold<'a>(&'a Batcher);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.lock().leading = false;
        self.0.wake.notify_all();
    }
}

/// What a step gets back: its sequence state, and the logits it asked for or the error.
pub struct Done {
    pub model: Phi3Model,
    pub result: candle_core::Result<Option<Tensor>>,
}

struct Job {
    ticket: u64,
    seat: u64,
    /// The stream's first step.
    first: bool,
    model: Phi3Model,
    tokens: Vec<u32>,
    output: Output,
}

/// What the batcher knows of a stream between its steps.
#[derive(Default)]
struct Member {
    /// When it took its seat, until its first step.
    seated: Option<Instant>,
    /// When its last step was handed back (None while it waits or has never stepped).
    returned: Option<Instant>,
    /// How long it took to come back last time.
    turnaround: Option<Duration>,
}

#[derive(Default)]
struct State {
    queue: Vec<Job>,
    done: HashMap<u64, Done>,
    members: HashMap<u64, Member>,
    leading: bool,
    next_ticket: u64,
    /// How long the last pass took.
    last_pass: Duration,
    /// When a stream last took its seat or its first step.
    last_arrival: Option<Instant>,
}

impl State {
    /// How long a leader waits for the streams of the last pass.
    fn gather_window(&self) -> Duration {
        (self.last_pass / GATHER_SHARE).clamp(GATHER_MIN, GATHER_MAX)
    }

    /// Whether a stream of the last pass that usually comes back within `window` has not
    /// yet, or one seated within `window` has not taken its first step: streams started
    /// together (a burst of requests) have their prompts in one pass, instead of the
    /// first alone and the rest a pass behind it for the rest of their lives.
    fn awaits_member(&self, now: Instant, window: Duration) -> bool {
        self.members.iter().any(|(seat, m)| {
            let quick = m.turnaround.is_none_or(|t| t <= window);
            let recent = m.returned.is_some_and(|r| now - r < window);
            let arriving = m.seated.is_some_and(|s| now - s < window);
            (quick && recent || arriving) && !self.queue.iter().any(|j| j.seat == *seat)
        })
    }

    /// Until when new streams may still be arriving: only first steps wait, and the last
    /// stream came less than `BURST_QUIET` ago.
    fn burst_until(&self, now: Instant) -> Option<Instant> {
        let only_first = self.queue.iter().all(|j| j.first);
        burst_end(only_first, self.last_arrival, now)
    }

    /// The steps of the next pass (see [`pass_picks`]); the rest stay queued.
    fn take_pass(&mut self) -> Vec<Job> {
        let (single, chunks): (Vec<Job>, Vec<Job>) =
            self.queue.drain(..).partition(|j| j.tokens.len() == 1);
        let jobs: Vec<Job> = single.into_iter().chain(chunks).collect();
        let rows: Vec<usize> = jobs.iter().map(|j| j.tokens.len()).collect();
        let (taken, left) = jobs
            .into_iter()
            .zip(pass_picks(&rows))
            .partition::<Vec<_>, _>(|(_, picked)| *picked);
        self.queue = left.into_iter().map(|(job, _)| job).collect();
        taken.into_iter().map(|(job, _)| job).collect()
    }
}

/// Which of the waiting steps (their rows, decode steps first, then prompt chunks in
/// arrival order) go in the next pass: every decode step, then chunks while they fit the
/// row budget, which is larger when no decode step waits. The first always goes.
fn pass_picks(rows: &[usize]) -> Vec<bool> {
    let budget = if rows.contains(&1) {
        MAX_PASS_ROWS
    } else {
        MAX_PROMPT_PASS_ROWS
    };
    let mut total = 0;
    rows.iter()
        .enumerate()
        .map(|(i, &r)| {
            let picked = i == 0 || total + r <= budget;
            total += if picked { r } else { 0 };
            picked
        })
        .collect()
}

/// The scheduler of one engine's forward passes.
#[derive(Default)]
pub struct Batcher {
    state: Mutex<State>,
    wake: Condvar,
    active: AtomicUsize,
    next_seat: AtomicU64,
    passes: AtomicU64,
    batched_steps: AtomicU64,
}

impl Batcher {
    /// A seat for a new stream; it counts as active until the seat is dropped.
    pub fn seat(self: &Arc<Self>) -> Seat {
        self.active.fetch_add(1, Ordering::SeqCst);
        let id = self.next_seat.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let member = Member {
            seated: Some(now),
            ..Member::default()
        };
        let mut state = self.lock();
        state.members.insert(id, member);
        state.last_arrival = Some(now);
        drop(state);
        Seat {
            id,
            batcher: Arc::clone(self),
        }
    }

    /// Streams started and not yet ended.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Passes run so far, and the steps they served (their ratio is the mean batch size).
    pub fn pass_counts(&self) -> (u64, u64) {
        (
            self.passes.load(Ordering::Relaxed),
            self.batched_steps.load(Ordering::Relaxed),
        )
    }

    /// Holds passes back while the guard lives: steps queue up, and the first pass after
    /// it runs them together (waits for a pass under way to end first).
    pub fn hold(&self) -> Hold<'_> {
        let mut state = self.lock();
        while state.leading {
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.leading = true;
        Hold(self)
    }

    /// Steps waiting for a pass.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    fn leave(&self, seat: u64) {
        self.lock().members.remove(&seat);
        let was = self.active.fetch_sub(1, Ordering::SeqCst);
        // A leader may be waiting for this stream.
        self.wake.notify_all();
        if was == 1 {
            // The last stream: no pass runs until another starts.
            crate::heap::release_freed();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeds `tokens` to `model` in the next pass, with whatever other streams step then.
    pub fn step(&self, seat: &Seat, model: Phi3Model, tokens: Vec<u32>, output: Output) -> Done {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let now = Instant::now();
        let member = state.members.entry(seat.id).or_default();
        let first = member.seated.take().is_some();
        if let Some(returned) = member.returned.take() {
            member.turnaround = Some(now - returned);
        }
        if first {
            state.last_arrival = Some(now);
        }
        state.queue.push(Job {
            ticket,
            seat: seat.id,
            first,
            model,
            tokens,
            output,
        });
        self.wake.notify_all();
        loop {
            if let Some(done) = state.done.remove(&ticket) {
                return done;
            }
            if !state.leading {
                state.leading = true;
                state = self.gather(state);
                let pass = state.take_pass();
                drop(state);
                let started = Instant::now();
                let finished = run_pass(pass);
                let took = started.elapsed();
                self.passes.fetch_add(1, Ordering::Relaxed);
                self.batched_steps
                    .fetch_add(finished.len() as u64, Ordering::Relaxed);
                state = self.lock();
                state.last_pass = took;
                let now = Instant::now();
                for (ticket, seat, done) in finished {
                    if let Some(member) = state.members.get_mut(&seat) {
                        member.returned = Some(now);
                    }
                    state.done.insert(ticket, done);
                }
                state.leading = false;
                self.wake.notify_all();
                continue;
            }
            // Interrupted (Ctrl-C, cancel) before a pass took this step: leave the queue.
            if let Some(at) = state.queue.iter().position(|j| j.ticket == ticket) {
                let job = &state.queue[at];
                if job
                    .model
                    .interrupt_flag()
                    .is_some_and(|f| f.load(Ordering::Relaxed))
                {
                    let job = state.queue.remove(at);
                    return Done {
                        model: job.model,
                        result: Err(candle_core::Error::Msg("interrupted".into())),
                    };
                }
            }
            state = self
                .wake
                .wait_timeout(state, POLL)
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
    }

    /// Waits, up to the gather window, for the streams of the last pass that usually come
    /// back within it, for streams just seated that have not stepped yet, and while a burst
    /// of new streams is still arriving.
    fn gather<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let window = state.gather_window();
        let deadline = Instant::now() + window;
        loop {
            let now = Instant::now();
            let burst = state.burst_until(now);
            if now >= deadline || !(burst.is_some() || state.awaits_member(now, window)) {
                return state;
            }
            let until = burst.map_or(deadline, |b| b.min(deadline));
            state = self
                .wake
                .wait_timeout(state, until - now)
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
    }
}

/// Until when first steps (`only_first`: nothing else waits) wait for more, the last stream
/// having arrived at `last_arrival`: not while other streams' steps wait, nor once arrivals
/// have gone quiet.
fn burst_end(only_first: bool, last_arrival: Option<Instant>, now: Instant) -> Option<Instant> {
    let until = last_arrival? + BURST_QUIET;
    (only_first && until > now).then_some(until)
}

/// Runs `jobs` as one pass; a panic fails each of them instead of unwinding past the
/// waiting threads (each cache is rolled back to where its step began).
fn run_pass(mut jobs: Vec<Job>) -> Vec<(u64, u64, Done)> {
    let starts: Vec<usize> = jobs.iter().map(|j| j.model.position()).collect();
    let results = catch_unwind(AssertUnwindSafe(|| {
        let mut segments: Vec<Segment<'_>> = jobs
            .iter_mut()
            .map(|j| Segment {
                model: &mut j.model,
                tokens: &j.tokens,
                output: j.output,
            })
            .collect();
        // The whole pass on a worker of the pool: its many parallel steps (a few per layer)
        // then start there, instead of each handing off from this thread and sleeping on a
        // latch (a futex wake and wait apiece). Zen 4, one decoding stream: a fifth less
        // system time, 39.5 -> 41.6 tokens/s (the mean of three runs; runs differ by 10%).
        rayon::scope(|_| model::forward_batch(&mut segments))
    }));
    let results = match results {
        Ok(results) => results,
        Err(panic) => {
            let error = Error::from_panic(Operation::Generating, panic).to_string();
            for (job, &start) in jobs.iter_mut().zip(&starts) {
                job.model.truncate(start);
            }
            (0..jobs.len())
                .map(|_| Err(candle_core::Error::Msg(error.clone())))
                .collect()
        }
    };
    jobs.into_iter()
        .zip(results)
        .map(|(job, result)| {
            (
                job.ticket,
                job.seat,
                Done {
                    model: job.model,
                    result,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests;
