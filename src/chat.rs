//! Chat messages to prompt tokens: the GGUF's own `tokenizer.chat_template` (Jinja, rendered
//! with minijinja) or the Phi-3 format, encoded so that no message text can become a
//! control token.

use minijinja::{context, Environment, ErrorKind};

use crate::error::{Error, Result};
use crate::tokenizer::Phi3Tokenizer;

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

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles the GGUF's template; one that minijinja cannot compile is an error that
    /// names the model's template, since a wrong format silently degrades every answer.
    pub fn new(source: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.unwrap_or(PHI3_CHAT_TEMPLATE).to_string())
            .map_err(|e| Error::Tokenization {
                detail: format!("the model's chat template does not compile: {e}"),
            })?;
        Ok(Self { env })
    }

    /// The prompt text for `messages`, as the template writes it.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokenizer: &Phi3Tokenizer,
    ) -> Result<String> {
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        self.render_with(messages, &contents, add_generation_prompt, tokenizer)
    }

    fn render_with(
        &self,
        messages: &[ChatMessage],
        contents: &[&str],
        add_generation_prompt: bool,
        tokenizer: &Phi3Tokenizer,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid_argument(
                "messages",
                "[]",
                "Pass at least one message",
            ));
        }
        let messages: Vec<_> = messages
            .iter()
            .zip(contents)
            .map(|(m, content)| context! { role => m.role.as_str(), content => content })
            .collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Tokenization {
                detail: e.to_string(),
            })?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => tokenizer.bos_token().unwrap_or_default(),
                eos_token => tokenizer.eos_token().unwrap_or_default(),
            })
            .map_err(|e| {
                let detail = match e.kind() {
                    ErrorKind::InvalidOperation => e.detail().unwrap_or("rejected").to_string(),
                    _ => e.to_string(),
                };
                Error::invalid_argument(
                    "messages",
                    "(the conversation)",
                    format!("The model's chat template rejects it: {detail}"),
                )
            })
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
    ) -> Result<Vec<u32>> {
        let specials = tokenizer.special_tokens();
        let escaped: Vec<String> = messages
            .iter()
            .map(|m| escape(&m.content, specials))
            .collect();
        let refs: Vec<&str> = escaped.iter().map(String::as_str).collect();
        let rendered = self.render_with(messages, &refs, add_generation_prompt, tokenizer)?;

        let mut ids = Vec::new();
        let mut strip_start = false;
        let mut rest = rendered.as_str();
        loop {
            let next = specials
                .iter()
                .filter_map(|s| rest.find(s.content.as_str()).map(|at| (at, s)))
                .min_by_key(|(at, s)| (*at, usize::MAX - s.content.len()));
            let (text, special) = match next {
                Some((at, s)) => (&rest[..at], Some(s)),
                None => (rest, None),
            };
            let mut span = text.replace(MARK, "");
            if strip_start {
                span = span.trim_start().to_string();
            }
            if special.is_some_and(|s| s.lstrip) {
                span = span.trim_end().to_string();
            }
            if !span.is_empty() {
                ids.extend(tokenizer.encode_plain(&span)?);
            }
            let Some(special) = special else { break };
            ids.push(special.id);
            // `rstrip`/`lstrip` tokens swallow neighbouring whitespace, as in a full encode.
            strip_start = special.rstrip;
            rest = &rest[text.len() + special.content.len()..];
        }
        let prefix = tokenizer.prompt_prefix();
        if !ids.starts_with(prefix) {
            ids.splice(0..0, prefix.iter().copied());
        }
        Ok(ids)
    }
}

/// A Unicode private-use character: inert for templates and tokenizers alike.
const MARK: char = '\u{E000}';

/// Breaks every special-token text in `content` so that it can no longer match.
fn escape(content: &str, specials: &[crate::tokenizer::SpecialToken]) -> String {
    let mut out = content.replace(MARK, "");
    for special in specials {
        if out.contains(&special.content) {
            let mut chars = special.content.chars();
            let first = chars.next().map(String::from).unwrap_or_default();
            out = out.replace(
                &special.content,
                &format!("{first}{MARK}{}", chars.as_str()),
            );
        }
    }
    out
}
