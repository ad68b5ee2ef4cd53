//! The tokenizer: encoding prompts, knowing which tokens end a turn, and streaming text out
//! with `tokenizers`' incremental decoder.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::ModelMetadata;

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
}

impl Phi3Tokenizer {
    /// Loads `tokenizer.json` and checks it against the model it will serve.
    pub fn from_file(path: &Path, model: &ModelMetadata, vocab_size: usize) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::TokenizerNotFound {
                path: path.to_path_buf(),
            });
        }
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| Error::TokenizerInvalid {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        // Generation never pads or truncates; a file asking for padding to 10**9 tokens
        // would make every encode allocate gigabytes.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::TokenizerInvalid {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
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
            .map_err(|e| Error::TokenizerInvalid {
                path: path.to_path_buf(),
                detail: format!("its special tokens cannot be matched: {e}"),
            })?;
        let encode_err = |e: tokenizers::Error| Error::TokenizerInvalid {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        let probe = tokenizer.encode("a", true).map_err(encode_err)?;
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
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenization {
                detail: e.to_string(),
            })
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
    if let Some(gguf_tokens) = &model.tokens {
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

/// Turns generated token ids into text as they come, never splitting a UTF-8 character and
/// never decoding the whole sequence again. Joined, its pieces equal the decode of all ids.
#[derive(Debug)]
pub struct TextStream {
    tokenizer: Arc<Phi3Tokenizer>,
    /// The decoder's state, as `tokenizers::DecodeStream` keeps it, but owned.
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl TextStream {
    pub fn new(tokenizer: Arc<Phi3Tokenizer>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let context = self.ids.clone();
        let stepped = tokenizers::tokenizer::step_decode_stream(
            &self.tokenizer.tokenizer,
            vec![id],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        );
        match stepped {
            Ok(text) => Ok(text),
            Err(_) => {
                self.ids = context;
                self.ids.push(id);
                self.resync()
            }
        }
    }

    /// Continues after text already released has changed in the full decode, which
    /// `tokenizers`' ByteFallback does when a byte token turns a run of bytes invalid: the
    /// valid `<0x1A>` released alone decodes as U+FFFD once `<0xDA>` follows it. Released
    /// text cannot be taken back, so this releases what follows the part the two decodes
    /// share, and only there do the joined pieces differ from the full decode.
    fn resync(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.ids, true)?;
        let shared: usize = text
            .char_indices()
            .zip(self.prefix.chars())
            .take_while(|((_, a), b)| a == b)
            .map(|((_, a), _)| a.len_utf8())
            .sum();
        let released = text[shared..].to_string();
        self.ids.drain(..self.prefix_index);
        self.prefix = self.tokenizer.decode(&self.ids, true)?;
        self.prefix_index = self.ids.len();
        Ok((!released.is_empty()).then_some(released))
    }

    /// Text still held back at the end (an incomplete character decodes as U+FFFD, exactly
    /// as a full decode would show it).
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.ids.len() <= self.prefix_index {
            return Ok(None);
        }
        let text = self.tokenizer.decode(&self.ids, true)?;
        self.ids.clear();
        let rest = text.strip_prefix(self.prefix.as_str()).unwrap_or(&text);
        let rest = (!rest.is_empty()).then(|| rest.to_string());
        self.prefix.clear();
        self.prefix_index = 0;
        Ok(rest)
    }
}
