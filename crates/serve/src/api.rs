//! The OpenAI API's side: request bodies checked and turned into a [`Request`], errors as OpenAI sends them,
//! and the JSON of responses and stream chunks. No I/O here.

use pinion_runtime::{ChatMessage, SamplerParams, StopReason};
use serde_json::{Map, Value, json};

/// Most stop strings a request may give (OpenAI's limit).
pub(crate) const MAX_STOP: usize = 4;
/// `max_tokens` of a completion that gives none (OpenAI's default for `/v1/completions`).
pub(crate) const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Completions,
    Chat,
}

/// The input of a request.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Prompt {
    /// A raw prompt (`/v1/completions`).
    Text(String),
    /// A conversation, rendered with the model's chat template (`/v1/chat/completions`).
    Chat(Vec<ChatMessage>),
}

/// A checked request.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) prompt: Prompt,
    /// Most tokens to generate; `None`: until the context is full.
    pub(crate) max_tokens: Option<usize>,
    pub(crate) sampler: SamplerParams,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    /// Streams: end with a chunk that carries the usage counts.
    pub(crate) include_usage: bool,
}

/// An error as the OpenAI API returns it: an HTTP status and `{"error": {message, type, param, code}}`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ApiError {
    pub(crate) status: u16,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about parameter `param`.
    pub(crate) fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, message: message.into(), param: Some(param.into()), code: None }
    }

    /// An error of `status` with no parameter.
    pub(crate) fn status(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), param: None, code: Some(code) }
    }

    /// The error's JSON body.
    pub(crate) fn body(&self) -> Value {
        let kind = match self.status {
            400..=499 => "invalid_request_error",
            503 => "server_overloaded",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
    }
}

/// Checks a request body for `endpoint` against the served model `model_id`. `seed` is the seed of a request
/// that gives none.
pub(crate) fn parse(body: &[u8], endpoint: Endpoint, model_id: &str, seed: u64) -> Result<Request, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::status(400, "invalid_json", format!("the request body is not valid JSON: {e}"))
    })?;
    let Value::Object(o) = v else {
        return Err(ApiError::status(400, "invalid_json", "the request body must be a JSON object"));
    };
    match o.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if m == model_id => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                status: 404,
                message: format!("the model '{m}' does not exist; this server runs '{model_id}'"),
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
        Some(_) => return Err(ApiError::invalid("model", "model must be a string")),
    }
    refuse_unsupported(&o, endpoint)?;
    let prompt = match endpoint {
        Endpoint::Completions => Prompt::Text(completion_prompt(o.get("prompt"))?),
        Endpoint::Chat => Prompt::Chat(messages(o.get("messages"))?),
    };
    let max_key = match (endpoint, o.get("max_completion_tokens")) {
        (Endpoint::Chat, Some(v)) if !v.is_null() => "max_completion_tokens",
        _ => "max_tokens",
    };
    let max_tokens = match o.get(max_key) {
        None | Some(Value::Null) => match endpoint {
            Endpoint::Completions => Some(COMPLETION_DEFAULT_MAX_TOKENS),
            Endpoint::Chat => None,
        },
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 => Some(n as usize),
            _ => {
                return Err(ApiError::invalid(
                    max_key,
                    format!("{max_key} must be an integer of at least 1"),
                ));
            }
        },
    };
    let temperature = number(&o, "temperature", 1.0, 0.0..=2.0)?;
    let top_p = number(&o, "top_p", 1.0, 0.0..=1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "top_p must be above 0"));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => seed,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(s), _) => s,
            (None, Some(s)) => s as u64,
            _ => return Err(ApiError::invalid("seed", "seed must be an integer")),
        },
    };
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= MAX_STOP => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "stop must be a string or an array of strings"))?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid("stop", format!("at most {MAX_STOP} stop strings")));
        }
        Some(_) => return Err(ApiError::invalid("stop", "stop must be a string or an array of strings")),
    };
    let stream = flag(&o, "stream")?;
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => flag(so, "include_usage")?,
        Some(_) => return Err(ApiError::invalid("stream_options", "stream_options must be an object")),
    };
    let sampler = SamplerParams {
        temperature: temperature as f32,
        top_k: 0,
        top_p: top_p as f32,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed,
    };
    Ok(Request { prompt, max_tokens, sampler, stop, stream, include_usage })
}

/// Parameters pinion does not implement, refused by name when they ask for something (their neutral values
/// are accepted, so clients that always send them still work).
fn refuse_unsupported(o: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    let not = |p: &str, what: &str| ApiError::invalid(p, format!("{p}: {what} is not supported by pinion"));
    let is =
        |k: &str, neutral: &dyn Fn(&Value) -> bool| o.get(k).is_some_and(|v| !v.is_null() && !neutral(v));
    let one = |v: &Value| v.as_i64() == Some(1);
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    let falsy = |v: &Value| v == &Value::Bool(false);
    let empty =
        |v: &Value| v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty);
    if is("n", &one) {
        return Err(not("n", "more than one choice per request"));
    }
    if is("best_of", &one) {
        return Err(not("best_of", "best_of"));
    }
    let logprobs_off = |v: &Value| match endpoint {
        Endpoint::Chat => falsy(v),
        Endpoint::Completions => v.as_i64() == Some(0),
    };
    if is("logprobs", &logprobs_off) {
        return Err(not("logprobs", "logprobs"));
    }
    if is("top_logprobs", &|v| v.as_i64() == Some(0)) {
        return Err(not("top_logprobs", "top_logprobs"));
    }
    if is("echo", &falsy) {
        return Err(not("echo", "echoing the prompt"));
    }
    if is("suffix", &|v| v.as_str() == Some("")) {
        return Err(not("suffix", "a suffix (insertion)"));
    }
    for tools in ["tools", "functions"] {
        if is(tools, &empty) {
            return Err(not(tools, "tool calling"));
        }
    }
    for choice in ["tool_choice", "function_call"] {
        if is(choice, &|v| v.as_str() == Some("none")) {
            return Err(not(choice, "tool calling"));
        }
    }
    if is("logit_bias", &empty) {
        return Err(not("logit_bias", "logit_bias"));
    }
    for penalty in ["frequency_penalty", "presence_penalty"] {
        if is(penalty, &zero) {
            return Err(not(penalty, "a non-zero penalty"));
        }
    }
    if is("response_format", &|v| v.get("type").and_then(Value::as_str) == Some("text")) {
        return Err(not("response_format", "a response format other than text"));
    }
    if is("audio", &|_| false) || is("modalities", &|v| v == &json!(["text"])) {
        return Err(not("modalities", "output other than text"));
    }
    Ok(())
}

/// `/v1/completions`' prompt: a string, or an array of one string.
fn completion_prompt(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or("").to_string())
        }
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => Err(ApiError::invalid(
            "prompt",
            "prompt: several prompts in one request are not supported by pinion; send one request per prompt",
        )),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "prompt: token ids are not supported by pinion; send the prompt as a string",
        )),
        None | Some(Value::Null) => Err(ApiError::invalid("prompt", "prompt is required")),
        Some(_) => Err(ApiError::invalid("prompt", "prompt must be a string")),
    }
}

/// The chat's messages: roles system, developer (as system), user and assistant; text content, as a string or
/// an array of text parts.
fn messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |i: usize, what: &str| ApiError::invalid("messages", format!("messages[{i}]: {what}"));
    let Some(Value::Array(a)) = v else {
        return Err(ApiError::invalid("messages", "messages must be an array of messages"));
    };
    if a.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    a.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.get("role").and_then(Value::as_str) {
                Some("developer") => "system",
                Some(r @ ("system" | "user" | "assistant")) => r,
                Some(r) => return Err(bad(i, &format!("role '{r}' is not supported by pinion"))),
                None => return Err(bad(i, "role must be a string")),
            };
            if m.get("tool_calls").is_some_and(|t| !t.is_null()) {
                return Err(bad(i, "tool_calls are not supported by pinion"));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (Some(t), _) if t != "text" => {
                                return Err(bad(
                                    i,
                                    &format!("content of type '{t}' is not supported by pinion"),
                                ));
                            }
                            _ => {
                                return Err(bad(
                                    i,
                                    "a content part must be {\"type\": \"text\", \"text\": ...}",
                                ));
                            }
                        }
                    }
                    text
                }
                _ => return Err(bad(i, "content must be a string or an array of text parts")),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn number(
    o: &Map<String, Value>,
    key: &str,
    default: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f64, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if range.contains(&x) => Ok(x),
            _ => Err(ApiError::invalid(
                key,
                format!("{key} must be a number from {} to {}", range.start(), range.end()),
            )),
        },
    }
}

fn flag(o: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be true or false"))),
    }
}

/// OpenAI's `finish_reason` of a stop reason.
pub(crate) fn finish_reason(r: &StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration | StopReason::StopString(_) | StopReason::Cancelled => "stop",
        StopReason::Length => "length",
    }
}

/// What identifies one response: its id, creation time and model.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A whole (non-streamed) response.
pub(crate) fn response(
    endpoint: Endpoint,
    m: &Meta,
    text: &str,
    finish: &str,
    prompt: usize,
    completion: usize,
) -> Value {
    let choice = match endpoint {
        Endpoint::Completions => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish,
        }),
    };
    let object = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion",
    };
    json!({
        "id": m.id,
        "object": object,
        "created": m.created,
        "model": m.model,
        "choices": [choice],
        "usage": usage(prompt, completion),
    })
}

/// One chunk of a streamed response: text (for chat, the first chunk also names the role), or the last
/// chunk with the finish reason.
pub(crate) fn chunk(
    endpoint: Endpoint,
    m: &Meta,
    text: Option<&str>,
    first: bool,
    finish: Option<&str>,
) -> Value {
    let choice = match endpoint {
        Endpoint::Completions => json!({
            "index": 0,
            "text": text.unwrap_or(""),
            "logprobs": null,
            "finish_reason": finish,
        }),
        Endpoint::Chat => {
            let mut delta = Map::new();
            if first {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = text {
                delta.insert("content".into(), t.into());
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
    };
    json!({"id": m.id, "object": chunk_object(endpoint), "created": m.created, "model": m.model, "choices": [choice]})
}

/// The stream's usage chunk (`stream_options.include_usage`): no choices.
pub(crate) fn usage_chunk(endpoint: Endpoint, m: &Meta, prompt: usize, completion: usize) -> Value {
    json!({
        "id": m.id,
        "object": chunk_object(endpoint),
        "created": m.created,
        "model": m.model,
        "choices": [],
        "usage": usage(prompt, completion),
    })
}

fn chunk_object(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Request, ApiError> {
        parse(body.to_string().as_bytes(), Endpoint::Chat, "m", 7)
    }

    fn completion(body: Value) -> Result<Request, ApiError> {
        parse(body.to_string().as_bytes(), Endpoint::Completions, "m", 7)
    }

    #[test]
    fn a_plain_request_takes_openai_defaults() {
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!(r.prompt, Prompt::Chat(vec![ChatMessage::new("user", "hi")]));
        assert_eq!((r.max_tokens, r.stream, r.include_usage), (None, false, false));
        assert_eq!((r.sampler.temperature, r.sampler.top_p, r.sampler.seed), (1.0, 1.0, 7));
        let r = completion(json!({"prompt": ["once"], "stop": "\n", "seed": 3, "temperature": 0})).unwrap();
        assert_eq!(r.prompt, Prompt::Text("once".into()));
        assert_eq!((r.max_tokens, r.stop.clone(), r.sampler.seed), (Some(16), vec!["\n".to_string()], 3));
        assert_eq!(r.sampler.temperature, 0.0);
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        let r =
            chat(json!({"messages": [{"role": "developer", "content": parts}], "max_completion_tokens": 5}));
        let r = r.unwrap();
        assert_eq!((r.prompt, r.max_tokens), (Prompt::Chat(vec![ChatMessage::new("system", "ab")]), Some(5)));
    }

    #[test]
    fn bad_requests_are_400s_naming_the_parameter() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": msgs, "max_tokens": 0}), "max_tokens"),
            (json!({"messages": msgs, "max_tokens": -3}), "max_tokens"),
            (json!({"messages": msgs, "n": 2}), "n"),
            (json!({"messages": msgs, "logprobs": true}), "logprobs"),
            (json!({"messages": msgs, "tools": [{"type": "function"}]}), "tools"),
            (json!({"messages": msgs, "temperature": 3}), "temperature"),
            (json!({"messages": msgs, "top_p": 0}), "top_p"),
            (json!({"messages": msgs, "stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"messages": msgs, "stream": "yes"}), "stream"),
            (json!({"messages": msgs, "response_format": {"type": "json_object"}}), "response_format"),
            (json!({"messages": msgs, "presence_penalty": 0.5}), "presence_penalty"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages"),
            (json!({}), "messages"),
        ];
        for (body, param) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
            assert!(e.message.contains(param), "{body}: {e:?}");
        }
        // Neutral values of unsupported parameters are accepted.
        let ok = json!({"messages": msgs, "n": 1, "logprobs": false, "tools": [], "presence_penalty": 0,
                        "response_format": {"type": "text"}, "user": "u"});
        assert!(chat(ok).is_ok());
        for (body, param) in [
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": [1, 2]}), "prompt"),
            (json!({"prompt": "a", "echo": true}), "echo"),
            (json!({"prompt": "a", "logprobs": 2}), "logprobs"),
            (json!({"prompt": "a", "best_of": 3}), "best_of"),
            (json!({"prompt": "a", "suffix": "z"}), "suffix"),
            (json!({}), "prompt"),
        ] {
            let e = completion(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
        }
    }

    #[test]
    fn malformed_bodies_and_unknown_models() {
        for body in [&b"{not json"[..], b"[1, 2]", b"", b"\"text\""] {
            let e = parse(body, Endpoint::Chat, "m", 0).unwrap_err();
            assert_eq!((e.status, e.code), (400, Some("invalid_json")), "{body:?}");
        }
        let e = chat(json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})).unwrap_err();
        assert_eq!((e.status, e.code), (404, Some("model_not_found")));
        assert!(e.message.contains("gpt-4") && e.message.contains("'m'"), "{}", e.message);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "model");
    }

    #[test]
    fn chunks_and_responses_have_openai_shapes() {
        let m = Meta { id: "chatcmpl-1".into(), created: 5, model: "m".into() };
        let first = chunk(Endpoint::Chat, &m, Some("He"), true, None);
        assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": "He"}));
        assert_eq!(first["object"], "chat.completion.chunk");
        let last = chunk(Endpoint::Chat, &m, None, false, Some("stop"));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        let r = response(Endpoint::Completions, &m, "x", "length", 3, 2);
        assert_eq!(r["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
        assert_eq!(r["choices"][0]["text"], "x");
        assert_eq!(usage_chunk(Endpoint::Chat, &m, 1, 1)["choices"], json!([]));
    }
}
