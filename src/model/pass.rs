//! One forward pass over several sequences at once (continuous batching).
//!
//! Their tokens are stacked into one activation matrix, so every weight matrix is read once
//! per pass however many sequences take part: on a CPU a decode step is bound by reading
//! the weights, and eight sequences' tokens cost little more than one. Attention, RoPE and
//! the KV cache stay per sequence. A single sequence is a pass of one segment, through the
//! same code.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use candle_core::{Module, Result, Tensor, D};

use super::config::Phi3Config;
use super::phi3::{Layer, Phi3Model, Phi3Weights};
use super::{attention, elementwise};

/// What a pass returns for a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Nothing: a prompt chunk before the last (the output projection is vocabulary-sized).
    Nothing,
    /// The next-token logits after the segment's last token, shape (vocab,).
    Last,
    /// The logits at every position of the segment, shape (tokens, vocab).
    All,
}

/// One sequence's part of a pass: its state, the tokens it feeds, what it wants back.
pub struct Segment<'a> {
    pub model: &'a mut Phi3Model,
    pub tokens: &'a [u32],
    pub output: Output,
}

/// A segment taking part in the pass, with its rows and rotation.
struct Active {
    index: usize,
    /// Position of the segment's first token (its cache length before the pass).
    start: usize,
    cos: Tensor,
    sin: Tensor,
}

/// Runs one pass over `segments`: each gets its logits (`None` for `Output::Nothing`) or its
/// error. A segment that fails, or whose interrupt flag is set (checked between layers),
/// drops out with its cache rolled back, as it was before the pass; the others go on.
pub fn forward(segments: &mut [Segment<'_>]) -> Vec<Result<Option<Tensor>>> {
    let mut results: Vec<Option<Result<Option<Tensor>>>> = segments.iter().map(|_| None).collect();
    let mut active = Vec::with_capacity(segments.len());
    let mut weights: Option<Arc<Phi3Weights>> = None;
    for (index, segment) in segments.iter().enumerate() {
        let shared = weights.get_or_insert_with(|| Arc::clone(segment.model.weights()));
        let checked = if Arc::ptr_eq(shared, segment.model.weights()) {
            check(segment).and_then(|()| {
                let start = segment.model.position();
                let (cos, sin) = segment.model.rope().tables(start, segment.tokens.len())?;
                Ok(Active {
                    index,
                    start,
                    cos,
                    sin,
                })
            })
        } else {
            Err(candle_core::Error::Msg(
                "a pass mixes sequences of different models".into(),
            ))
        };
        match checked {
            Ok(a) => active.push(a),
            Err(e) => results[index] = Some(Err(e)),
        }
    }
    if let Some(weights) = weights {
        if !active.is_empty() {
            run(&weights, segments, active, &mut results);
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(candle_core::Error::Msg("not computed".into()))))
        .collect()
}

fn check(segment: &Segment<'_>) -> Result<()> {
    let config = &segment.model.weights().config;
    let tokens = segment.tokens;
    if tokens.is_empty() {
        candle_core::bail!("no tokens to feed the model")
    }
    let end = segment.model.position() + tokens.len();
    if end > config.context_length {
        candle_core::bail!(
            "{end} tokens exceed the context length of {}",
            config.context_length
        )
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
        candle_core::bail!(
            "token id {bad} is outside the model's vocabulary of {}",
            config.vocab_size
        )
    }
    Ok(())
}

/// The pass proper over the checked segments; fills `results` for each of them.
fn run(
    weights: &Phi3Weights,
    segments: &mut [Segment<'_>],
    mut active: Vec<Active>,
    results: &mut [Option<Result<Option<Tensor>>>],
) {
    let outcome = (|| -> Result<()> {
        let ids: Vec<u32> = active
            .iter()
            .flat_map(|a| segments[a.index].tokens.iter().copied())
            .collect();
        let mut xs = weights.embeddings.lookup(&ids)?.unsqueeze(0)?;
        for (layer_index, layer) in weights.layers.iter().enumerate() {
            xs = drop_interrupted(segments, &mut active, results, &xs)?;
            if active.is_empty() {
                return Ok(());
            }
            let attn = attention(layer, layer_index, weights, segments, &active, &xs)?;
            xs = elementwise::add(&xs, &attn)?;
            let ffn = feed_forward(layer, &weights.config, &xs)?;
            xs = elementwise::add(&xs, &ffn)?;
        }
        xs = drop_interrupted(segments, &mut active, results, &xs)?;
        let hidden = weights.output_norm.forward(&xs)?;
        outputs(weights, segments, &active, &hidden, results)
    })();
    if let Err(e) = outcome {
        // A failure of the shared work fails every segment still in the pass.
        let message = e.to_string();
        for a in &active {
            if results[a.index].is_none() {
                segments[a.index].model.truncate(a.start);
                results[a.index] = Some(Err(candle_core::Error::Msg(message.clone())));
            }
        }
    }
}

/// Takes the segments whose interrupt flag is set out of the pass (rolled back) and returns
/// the activations of the rest.
fn drop_interrupted(
    segments: &mut [Segment<'_>],
    active: &mut Vec<Active>,
    results: &mut [Option<Result<Option<Tensor>>>],
    xs: &Tensor,
) -> Result<Tensor> {
    let interrupted: Vec<bool> = active
        .iter()
        .map(|a| {
            segments[a.index]
                .model
                .interrupt_flag()
                .is_some_and(|flag| flag.load(Ordering::Relaxed))
        })
        .collect();
    if !interrupted.contains(&true) {
        return Ok(xs.clone());
    }
    let mut kept_rows = Vec::new();
    let mut row = 0;
    let mut kept = Vec::with_capacity(active.len());
    for (a, stop) in active.drain(..).zip(interrupted) {
        let len = segments[a.index].tokens.len();
        if stop {
            segments[a.index].model.truncate(a.start);
            results[a.index] = Some(Err(candle_core::Error::Msg("interrupted".into())));
        } else {
            kept_rows.push(xs.narrow(1, row, len)?);
            kept.push(a);
        }
        row += len;
    }
    *active = kept;
    match kept_rows.len() {
        0 => Ok(xs.clone()),
        1 => Ok(kept_rows.remove(0)),
        _ => Tensor::cat(&kept_rows, 1),
    }
}

/// The rows of each active segment in turn: `(segment index, first row, rows)`.
fn row_ranges<'s>(
    segments: &'s [Segment<'_>],
    active: &'s [Active],
) -> impl Iterator<Item = (&'s Active, usize, usize)> + 's {
    active.iter().scan(0, move |row, a| {
        let len = segments[a.index].tokens.len();
        let first = *row;
        *row += len;
        Some((a, first, len))
    })
}

fn attention(
    layer: &Layer,
    layer_index: usize,
    weights: &Phi3Weights,
    segments: &mut [Segment<'_>],
    active: &[Active],
    xs: &Tensor,
) -> Result<Tensor> {
    let config = &weights.config;
    let (n_head, n_kv, hd) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let qkv = layer.attn_qkv.forward(&layer.attn_norm.forward(xs)?)?;
    let ranges: Vec<(usize, usize, usize, Tensor, Tensor)> = row_ranges(segments, active)
        .map(|(a, first, len)| (a.index, first, len, a.cos.clone(), a.sin.clone()))
        .collect();
    let mut outs = Vec::with_capacity(ranges.len());
    for (index, first, len, cos, sin) in ranges {
        let qkv = qkv.narrow(1, first, len)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, start * hd, n * hd)?
                .reshape((1, len, n, hd))?
                .transpose(1, 2)
        };
        let model = &mut *segments[index].model;
        let rope = model.rope();
        let q = rope.apply(&heads(0, n_head)?, &cos, &sin)?;
        let k = rope.apply(&heads(n_head, n_kv)?, &cos, &sin)?;
        let v = heads(n_head + n_kv, n_kv)?;
        model.cache_mut(layer_index).append(&k, &v)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let cache = model.cache(layer_index);
        let window = config.sliding_window;
        let out = attention::attend(&q, cache, window, scale, weights.wide_attention)?
            .transpose(1, 2)?
            .reshape((1, len, n_head * hd))?;
        outs.push(out);
    }
    let out = match outs.len() {
        1 => outs.remove(0),
        _ => Tensor::cat(&outs, 1)?,
    };
    layer.attn_output.forward(&out)
}

fn feed_forward(layer: &Layer, config: &Phi3Config, xs: &Tensor) -> Result<Tensor> {
    // One matrix gives the gate and then the up projection.
    let gate_up = layer.ffn_up.forward(&layer.ffn_norm.forward(xs)?)?;
    let hidden = elementwise::swiglu(&gate_up, config.intermediate_size)?;
    layer.ffn_down.forward(&hidden)
}

/// The logits each segment asked for, from one output projection over all their rows.
fn outputs(
    weights: &Phi3Weights,
    segments: &[Segment<'_>],
    active: &[Active],
    hidden: &Tensor,
    results: &mut [Option<Result<Option<Tensor>>>],
) -> Result<()> {
    // Rows to project, per segment: (index, first projected row, rows).
    let mut wanted = Vec::new();
    let mut picked = Vec::new();
    let mut projected = 0;
    for (a, first, len) in row_ranges(segments, active) {
        let (from, rows) = match segments[a.index].output {
            Output::Nothing => {
                results[a.index] = Some(Ok(None));
                continue;
            }
            Output::Last => (first + len - 1, 1),
            Output::All => (first, len),
        };
        picked.push(hidden.narrow(1, from, rows)?);
        wanted.push((a.index, projected, rows));
        projected += rows;
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let rows = match picked.len() {
        1 => picked.remove(0),
        _ => Tensor::cat(&picked, 1)?,
    };
    let logits = weights.output.forward(&rows)?.squeeze(0)?;
    for (index, first, rows) in wanted {
        let mine = logits.narrow(0, first, rows)?;
        let value = match segments[index].output {
            Output::Last => mine.squeeze(0)?,
            _ => mine,
        };
        results[index] = Some(Ok(Some(value)));
    }
    Ok(())
}

/// A sequence alone is a pass of one.
impl Phi3Model {
    /// Feeds `tokens` and returns the next-token logits after the last one, shape (vocab,).
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor> {
        self.pass_alone(tokens, Output::Last)
            .and_then(|t| t.ok_or_else(|| candle_core::Error::Msg("no logits".into())))
    }

    /// Feeds `tokens` into the cache without computing logits (a prompt chunk that is not
    /// the last one: the output projection is a vocabulary-sized product).
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.pass_alone(tokens, Output::Nothing).map(drop)
    }

    /// Feeds `tokens` and returns the logits at every position, shape (tokens, vocab).
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Tensor> {
        self.pass_alone(tokens, Output::All)
            .and_then(|t| t.ok_or_else(|| candle_core::Error::Msg("no logits".into())))
    }

    /// A pass of this sequence alone. One that fails (or is interrupted) leaves the cache as
    /// it was, so the sequence can go on, and a retry computes the same result.
    fn pass_alone(&mut self, tokens: &[u32], output: Output) -> Result<Option<Tensor>> {
        let mut segment = [Segment {
            model: self,
            tokens,
            output,
        }];
        let [result] = <[_; 1]>::try_from(forward(&mut segment))
            .map_err(|_| candle_core::Error::Msg("a pass of one gave another count".into()))?;
        result
    }
}
