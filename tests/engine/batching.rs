//! Continuous batching: sequences computed in one pass get the logits they get alone, an
//! interrupted one leaves the pass without disturbing the others, and the batcher runs the
//! steps of concurrent streams together.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use candle_core::quantized::GgmlDType;
use candle_phi::batch::Batcher;
use candle_phi::model::{self, Output, Phi3Config, Phi3Model, Phi3Weights, Segment};

use crate::common::{config, weights};

fn shared_weights(config: Phi3Config, dtype: GgmlDType) -> Arc<Phi3Weights> {
    let mut source = weights(&config, 42, dtype);
    Arc::new(Phi3Weights::load(config, &mut source).unwrap())
}

fn tokens(n: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + seed * 13 + 11) % vocab) as u32)
        .collect()
}

fn rows(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Sequences at different positions, a prompt chunk among decode steps, every output kind:
/// each gets from the shared pass the logits it gets alone, and its cache the same length.
fn one_pass_equals_alone(dtype: GgmlDType, tol: f32) {
    let weights = shared_weights(config(), dtype);
    let vocab = config().vocab_size;
    let span = config().context_length;
    // (history fed before, tokens of the pass, output)
    let plan = [
        (10, 1, Output::Last),
        (0, 7, Output::Last),
        (33, 1, Output::Last),
        (5, 4, Output::All),
        (20, 3, Output::Nothing),
        (1, 1, Output::All),
    ];
    let fresh = |history: usize, seed: usize| {
        let mut m = Phi3Model::new(Arc::clone(&weights), span).unwrap();
        if history > 0 {
            m.feed(&tokens(history, seed, vocab)).unwrap();
        }
        m
    };
    let inputs: Vec<Vec<u32>> = plan
        .iter()
        .enumerate()
        .map(|(seed, &(history, n, _))| tokens(history + n, seed, vocab)[history..].to_vec())
        .collect();
    let alone: Vec<Option<Vec<f32>>> = plan
        .iter()
        .enumerate()
        .map(|(seed, &(history, _, output))| {
            let mut m = fresh(history, seed);
            let mut segment = [Segment {
                model: &mut m,
                tokens: &inputs[seed],
                output,
            }];
            let result = model::forward_batch(&mut segment).remove(0).unwrap();
            result.map(|t| rows(&t))
        })
        .collect();
    let mut models: Vec<Phi3Model> = plan
        .iter()
        .enumerate()
        .map(|(seed, &(history, _, _))| fresh(history, seed))
        .collect();
    let mut segments: Vec<Segment<'_>> = models
        .iter_mut()
        .zip(&plan)
        .zip(&inputs)
        .map(|((model, &(_, _, output)), tokens)| Segment {
            model,
            tokens,
            output,
        })
        .collect();
    let together = model::forward_batch(&mut segments);
    for (i, result) in together.into_iter().enumerate() {
        let result = result.unwrap().map(|t| rows(&t));
        match (&alone[i], &result) {
            (Some(a), Some(b)) => {
                let diff = max_diff(a, b);
                assert!(diff <= tol, "{dtype:?} segment {i}: differs by {diff}");
            }
            (None, None) => {}
            _ => panic!("segment {i}: outputs of different kinds"),
        }
        assert_eq!(models[i].position(), plan[i].0 + plan[i].1);
    }
}

#[test]
fn a_batched_pass_gives_each_sequence_its_logits_alone() {
    // Our per-row activation quantization makes each row independent of the others; only
    // the f32 summation inside Candle's matmuls may differ by the rows' count.
    one_pass_equals_alone(GgmlDType::F32, 1e-4);
    one_pass_equals_alone(GgmlDType::Q8_0, 1e-4);
}

#[test]
fn an_interrupted_sequence_leaves_the_pass_and_the_others_go_on() {
    let weights = shared_weights(config(), GgmlDType::F32);
    let span = config().context_length;
    let vocab = config().vocab_size;
    let flag = Arc::new(AtomicBool::new(true));
    let mut stopped = Phi3Model::new(Arc::clone(&weights), span).unwrap();
    stopped.feed(&tokens(6, 1, vocab)).unwrap();
    stopped.set_interrupt(Arc::clone(&flag));
    let mut going = Phi3Model::new(Arc::clone(&weights), span).unwrap();
    let mut alone = Phi3Model::new(Arc::clone(&weights), span).unwrap();
    let ids = tokens(5, 2, vocab);
    let expected = rows(&alone.forward(&ids).unwrap());
    let mut segments = [
        Segment {
            model: &mut stopped,
            tokens: &[3],
            output: Output::Last,
        },
        Segment {
            model: &mut going,
            tokens: &ids,
            output: Output::Last,
        },
    ];
    let mut results = model::forward_batch(&mut segments);
    let got = results.remove(1).unwrap().unwrap();
    assert!(results.remove(0).is_err());
    assert!(max_diff(&rows(&got), &expected) <= 1e-4);
    assert_eq!(stopped.position(), 6, "rolled back");
    flag.store(false, Ordering::Relaxed);
    assert!(stopped.forward(&[3]).is_ok());
}

#[test]
fn steps_that_wait_together_share_one_pass_and_get_their_own_logits() {
    let weights = shared_weights(config(), GgmlDType::F32);
    let span = config().context_length;
    let vocab = config().vocab_size;
    let batcher = Arc::new(Batcher::default());
    let streams = 4;
    let prompts: Vec<Vec<u32>> = (0..streams).map(|s| tokens(3 + s, s, vocab)).collect();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut m = Phi3Model::new(Arc::clone(&weights), span).unwrap();
            rows(&m.forward(p).unwrap())
        })
        .collect();
    let hold = batcher.hold();
    let start = Arc::new(Barrier::new(streams + 1));
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|prompt| {
            let (batcher, weights, start) = (batcher.clone(), weights.clone(), start.clone());
            std::thread::spawn(move || {
                let seat = batcher.seat();
                let model = Phi3Model::new(weights, span).unwrap();
                start.wait();
                let done = seat.step(model, prompt, Output::Last);
                rows(&done.result.unwrap().unwrap())
            })
        })
        .collect();
    start.wait();
    assert_eq!(batcher.active_streams(), streams);
    while batcher.queued() < streams {
        std::thread::yield_now();
    }
    drop(hold);
    let got: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        batcher.pass_counts(),
        (1, streams as u64),
        "one pass served all"
    );
    for (a, b) in alone.iter().zip(&got) {
        assert!(max_diff(a, b) <= 1e-4);
    }
    assert_eq!(
        batcher.active_streams(),
        0,
        "seats dropped with their threads"
    );
}

#[test]
fn an_interrupted_step_leaves_the_queue_before_any_pass() {
    let weights = shared_weights(config(), GgmlDType::F32);
    let batcher = Arc::new(Batcher::default());
    let seat = batcher.seat();
    let mut model = Phi3Model::new(weights, config().context_length).unwrap();
    let flag = Arc::new(AtomicBool::new(true));
    model.set_interrupt(Arc::clone(&flag));
    let hold = batcher.hold();
    // Held: no pass can run, so only the interrupt check lets this step return.
    let done = seat.step(model, vec![1, 2], Output::Last);
    drop(hold);
    assert!(done.result.is_err());
    assert_eq!(done.model.position(), 0);
    assert_eq!(batcher.pass_counts(), (0, 0));
}
