//! Token log-probabilities as OpenAI and llama.cpp report them: the log-softmax of the
//! model's raw logits, before temperature, penalties and filters.

/// One generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// (token id, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Most alternatives one position may report (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log-probability of `token` under `logits`, with the `top` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64: a sum over 32k terms in f32 loses the last digits the comparison with a
    // reference would see.
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_norm = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_norm) as f32;
    TokenLogprob {
        token_id: token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob(l)),
        top: most_likely(logits, top)
            .into_iter()
            .map(|id| (id, logprob(logits[id as usize])))
            .collect(),
    }
}

/// The ids of the `k` largest logits, largest first (ties: lower id first).
fn most_likely(logits: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(logits.len());
    let mut best: Vec<u32> = Vec::with_capacity(k + 1);
    let better = |a: u32, b: u32| {
        let (la, lb) = (logits[a as usize], logits[b as usize]);
        la > lb || (la == lb && a < b)
    };
    if k == 0 {
        return best;
    }
    for id in 0..logits.len() as u32 {
        if best.len() == k && !better(id, best[k - 1]) {
            continue;
        }
        let at = best.partition_point(|&b| better(b, id));
        best.insert(at, id);
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let lp = token_logprob(&logits, 2, 3);
        let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(lp.logprob) - (2.0 - total.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 3, 2]);
        let mass: f64 = (0..5)
            .map(|i| f64::from(token_logprob(&logits, i, 0).logprob).exp())
            .sum();
        assert!((mass - 1.0).abs() < 1e-6);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 0, 50).top.len(), 5);
    }
}
