//! The batcher's rules: whom a pass waits for, and which steps it takes.

use super::*;

/// A state whose one stream (seat 0) came back `turnaround` after its step last time and
/// was handed its last result at `returned`, after a pass of `last_pass`.
fn state(turnaround: Duration, returned: Instant, last_pass: Duration) -> State {
    let mut state = State {
        last_pass,
        ..State::default()
    };
    state.members.insert(
        0,
        Member {
            returned: Some(returned),
            turnaround: Some(turnaround),
            ..Member::default()
        },
    );
    state
}

#[test]
fn the_gather_window_is_an_eighth_of_the_last_pass_within_bounds() {
    let window = |ms: u64| {
        State {
            last_pass: Duration::from_millis(ms),
            ..State::default()
        }
        .gather_window()
    };
    assert_eq!(window(0), GATHER_MIN);
    assert_eq!(window(8), GATHER_MIN);
    assert_eq!(window(400), Duration::from_millis(50));
    assert_eq!(window(60_000), GATHER_MAX);
}

#[test]
fn a_stream_just_seated_is_waited_for_until_its_first_step() {
    let now = Instant::now();
    let seated = |at: Instant| {
        let mut state = State {
            last_pass: Duration::from_millis(400),
            ..State::default()
        };
        let member = Member {
            seated: Some(at),
            ..Member::default()
        };
        state.members.insert(0, member);
        state
    };
    let s = seated(now);
    assert!(s.awaits_member(now, s.gather_window()));
    // Not once it has stepped (its first step clears `seated`).
    let mut s = seated(now);
    s.members.get_mut(&0).unwrap().seated = None;
    assert!(!s.awaits_member(now, s.gather_window()));
    // Nor one seated longer ago than the window (a stream not being iterated).
    let s = seated(now);
    let later = now + Duration::from_millis(60);
    assert!(!s.awaits_member(later, s.gather_window()));
}

#[test]
fn prompt_chunks_fill_a_pass_up_to_its_budget() {
    // Eight new streams' first chunks: one pass, stalling nobody.
    assert_eq!(pass_picks(&[64; 8]), vec![true; 8]);
    assert_eq!(pass_picks(&[64; 9]), [vec![true; 8], vec![false]].concat());
    // Beside a decoding stream, chunks fill 256 rows: that stream waits one such pass.
    let mut rows = vec![1];
    rows.extend([64; 4]);
    assert_eq!(pass_picks(&rows), vec![true, true, true, true, false]);
    // A later chunk that fits still goes; a step over the budget goes alone.
    assert_eq!(pass_picks(&[1, 250, 10, 5]), vec![true, true, false, true]);
    assert_eq!(pass_picks(&[2000, 64]), vec![true, false]);
}

#[test]
fn a_burst_of_new_streams_is_gathered_until_it_goes_quiet() {
    let now = Instant::now();
    let ms = Duration::from_millis;
    assert_eq!(burst_end(true, Some(now), now), Some(now + BURST_QUIET));
    assert_eq!(
        burst_end(true, Some(now - ms(2)), now),
        Some(now - ms(2) + BURST_QUIET)
    );
    // Streams under way do not wait for new ones; nor does a burst gone quiet.
    assert_eq!(burst_end(false, Some(now), now), None);
    assert_eq!(burst_end(true, Some(now - BURST_QUIET), now), None);
    assert_eq!(burst_end(true, None, now), None);
}

#[test]
fn a_stream_slower_than_microseconds_is_waited_for_when_passes_are_long() {
    // A Python consumer under the GIL: back 20 ms after its result. Behind a 400 ms pass
    // (a decode step of Phi-3-mini on two cores) it is worth waiting for; behind a 2 ms
    // pass (a tiny model) it is not, and a slow consumer (a second) never is.
    let now = Instant::now();
    let gil = Duration::from_millis(20);
    let s = state(gil, now, Duration::from_millis(400));
    assert!(s.awaits_member(now, s.gather_window()));
    let s = state(gil, now, Duration::from_millis(2));
    assert!(!s.awaits_member(now, s.gather_window()));
    let s = state(Duration::from_secs(1), now, Duration::from_millis(400));
    assert!(!s.awaits_member(now, s.gather_window()));
    // Nor one that has been away longer than the window already.
    let s = state(gil, now, Duration::from_millis(400));
    let later = now + Duration::from_millis(60);
    assert!(!s.awaits_member(later, s.gather_window()));
}
