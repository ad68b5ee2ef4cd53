//! Streaming decode: token ids to text as they are generated.

use std::sync::Arc;

use super::Phi3Tokenizer;
use crate::error::Result;

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

    /// Adds one token; returns the text it completes, if any. The step of `tokenizers`'
    /// `DecodeStream`, over `Phi3Tokenizer::decode` (which keeps added tokens verbatim).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        // An incomplete UTF-8 character decodes as U+FFFD: wait for the rest of it.
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new_text) = text.strip_prefix(self.prefix.as_str()) else {
            return self.resync();
        };
        let new_text = new_text.to_string();
        let new_prefix_index = self.ids.len() - self.prefix_index;
        self.ids.drain(..self.prefix_index);
        self.prefix = self.tokenizer.decode(&self.ids, true)?;
        self.prefix_index = new_prefix_index;
        Ok(Some(new_text))
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
