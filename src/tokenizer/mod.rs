//! The tokenizer: encoding prompts, knowing which tokens end a turn, and streaming text out
//! with `tokenizers`' incremental decoder.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::ModelMetadata;

mod gguf;
mod pre;
mod stream;

pub use stream::TextStream;

/// Tokens that end a turn or a document in the Phi family and its relatives.
const END_TOKEN_NAMES: &[&str] = &["<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"];

/// A special (control) token and how it absorbs neighbouring whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    pub id: u32,
    pub lstrip: bool,
    pub rstrip: bool,
}

#[derive(Debug)]
pub struct Phi3Tokenizer {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token matching off, for text that must stay text.
    plain: Tokenizer,
    special_tokens: Vec<SpecialToken>,
    /// Finds special-token text in one pass, leftmost first, the longest at a position (as
    /// `tokenizers` matches added tokens).
    special_matcher: AhoCorasick,
    /// Tokens the post-processor puts before any prompt (BOS for Phi-3).
    prompt_prefix: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    end_token_ids: Vec<u32>,
    path: PathBuf,
    /// Added tokens a byte-level decoder would garble ("ü" read as GPT-2's byte 0xFC):
    /// decoded as their text, as llama.cpp and transformers do. Empty for other decoders.
    verbatim: HashMap<u32, (String, bool)>,
}

impl Phi3Tokenizer {
    /// Loads `tokenizer.json` and checks it against the model it will serve.
    pub fn from_file(path: &Path, model: &ModelMetadata, vocab_size: usize) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::TokenizerNotFound {
                path: path.to_path_buf(),
            });
        }
        let invalid = |detail: String| Error::TokenizerInvalid {
            path: path.to_path_buf(),
            detail,
        };
        let tokenizer = Tokenizer::from_file(path).map_err(|e| invalid(e.to_string()))?;
        Self::new(tokenizer, path, model, vocab_size, invalid)
    }

    /// The tokenizer the GGUF at `path` describes in its metadata.
    pub fn from_gguf(path: &Path, model: &ModelMetadata, vocab_size: usize) -> Result<Self> {
        let invalid = |detail: String| Error::GgufTokenizer {
            path: path.to_path_buf(),
            detail,
        };
        let tokenizer = gguf::build(&model.vocab).map_err(invalid)?;
        Self::new(tokenizer, path, model, vocab_size, invalid)
    }

    /// The tokenizer of the GGUF at `path` alone, without its weights (which it need not
    /// have: llama.cpp's vocab-only files work).
    pub fn from_gguf_metadata(path: &Path) -> Result<Self> {
        let metadata = crate::model::metadata(path)?;
        let vocab_size = metadata.vocab.tokens.as_ref().map_or(0, Vec::len);
        Self::from_gguf(path, &metadata, vocab_size)
    }

    fn new(
        mut tokenizer: Tokenizer,
        path: &Path,
        model: &ModelMetadata,
        vocab_size: usize,
        invalid: impl Fn(String) -> Error,
    ) -> Result<Self> {
        // Generation never pads or truncates; a file asking for padding to 10**9 tokens
        // would make every encode allocate gigabytes.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?;
        check_against_model(&tokenizer, model, vocab_size)?;

        let mut end_token_ids: Vec<u32> = END_TOKEN_NAMES
            .iter()
            .filter_map(|name| tokenizer.token_to_id(name))
            .chain(model.eos_token_id)
            .chain(model.eot_token_id)
            .filter(|&id| (id as usize) < vocab_size)
            .collect();
        end_token_ids.sort_unstable();
        end_token_ids.dedup();

        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let mut special_tokens: Vec<SpecialToken> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| SpecialToken {
                content: t.content,
                id,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
            })
            .collect();
        special_tokens.sort_by_key(|t| t.id);
        let special_matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(special_tokens.iter().map(|t| t.content.as_str()))
            .map_err(|e| invalid(format!("its special tokens cannot be matched: {e}")))?;
        let probe = tokenizer
            .encode("a", true)
            .map_err(|e| invalid(e.to_string()))?;
        // Ids the post-processor adds (BOS, ...) must be the model's too.
        if let Some(&bad) = probe
            .get_ids()
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(Error::TokenizerMismatch {
                detail: format!(
                    "it adds token id {bad} to every prompt, but the model's vocabulary has only {vocab_size} entries"
                ),
            });
        }
        let prompt_prefix = probe
            .get_ids()
            .iter()
            .zip(probe.get_special_tokens_mask())
            .take_while(|(_, &special)| special == 1)
            .map(|(&id, _)| id)
            .collect();
        let token_text = |id: Option<u32>, fallback: &str| {
            id.and_then(|id| tokenizer.id_to_token(id)).or_else(|| {
                tokenizer
                    .token_to_id(fallback)
                    .map(|_| fallback.to_string())
            })
        };
        let byte_level = matches!(
            tokenizer.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let verbatim = match byte_level {
            true => tokenizer
                .get_added_tokens_decoder()
                .into_iter()
                .map(|(id, t)| (id, (t.content, t.special)))
                .collect(),
            false => HashMap::new(),
        };
        let bos_token = token_text(model.bos_token_id, "<s>");
        let eos_token = token_text(model.eos_token_id, "<|endoftext|>");
        Ok(Self {
            tokenizer,
            plain,
            special_tokens,
            special_matcher,
            prompt_prefix,
            bos_token,
            eos_token,
            end_token_ids,
            path: path.to_path_buf(),
            verbatim,
        })
    }

    pub fn special_tokens(&self) -> &[SpecialToken] {
        &self.special_tokens
    }

    /// Where special-token text occurs in `text`, in order, without overlaps: one pass,
    /// however many tokens and matches there are.
    pub fn find_special_tokens<'a>(
        &'a self,
        text: &'a str,
    ) -> impl Iterator<Item = (Range<usize>, &'a SpecialToken)> + 'a {
        self.special_matcher
            .find_iter(text)
            .map(|m| (m.range(), &self.special_tokens[m.pattern().as_usize()]))
    }

    /// Tokens the tokenizer puts before every prompt (e.g. BOS).
    pub fn prompt_prefix(&self) -> &[u32] {
        &self.prompt_prefix
    }

    pub fn bos_token(&self) -> Option<String> {
        self.bos_token.clone()
    }

    pub fn eos_token(&self) -> Option<String> {
        self.eos_token.clone()
    }

    /// Encodes text in which special-token text is plain text, without BOS.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.plain
            .encode(text, false)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| Error::Tokenization {
                detail: e.to_string(),
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids that end generation unless the caller says otherwise.
    pub fn end_token_ids(&self) -> &[u32] {
        &self.end_token_ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Encodes text, its special-token text as control tokens when `parse_special`.
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let tokenizer = if parse_special {
            &self.tokenizer
        } else {
            &self.plain
        };
        tokenizer
            .encode(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| Error::Tokenization {
                detail: e.to_string(),
            })
    }

    /// Encodes text; special-token text such as `<|user|>` becomes its control token.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| Error::Tokenization {
                detail: e.to_string(),
            })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let decode = |ids: &[u32]| {
            self.tokenizer
                .decode(ids, skip_special_tokens)
                .map_err(|e| Error::Tokenization {
                    detail: e.to_string(),
                })
        };
        if self.verbatim.is_empty() {
            return decode(ids);
        }
        let mut text = String::new();
        let mut run_start = 0;
        for (i, id) in ids.iter().enumerate() {
            if let Some((content, special)) = self.verbatim.get(id) {
                text += &decode(&ids[run_start..i])?;
                if !(skip_special_tokens && *special) {
                    text += content;
                }
                run_start = i + 1;
            }
        }
        text += &decode(&ids[run_start..])?;
        Ok(text)
    }
}

/// A tokenizer for another model gives silent garbage; catch the common mismatches at load.
fn check_against_model(
    tokenizer: &Tokenizer,
    model: &ModelMetadata,
    vocab_size: usize,
) -> Result<()> {
    let largest = tokenizer
        .get_vocab(true)
        .into_iter()
        .max_by_key(|(_, id)| *id);
    if let Some((token, id)) = largest {
        if id as usize >= vocab_size {
            return Err(Error::TokenizerMismatch {
                detail: format!(
                    "the tokenizer has token {token:?} at id {id}, but the model's vocabulary has only {vocab_size} entries"
                ),
            });
        }
    }
    if let Some(gguf_tokens) = &model.vocab.tokens {
        for (id, added) in tokenizer.get_added_tokens_decoder() {
            if !added.special {
                continue;
            }
            if let Some(expected) = gguf_tokens.get(id as usize) {
                if *expected != added.content {
                    return Err(Error::TokenizerMismatch {
                        detail: format!(
                            "token {id} is {:?} in the tokenizer but {expected:?} in the GGUF",
                            added.content
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}
