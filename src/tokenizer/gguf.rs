//! The tokenizer a GGUF carries in its `tokenizer.ggml.*` metadata, built as a
//! `tokenizers::Tokenizer` from that library's own models, normalizers, pre-tokenizers and
//! decoders, so that it encodes as llama.cpp does with the same file:
//!
//! * SentencePiece (`llama`): a BPE model whose merges come from the pieces' scores (the
//!   way Hugging Face's converters turn a SentencePiece model into BPE: every split of a
//!   piece into two pieces is a merge, ranked by the score of the whole), byte fallback,
//!   `▁` for spaces and one before every run of text when `add_space_prefix`.
//! * BPE (`gpt2`): the file's merges over GPT-2's byte mapping, after the splitting rule
//!   `tokenizer.ggml.pre` names (see `pre.rs`).
//!
//! Control, unknown and user-defined tokens become added tokens, matched before the model,
//! and the token types are corrected as llama.cpp corrects them at load.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::pre;
use crate::gguf::GgufVocab;

/// SentencePiece's stand-in for a space.
const SPACE: &str = "\u{2581}";

/// Pieces longer than this get no merges: SentencePiece can only build a piece by merging,
/// and looking up every split of a hostile megabyte-long "piece" would take quadratic time.
const MAX_MERGED_PIECE_BYTES: usize = 1024;

/// GGUF token types, as llama.cpp numbers them.
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
}

/// Texts llama.cpp treats as control tokens whatever their stated type: it finds
/// end-of-generation and fill-in-the-middle tokens by their text (llama-vocab.cpp).
const CONTROL_LOOKING: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
    "<PRE>",
    "\u{2581}<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
    "<SUF>",
    "\u{2581}<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
    "<MID>",
    "\u{2581}<MID>",
    "<|code_middle|>",
    "<|middle|>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// gpt-oss's message-structure tokens, which llama.cpp always renders (user-defined).
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// Builds the tokenizer; the error says what the file lacks or holds that cannot work.
pub fn build(v: &GgufVocab) -> Result<Tokenizer, String> {
    let tokens = v
        .tokens
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or("it has no tokenizer.ggml.tokens (or more tokens than supported)")?;
    if tokens.len() > u32::MAX as usize {
        return Err("it has more tokens than ids".into());
    }
    // Text to id; a text listed twice keeps its last id, as in llama.cpp's map.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let kind = v.model.as_deref().unwrap_or("");
    let (mut tokenizer, adds_bos) = match kind {
        "llama" => (sentencepiece(v, tokens, &vocab)?, true),
        "gpt2" => byte_level_bpe(v, &vocab)?,
        "" => return Err("it names no tokenizer model (tokenizer.ggml.model)".into()),
        other => {
            return Err(format!(
                "its tokenizer type {other:?} is not supported (only \"llama\", SentencePiece, and \"gpt2\", BPE)"
            ))
        }
    };
    let (special, user_defined) = added_tokens(v, tokens, &vocab);
    tokenizer
        .add_special_tokens(special)
        .and_then(|_| tokenizer.add_tokens(user_defined))
        .map_err(|e| e.to_string())?;
    let token =
        |id: Option<u32>| id.and_then(|id| tokens.get(id as usize).map(|t| (t.clone(), id)));
    let bos = token(v.bos_token_id).filter(|_| v.add_bos_token.unwrap_or(adds_bos));
    let eos = token(v.eos_token_id).filter(|_| v.add_eos_token.unwrap_or(false));
    if bos.is_some() || eos.is_some() {
        tokenizer.with_post_processor(Some(template(bos, eos)?));
    }
    Ok(tokenizer)
}

fn sentencepiece(v: &GgufVocab, tokens: &[String], vocab: &Vocab) -> Result<Tokenizer, String> {
    let score = |id: u32| {
        v.scores
            .as_ref()
            .and_then(|s| s.get(id as usize).copied())
            .filter(|s| s.is_finite())
            .unwrap_or(0.0)
    };
    // Every way to cut a piece into two pieces is a merge, ranked by the whole's score
    // (SentencePiece merges the best-scoring pair first), then by id for equal scores.
    let mut merges: Vec<(f64, u32, u32, u32)> = Vec::new();
    for (piece, &id) in vocab {
        if piece.len() > MAX_MERGED_PIECE_BYTES {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(cut);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((score(id), id, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    let text = |id: u32| tokens[id as usize].clone();
    let merges = merges
        .into_iter()
        .map(|(_, _, l, r)| (text(l), text(r)))
        .collect();
    let mut model = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = v.unknown_token_id.and_then(|id| tokens.get(id as usize)) {
        model = model.unk_token(unk.clone());
    }
    let model = model.build().map_err(|e| e.to_string())?;
    let add_space_prefix = v.add_space_prefix.unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPACE.into()).into());
    }
    normalizers.push(Replace::new(" ", SPACE).map_err(|e| e.to_string())?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE, " ").map_err(|e| e.to_string())?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| e.to_string())?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

fn byte_level_bpe(v: &GgufVocab, vocab: &Vocab) -> Result<(Tokenizer, bool), String> {
    let pre = v.pre.as_deref();
    let Some(rule) = pre::rule(pre) else {
        let name = pre.unwrap_or_default();
        return Err(if pre::UNSUPPORTED.contains(&name) {
            format!("its pre-tokenizer {name:?} splits text in a way candle-phi cannot build")
        } else {
            format!("its pre-tokenizer {name:?} is not one llama.cpp knows")
        });
    };
    let listed = v
        .merges
        .as_deref()
        .ok_or("it has no tokenizer.ggml.merges (or more than supported)")?;
    // "left right", split at the first space after the first character (a piece may
    // start with a space); merges whose parts or result are not tokens cannot apply.
    let mut seen = std::collections::HashSet::new();
    let merges: Vec<(String, String)> = listed
        .iter()
        .filter_map(|merge| {
            let cut = merge.char_indices().skip(1).find(|&(_, c)| c == ' ')?.0;
            let (left, right) = (&merge[..cut], &merge[cut + 1..]);
            let joined = format!("{left}{right}");
            let known = vocab.contains_key(left)
                && vocab.contains_key(right)
                && vocab.contains_key(&joined);
            (known && seen.insert((left, right))).then(|| (left.to_string(), right.to_string()))
        })
        .collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .ignore_merges(rule.ignore_merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for pattern in rule.patterns {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("its pre-tokenizer's pattern {pattern:?}: {e}"))?;
        steps.push(split.into());
    }
    steps.push(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, false).into());
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok((tokenizer, rule.adds_bos))
}

/// Control and unknown tokens (special: skipped when decoding, and plain text when
/// special tokens are not parsed), then user-defined ones (always matched, as text).
fn added_tokens(
    v: &GgufVocab,
    tokens: &[String],
    vocab: &Vocab,
) -> (Vec<AddedToken>, Vec<AddedToken>) {
    let stated = |id: usize| {
        v.token_types
            .as_ref()
            .and_then(|t| t.get(id).copied())
            .map_or(token_type::NORMAL, |t| t as i64)
    };
    let harmony = ["<|return|>", "<|call|>"]
        .iter()
        .all(|t| vocab.contains_key(*t))
        || ["<|calls|>", "<|flush|>"]
            .iter()
            .all(|t| vocab.contains_key(*t));
    let name = v.model_name.as_deref().unwrap_or("").to_lowercase();
    let phi3 = name.contains("phi-3") || name.contains("phi3");
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        // Only the id a text maps to can be matched; an empty text cannot be.
        if text.is_empty() || vocab.get(text) != Some(&(id as u32)) {
            continue;
        }
        let mut kind = stated(id);
        if CONTROL_LOOKING.contains(&text.as_str())
            && matches!(
                kind,
                token_type::NORMAL | token_type::USER_DEFINED | token_type::UNUSED
            )
        {
            kind = token_type::CONTROL;
        }
        if ALWAYS_RENDERED.contains(&text.as_str()) || (harmony && text == "<|end|>") {
            kind = token_type::USER_DEFINED;
        }
        // Phi-3's tokenizer.json strips the whitespace after its chat tokens.
        let rstrip = phi3 && !matches!(text.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
        let token = |is_special| {
            AddedToken::from(text.clone(), is_special)
                .normalized(false)
                .rstrip(rstrip)
        };
        match kind {
            token_type::CONTROL | token_type::UNKNOWN => special.push(token(true)),
            token_type::USER_DEFINED => user_defined.push(token(false)),
            _ => {}
        }
    }
    (special, user_defined)
}

/// BOS before, EOS after every sequence. The template names them "bos" and "eos", so that
/// no token text has to survive the template syntax.
fn template(
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> Result<TemplateProcessing, String> {
    let mut single = Vec::new();
    let mut specials = Vec::new();
    for (key, token) in [("bos", &bos), ("eos", &eos)] {
        if let Some((text, id)) = token {
            specials.push(
                SpecialToken::new(key.into(), vec![*id], vec![text.clone()])
                    .map_err(|e| e.to_string())?,
            );
        }
    }
    if bos.is_some() {
        single.push("bos");
    }
    single.push("$A");
    if eos.is_some() {
        single.push("eos");
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|p| if *p == "$A" { "$B:1" } else { p }));
    let pair: Vec<String> = pair
        .iter()
        .enumerate()
        .map(|(i, p)| match (i >= single.len(), *p) {
            (true, "$B:1") => p.to_string(),
            (true, _) => format!("{p}:1"),
            (false, _) => p.to_string(),
        })
        .collect();
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| e.to_string())?
        .special_tokens(specials)
        .build()
        .map_err(|e| e.to_string())
}
