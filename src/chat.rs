//! Chat messages to prompt tokens: the GGUF's own `tokenizer.chat_template` (Jinja, rendered
//! with minijinja) or the Phi-3 format, encoded so that no message text can become a
//! control token.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use minijinja::{context, Environment, ErrorKind};

use crate::error::{Error, Result};
use crate::sandbox::{self, Limits, Stopped};
use crate::tokenizer::Phi3Tokenizer;

/// The template's instruction budget: a fixed part plus a part per message, at most
/// `FUEL_MAX`. Real chat templates spend ~10-200 instructions per message; a hostile one
/// runs out of fuel in a fraction of a second.
const FUEL_BASE: u64 = 100_000;
const FUEL_PER_MESSAGE: u64 = 1_000;
const FUEL_MAX: u64 = 2_000_000;
/// Macro and include depth (real chat templates use none or one or two).
const RECURSION_LIMIT: usize = 64;
/// The longest prompt text a template may write: a fixed part plus a multiple of the
/// messages' own text, so that a template cannot turn a short chat into gigabytes.
const OUTPUT_BASE: usize = 1 << 20;
const OUTPUT_PER_CONTENT_BYTE: usize = 4;
/// The longest template source accepted (real ones are 1-20 KB). minijinja's parser
/// recurses once per `not` or filter in a chain: the deepest template this long needs
/// 16-32 MiB of stack (measured, see the test below), and compiles get `COMPILE_STACK`.
pub const MAX_TEMPLATE_BYTES: usize = 256 << 10;
/// Memory and time of a render or compilation, in the sandbox (`crate::sandbox`): fixed
/// parts plus parts that scale with the conversation.
const MEMORY_BASE: usize = 128 << 20;
const MEMORY_PER_CONTENT_BYTE: usize = 16;
const TIME_BASE: Duration = Duration::from_secs(5);
const TIME_PER_MESSAGE: Duration = Duration::from_micros(200);
const COMPILE_STACK: usize = 64 << 20;
/// A render's stack grows with its fuel. Values can nest (`[[[x]]]`, built in a loop) up to
/// about one level per instruction, and printing, comparing, serialising or dropping them
/// recurses once per level (printing, the deepest, was measured at ~330 bytes per level):
/// with 1 KiB per unit of fuel, no nesting the fuel can build overflows it. Only the pages
/// used are committed.
const STACK_BASE: usize = 32 << 20;
const STACK_PER_FUEL: usize = 1 << 10;

/// Phi-3's format, used when the GGUF carries no template of its own.
pub const PHI3_CHAT_TEMPLATE: &str = "{% for message in messages %}\
<|{{ message.role }}|>\n{{ message.content }}<|end|>\n\
{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn parse(role: &str) -> Option<Self> {
        match role {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// A compiled chat template, run in a sandbox.
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// Why the template was stopped once (memory or time): it is not run again, so that a
    /// hostile template costs at most one sandbox budget.
    stopped: Mutex<Option<String>>,
}

impl ChatTemplate {
    /// Compiles the GGUF's template; one that minijinja cannot compile is an error that
    /// names the model's template, since a wrong format silently degrades every answer.
    pub fn new(source: Option<&str>) -> Result<Self> {
        let source = source.unwrap_or(PHI3_CHAT_TEMPLATE).to_string();
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(Error::Template {
                detail: format!(
                    "the model's chat template has {} bytes, more than the {MAX_TEMPLATE_BYTES} accepted; chat formats need a few kilobytes",
                    source.len()
                ),
            });
        }
        warm_up_minijinja();
        let limits = Limits {
            memory: MEMORY_BASE
                .saturating_add(source.len().saturating_mul(MEMORY_PER_CONTENT_BYTE)),
            time: TIME_BASE,
            stack: COMPILE_STACK,
        };
        let env = sandbox::run(limits, &AtomicBool::new(false), move || compile(source)).map_err(
            |stopped| Error::Template {
                detail: format!("the model's chat template could not be compiled: {stopped}"),
            },
        )??;
        Ok(Self {
            env: Arc::new(env),
            stopped: Mutex::new(None),
        })
    }

    /// The prompt text for `messages`, as the template writes it. Setting `interrupt`
    /// stops the render with `Error::Interrupted`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokenizer: &Phi3Tokenizer,
        interrupt: &AtomicBool,
    ) -> Result<String> {
        let contents: Vec<String> = messages.iter().map(|m| m.content.clone()).collect();
        self.render_with(
            messages,
            contents,
            add_generation_prompt,
            tokenizer,
            interrupt,
        )
    }

    fn render_with(
        &self,
        messages: &[ChatMessage],
        contents: Vec<String>,
        add_generation_prompt: bool,
        tokenizer: &Phi3Tokenizer,
        interrupt: &AtomicBool,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid_argument(
                "messages",
                "[]",
                "Pass at least one message",
            ));
        }
        let poisoned = |detail: String| {
            Error::Template {
            detail: format!("the model's chat template was stopped: {detail}; the GGUF's tokenizer.chat_template is broken or hostile"),
        }
        };
        if let Some(why) = self
            .stopped
            .lock()
            .map_err(|_| poisoned("earlier".into()))?
            .clone()
        {
            return Err(poisoned(why));
        }
        let content_bytes: usize = contents.iter().map(String::len).sum();
        let fuel = FUEL_BASE
            .saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64))
            .min(FUEL_MAX);
        // Cloned here, not in the sandbox: the clone takes a lock of the shared environment,
        // which a sandbox stopped at that moment would hold forever.
        let mut env = (*self.env).clone();
        env.set_fuel(Some(fuel));
        let render = Render {
            env,
            messages: messages
                .iter()
                .zip(contents)
                .map(|(m, content)| (m.role.as_str(), content))
                .collect(),
            add_generation_prompt,
            bos_token: tokenizer.bos_token().unwrap_or_default(),
            eos_token: tokenizer.eos_token().unwrap_or_default(),
            fuel,
            output_limit: content_bytes
                .saturating_mul(OUTPUT_PER_CONTENT_BYTE)
                .saturating_add(OUTPUT_BASE),
        };
        let limits = Limits {
            memory: MEMORY_BASE
                .saturating_add(content_bytes.saturating_mul(MEMORY_PER_CONTENT_BYTE)),
            time: TIME_BASE.saturating_add(TIME_PER_MESSAGE.saturating_mul(messages.len() as u32)),
            stack: STACK_BASE.saturating_add(STACK_PER_FUEL.saturating_mul(fuel as usize)),
        };
        match sandbox::run(limits, interrupt, move || render.run()) {
            Ok(result) => result,
            Err(Stopped::Interrupted) => Err(Error::Interrupted),
            // Not the template's fault (the system is short of threads): try again later.
            Err(stopped @ Stopped::Thread(_)) => Err(Error::Template {
                detail: stopped.to_string(),
            }),
            Err(stopped) => {
                // Over its memory or time, or a bug: the same would happen again.
                let why = stopped.to_string();
                if let Ok(mut slot) = self.stopped.lock() {
                    *slot = Some(why.clone());
                }
                Err(poisoned(why))
            }
        }
    }

    /// Prompt token ids for `messages`. Control tokens come only from the template: in each
    /// message, special-token text is broken by an invisible marker before rendering, the
    /// result is split at the special tokens that remain (the template's), and each text
    /// span is encoded, markers removed, with special-token matching off. So `<|end|>` typed
    /// by a user stays plain text, while template filters (`.strip()`, ...) still apply.
    pub fn encode(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokenizer: &Phi3Tokenizer,
        interrupt: &AtomicBool,
    ) -> Result<Vec<u32>> {
        let escaped: Vec<String> = messages
            .iter()
            .map(|m| escape(&m.content, tokenizer))
            .collect();
        let rendered = self.render_with(
            messages,
            escaped,
            add_generation_prompt,
            tokenizer,
            interrupt,
        )?;

        let mut ids = Vec::new();
        let (mut last, mut strip_start) = (0, false);
        for (range, special) in tokenizer.find_special_tokens(&rendered) {
            // Inside escaped message text: a token of one character cannot be broken by
            // markers, so one between two markers is text.
            let marked =
                rendered[..range.start].ends_with(MARK) && rendered[range.end..].starts_with(MARK);
            if marked {
                continue;
            }
            let text = &rendered[last..range.start];
            encode_span(tokenizer, text, strip_start, special.lstrip, &mut ids)?;
            ids.push(special.id);
            last = range.end;
            strip_start = special.rstrip;
        }
        encode_span(tokenizer, &rendered[last..], strip_start, false, &mut ids)?;
        let prefix = tokenizer.prompt_prefix();
        if !ids.starts_with(prefix) {
            ids.splice(0..0, prefix.iter().copied());
        }
        Ok(ids)
    }
}

/// Runs minijinja's process-wide one-time initialisers (default callbacks, the small-integer
/// format cache) on an ordinary thread, so that a sandbox stopped inside one of them can
/// never leave it locked for every other thread.
fn warm_up_minijinja() {
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        let _ = Environment::empty();
        let env = Environment::new();
        let _ = env.render_str(
            "{% autoescape true %}{{ 1 }}{{ 'x' }}{% endautoescape %}{{ 1 }}{{ 1.5 }}",
            (),
        );
    });
}

/// The environment chat templates run in: Hugging Face's helpers, bounded recursion.
fn compile(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_recursion_limit(RECURSION_LIMIT);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template_owned("chat", source)
        .map_err(|e| Error::Tokenization {
            detail: format!("the model's chat template does not compile: {e}"),
        })?;
    Ok(env)
}

/// One render, owning what it needs: it runs on the sandbox's thread.
struct Render {
    env: Environment<'static>,
    messages: Vec<(&'static str, String)>,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
    fuel: u64,
    output_limit: usize,
}

impl Render {
    fn run(self) -> Result<String> {
        let messages: Vec<_> = self
            .messages
            .iter()
            .map(|(role, content)| context! { role => role, content => content })
            .collect();
        let count = messages.len();
        let template = self.env.get_template("chat").map_err(|e| Error::Template {
            detail: e.to_string(),
        })?;
        let mut out = BoundedWriter {
            bytes: Vec::new(),
            limit: self.output_limit,
        };
        let rendered = template.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => self.add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
            &mut out,
        );
        let (fuel, limit) = (self.fuel, self.output_limit);
        match rendered {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| Error::Template {
                detail: "it wrote text that is not valid UTF-8".into(),
            }),
            Err(e) => Err(match e.kind() {
                // `raise_exception(...)`: the template's own verdict on the conversation.
                ErrorKind::InvalidOperation => Error::invalid_argument(
                    "messages",
                    "(the conversation)",
                    format!(
                        "The model's chat template rejects it: {}",
                        e.detail().unwrap_or("rejected")
                    ),
                ),
                ErrorKind::OutOfFuel => Error::Template {
                    detail: format!(
                        "it ran more than {fuel} instructions for {count} messages, far more than a chat format needs; the GGUF's tokenizer.chat_template is broken or hostile"
                    ),
                },
                ErrorKind::WriteFailure => Error::Template {
                    detail: format!(
                        "it wrote more than {limit} bytes for these messages; the GGUF's tokenizer.chat_template is broken or hostile"
                    ),
                },
                _ => Error::Template {
                    detail: e.to_string(),
                },
            }),
        }
    }
}

/// Encodes one span of rendered text between special tokens, markers removed; `rstrip` /
/// `lstrip` neighbours swallow its leading / trailing whitespace, as in a full encode.
fn encode_span(
    tokenizer: &Phi3Tokenizer,
    text: &str,
    strip_start: bool,
    strip_end: bool,
    ids: &mut Vec<u32>,
) -> Result<()> {
    let span = text.replace(MARK, "");
    let mut span = span.as_str();
    if strip_start {
        span = span.trim_start();
    }
    if strip_end {
        span = span.trim_end();
    }
    if !span.is_empty() {
        ids.extend(tokenizer.encode_plain(span)?);
    }
    Ok(())
}

/// A Unicode private-use character: inert for templates and tokenizers alike.
const MARK: char = '\u{E000}';

/// Breaks every special-token text in `content` so that it can no longer match, in one
/// pass: a marker before, after and between the characters of each match, so that no
/// token of two or more characters can match across or inside it either.
fn escape(content: &str, tokenizer: &Phi3Tokenizer) -> String {
    let content = content.replace(MARK, "");
    let mut out = String::with_capacity(content.len());
    let mut last = 0;
    for (range, _) in tokenizer.find_special_tokens(&content) {
        out.push_str(&content[last..range.start]);
        out.push(MARK);
        for c in content[range.clone()].chars() {
            out.push(c);
            out.push(MARK);
        }
        last = range.end;
    }
    out.push_str(&content[last..]);
    out
}

/// Writes the rendered prompt, refusing to grow past `limit` bytes.
struct BoundedWriter {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deepest nesting a template within the size limit can have: one `not` (4 bytes)
    /// or one `|e` filter (2 bytes) per level.
    #[test]
    fn the_deepest_template_accepted_compiles_or_fails_cleanly() {
        let body = MAX_TEMPLATE_BYTES - 64;
        for (unit, head, tail) in [("not ", "{{ ", "true }}"), ("|e", "{{ 'x'", " }}")] {
            let source = format!("{head}{}{tail}", unit.repeat(body / unit.len()));
            // Compiles or reports an error: what it must never do is overflow the stack.
            let _ = ChatTemplate::new(Some(&source));
        }
        let too_long = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert!(matches!(
            ChatTemplate::new(Some(&too_long)),
            Err(Error::Template { .. })
        ));
    }
}
