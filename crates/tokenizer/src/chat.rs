//! Chat templates: rendering a conversation with the Jinja template stored in the GGUF file.
//!
//! Templates are written for Hugging Face's Jinja2 environment, so the environment here mirrors it:
//! `trim_blocks` and `lstrip_blocks` on, `raise_exception`, and the Python string and dict methods templates
//! commonly call (`strip`, `startswith`, `items`, ...), provided through minijinja's unknown-method callback.

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::Serialize;

use crate::error::TokenizerError;
use crate::tokenizer::Tokenizer;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The template used when the vocabulary has none: ChatML, llama.cpp's default.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
     message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl Tokenizer {
    /// Renders `messages` with the vocabulary's chat template (ChatML when it has none).
    ///
    /// The template sees `messages`, `add_generation_prompt`, `bos_token` and `eos_token` (the texts of the BOS
    /// and EOS tokens, empty when there are none), and can call `raise_exception(message)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.apply_chat_template_or(CHATML_TEMPLATE, messages, add_generation_prompt)
    }

    /// As [`Tokenizer::apply_chat_template`], with `fallback` used when the vocabulary has no template.
    pub fn apply_chat_template_or(
        &self,
        fallback: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let source = self.chat_template().unwrap_or(fallback);
        let token = |id: Option<u32>| id.and_then(|id| self.token_text(id)).unwrap_or("").to_string();
        render(source, messages, add_generation_prompt, &token(self.bos_id()), &token(self.eos_id()))
    }

    /// The tokens of a conversation rendered with the vocabulary's chat template (`fallback` when it has
    /// none), BOS added as [`Tokenizer::encode`] adds it: the template's special tokens are parsed, but text in
    /// the messages that spells one (`<|im_end|>` typed by a user) stays text.
    pub fn encode_chat_or(
        &self,
        fallback: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        // Each message between two private-use marks, to find it again in the rendered text.
        const OPEN: char = '\u{F8F0}';
        const CLOSE: char = '\u{F8F1}';
        let marked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: format!("{OPEN}{}{CLOSE}", m.content.replace([OPEN, CLOSE], "")),
            })
            .collect();
        let rendered = self.apply_chat_template_or(fallback, &marked, add_generation_prompt)?;
        let mut text = String::with_capacity(rendered.len());
        let mut literal = Vec::new();
        let mut open = None;
        for c in rendered.chars() {
            match c {
                OPEN => open = Some(text.len()),
                CLOSE => literal.extend(open.take().map(|at| at..text.len())),
                c => text.push(c),
            }
        }
        Ok(self.encode_with_literals(&text, true, &literal))
    }
}

/// Renders a chat template with Hugging Face's conventions.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    render(template, messages, add_generation_prompt, bos_token, eos_token)
}

fn render(
    source: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.set_unknown_method_callback(python_method);
    let tmpl = env
        .template_from_str(source)
        .map_err(|source| TokenizerError::Template { stage: "compile", source })?;
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    tmpl.render(ctx).map_err(|source| TokenizerError::Template { stage: "render", source })
}

fn arg_str(args: &[Value], i: usize) -> Result<Option<&str>, Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "expected a string argument")),
    }
}

fn no_more_args(args: &[Value], n: usize) -> Result<(), Error> {
    if args.len() > n {
        return Err(Error::from(ErrorKind::TooManyArguments));
    }
    Ok(())
}

/// Python's `str` and `dict` methods that chat templates call, for minijinja's unknown-method callback.
fn python_method(state: &State<'_, '_>, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return str_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                no_more_args(args, 0)?;
                state.apply_filter("items", std::slice::from_ref(value))
            }
            "keys" => {
                no_more_args(args, 0)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                no_more_args(args, 0)?;
                let values: Result<Vec<Value>, Error> =
                    value.try_iter()?.map(|k| value.get_item(&k)).collect();
                Ok(Value::from(values?))
            }
            "get" => {
                no_more_args(args, 2)?;
                let key = args.first().cloned().unwrap_or_default();
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() { args.get(1).cloned().unwrap_or(Value::from(())) } else { v })
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

fn str_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let strip_set = |args: &[Value]| -> Result<Option<Vec<char>>, Error> {
        no_more_args(args, 1)?;
        Ok(arg_str(args, 0)?.map(|c| c.chars().collect()))
    };
    Ok(match method {
        "strip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_matches(|c| set.contains(&c)),
            None => s.trim(),
        }),
        "lstrip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_start_matches(|c| set.contains(&c)),
            None => s.trim_start(),
        }),
        "rstrip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_end_matches(|c| set.contains(&c)),
            None => s.trim_end(),
        }),
        "startswith" | "endswith" => {
            no_more_args(args, 1)?;
            let prefixes: Vec<String> = match args.first() {
                Some(v) if v.kind() == ValueKind::Seq => {
                    v.try_iter()?.filter_map(|p| p.as_str().map(str::to_string)).collect()
                }
                _ => arg_str(args, 0)?.map(str::to_string).into_iter().collect(),
            };
            let hit = if method == "startswith" {
                prefixes.iter().any(|p| s.starts_with(p.as_str()))
            } else {
                prefixes.iter().any(|p| s.ends_with(p.as_str()))
            };
            Value::from(hit)
        }
        "upper" => {
            no_more_args(args, 0)?;
            Value::from(s.to_uppercase())
        }
        "lower" => {
            no_more_args(args, 0)?;
            Value::from(s.to_lowercase())
        }
        "title" | "capitalize" => {
            no_more_args(args, 0)?;
            let mut out = String::with_capacity(s.len());
            let mut at_word_start = true;
            for (i, c) in s.chars().enumerate() {
                let upper = if method == "title" { at_word_start } else { i == 0 };
                if upper {
                    out.extend(c.to_uppercase());
                } else {
                    out.extend(c.to_lowercase());
                }
                at_word_start = !c.is_alphanumeric();
            }
            Value::from(out)
        }
        "replace" => {
            no_more_args(args, 2)?;
            let from = arg_str(args, 0)?.unwrap_or("");
            let to = arg_str(args, 1)?.unwrap_or("");
            Value::from(s.replace(from, to))
        }
        "split" => {
            no_more_args(args, 2)?;
            let max = args.get(1).and_then(Value::as_i64).filter(|&m| m >= 0).map(|m| m as usize);
            let parts: Vec<Value> = match (arg_str(args, 0)?, max) {
                (Some(sep), Some(m)) => s.splitn(m + 1, sep).map(Value::from).collect(),
                (Some(sep), None) => s.split(sep).map(Value::from).collect(),
                (None, Some(m)) => {
                    let mut parts: Vec<Value> = Vec::new();
                    let mut rest = s.trim_start();
                    while !rest.is_empty() {
                        if parts.len() == m {
                            parts.push(Value::from(rest));
                            break;
                        }
                        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                        parts.push(Value::from(&rest[..end]));
                        rest = rest[end..].trim_start();
                    }
                    parts
                }
                (None, None) => s.split_whitespace().map(Value::from).collect(),
            };
            Value::from(parts)
        }
        "find" => {
            no_more_args(args, 1)?;
            let needle = arg_str(args, 0)?.unwrap_or("");
            Value::from(s.find(needle).map_or(-1, |b| s[..b].chars().count() as i64))
        }
        "count" => {
            no_more_args(args, 1)?;
            let needle = arg_str(args, 0)?.unwrap_or("");
            Value::from(if needle.is_empty() { s.chars().count() + 1 } else { s.matches(needle).count() })
        }
        "isdigit" | "isalpha" | "isalnum" | "isspace" | "islower" | "isupper" => {
            no_more_args(args, 0)?;
            let test: fn(char) -> bool = match method {
                "isdigit" => |c| c.is_numeric(),
                "isalpha" => |c| c.is_alphabetic(),
                "isalnum" => |c| c.is_alphanumeric(),
                "isspace" => |c| c.is_whitespace(),
                "islower" => |c| !c.is_uppercase(),
                _ => |c| !c.is_lowercase(),
            };
            let cased = match method {
                "islower" => s.chars().any(char::is_lowercase),
                "isupper" => s.chars().any(char::is_uppercase),
                _ => true,
            };
            Value::from(!s.is_empty() && cased && s.chars().all(test))
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render1(t: &str) -> String {
        render(t, &[ChatMessage::new("user", "  Hi there  ")], true, "<s>", "</s>").unwrap()
    }

    #[test]
    fn python_string_methods() {
        assert_eq!(render1("{{ messages[0].content.strip() }}|"), "Hi there|");
        assert_eq!(render1("{{ messages[0].content.lstrip() }}|"), "Hi there  |");
        assert_eq!(render1("{{ 'xxhixx'.strip('x') }}"), "hi");
        assert_eq!(render1("{{ messages[0].role.startswith('us') }}"), "True");
        assert_eq!(render1("{{ 'abc'.endswith(('x', 'c')) }}"), "True");
        assert_eq!(render1("{{ 'a,b,c'.split(',')|join('-') }}"), "a-b-c");
        assert_eq!(render1("{{ 'hello world'.title() }}"), "Hello World");
        assert_eq!(render1("{{ 'Hi'.upper() + 'Hi'.lower() }}"), "HIhi");
        assert_eq!(render1("{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}"), "a=1");
        assert_eq!(render1("{{ {'a': 1}.get('b', 7) }}"), "7");
        assert_eq!(render1("{{ bos_token }}{{ eos_token }}"), "<s></s>");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let err = render("{{ raise_exception('no system role') }}", &[], false, "", "").unwrap_err();
        assert!(matches!(err, TokenizerError::Template { stage: "render", .. }), "{err:?}");
        assert!(format!("{:?}", err).contains("no system role"));
    }

    #[test]
    fn bad_template_is_a_compile_error() {
        let err = render("{% for %}", &[], false, "", "").unwrap_err();
        assert!(matches!(err, TokenizerError::Template { stage: "compile", .. }), "{err:?}");
    }

    #[test]
    fn trim_and_lstrip_blocks_as_hugging_face() {
        let t = "{% for m in messages %}\n    {% if true %}{{ m.role }}{% endif %}\n{% endfor %}";
        assert_eq!(render1(t), "user");
    }

    #[test]
    fn chatml_fallback() {
        let s = render(CHATML_TEMPLATE, &[ChatMessage::new("user", "Hi")], true, "", "").unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }
}
