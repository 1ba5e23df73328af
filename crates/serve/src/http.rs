//! The HTTP side: routes, request admission (the queue bound), and responses whole or as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{self, ApiError, Endpoint, Meta};
use crate::engine::{Event, Job};
use crate::metrics::Metrics;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) jobs: crossbeam_channel::Sender<Job>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) model_id: Arc<str>,
    /// Most requests waiting for a slot; beyond, 503.
    pub(crate) queue: u64,
    pub(crate) shutdown: Arc<AtomicBool>,
    pub(crate) next_id: Arc<AtomicU64>,
    pub(crate) started: u64,
}

/// The server's routes, with request bodies capped at `body_limit` bytes (413 beyond).
pub(crate) fn router(state: AppState, body_limit: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 503 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn health(State(s): State<AppState>) -> Response {
    if s.shutdown.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(s): State<AppState>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": &*s.model_id, "object": "model", "created": s.started, "owned_by": "pinion"}],
    }))
    .into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut r = s.metrics.render().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

async fn not_found() -> Response {
    error(&ApiError::status(404, "not_found", "no such endpoint"))
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Response {
    generate(s, Endpoint::Completions, body).await
}

async fn chat(State(s): State<AppState>, body: Bytes) -> Response {
    generate(s, Endpoint::Chat, body).await
}

/// A generation request: checked, queued (or refused with 503 when the queue is full), then answered whole
/// or streamed.
async fn generate(s: AppState, endpoint: Endpoint, body: Bytes) -> Response {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let req = match api::parse(&body, endpoint, &s.model_id, seed) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    if s.shutdown.load(Ordering::Acquire) {
        return error(&ApiError::status(503, "shutting_down", "the server is shutting down"));
    }
    if s.metrics.queued.fetch_add(1, Ordering::AcqRel) >= s.queue {
        s.metrics.queued.fetch_sub(1, Ordering::AcqRel);
        Metrics::add(&s.metrics.rejected, 1);
        let e = ApiError::status(
            503,
            "queue_full",
            format!("{} requests are already waiting; retry later", s.queue),
        );
        return error(&e);
    }
    let (tx, mut rx) = unbounded_channel();
    let stream = req.stream;
    let include_usage = req.include_usage;
    if s.jobs.send(Job { request: req, events: tx }).is_err() {
        s.metrics.queued.fetch_sub(1, Ordering::AcqRel);
        return error(&ApiError::status(503, "shutting_down", "the server is shutting down"));
    }
    Metrics::add(&s.metrics.requests, 1);
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = Meta { id: format!("{prefix}-{n}"), created: unix_now(), model: s.model_id.to_string() };
    // The request is admitted (or refused) before any of the response is sent, so errors keep their status.
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Error(e)) => return error(&e),
        _ => return error(&ApiError::status(500, "engine_stopped", "the engine stopped")),
    }
    if stream {
        return sse(endpoint, meta, include_usage, rx);
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                let r = api::response(endpoint, &meta, &text, finish, prompt_tokens, completion_tokens);
                return Json(r).into_response();
            }
            Some(Event::Error(e)) => return error(&e),
            Some(Event::Started) => {}
            None => return error(&ApiError::status(500, "engine_stopped", "the engine stopped")),
        }
    }
}

/// A streamed response: a chunk per piece of text, the last chunk with the finish reason, the usage chunk if
/// asked for, then `[DONE]`. A task forwards the engine's events; when the client goes away it drops the
/// engine's channel at once, so the engine frees the sequence at its next step.
fn sse(endpoint: Endpoint, meta: Meta, include_usage: bool, mut rx: UnboundedReceiver<Event>) -> Response {
    let (out, out_rx) = unbounded_channel::<Result<SseEvent, Infallible>>();
    tokio::spawn(async move {
        let data = |v: serde_json::Value| Ok(SseEvent::default().data(v.to_string()));
        let mut first = true;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = out.closed() => return,
            };
            let sent = match ev {
                Some(Event::Text(t)) => {
                    let r = out.send(data(api::chunk(endpoint, &meta, Some(&t), first, None)));
                    first = false;
                    r
                }
                Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                    let text = first.then_some("");
                    let _ = out.send(data(api::chunk(endpoint, &meta, text, first, Some(finish))));
                    if include_usage {
                        let _ = out.send(data(api::usage_chunk(
                            endpoint,
                            &meta,
                            prompt_tokens,
                            completion_tokens,
                        )));
                    }
                    let _ = out.send(Ok(SseEvent::default().data("[DONE]")));
                    return;
                }
                Some(Event::Error(e)) => {
                    let _ = out.send(data(e.body()));
                    return;
                }
                Some(Event::Started) => Ok(()),
                None => return,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(out_rx)).into_response()
}
