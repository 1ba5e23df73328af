//! `pinion-serve`: an OpenAI-compatible HTTP server over one pinion [`Context`], the engine behind
//! `pinion serve`. Requests to `/v1/completions` and `/v1/chat/completions` (whole or streamed as server-sent
//! events) each get one of the context's sequence slots and are decoded together by continuous batching: new
//! requests join between steps, long prompts are read in chunks between decode steps, and a request's tokens
//! are the same whether it ran alone or beside others. `/v1/models`, `/health` and `/metrics` (Prometheus
//! text) complete the API. The main entry is [`serve`].
//!
//! It is not a model loader or planner: the caller makes the context (in memory or offloaded under a memory
//! budget, with as many sequences as requests it should run at once), and this crate runs it.

mod api;
mod engine;
mod http;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pinion_runtime::Context;

/// How a server listens and queues.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on (0: any free port; `ready` is told which).
    pub port: u16,
    /// Most requests waiting for a sequence slot; beyond, requests get 503 with `Retry-After`.
    pub queue: usize,
    /// The model's name in the API (`/v1/models`; requests naming another model get 404).
    pub model_id: String,
    /// Largest request body in bytes (413 beyond).
    pub body_limit: usize,
}

impl ServeOptions {
    /// Defaults as llama-server's: 127.0.0.1:8080; a queue of 64 requests and bodies up to 1 MiB.
    pub fn new(model_id: impl Into<String>) -> ServeOptions {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            queue: 64,
            model_id: model_id.into(),
            body_limit: 1 << 20,
        }
    }
}

/// What can stop a server from running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("the HTTP server: {0}")]
    Http(std::io::Error),
}

/// Serves `ctx` (one request per sequence slot, `ctx.n_seq()` at once) until SIGTERM or SIGINT: then new
/// requests get 503, running streams have [`GRACE_SECONDS`] to finish before they are cancelled, and the call
/// returns `Ok`. `ready` is called with the bound address once the server accepts connections. The engine runs
/// on the calling thread; HTTP on a small tokio runtime beside it.
pub fn serve(
    ctx: &mut Context<'_>,
    opts: &ServeOptions,
    ready: &mut dyn FnMut(SocketAddr),
) -> Result<(), ServeError> {
    let addr = format!("{}:{}", opts.host, opts.port);
    let bind = |source| ServeError::Bind { addr: addr.clone(), source };
    let listener = std::net::TcpListener::bind(&addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let local = listener.local_addr().map_err(bind)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pinion-http")
        .enable_all()
        .build()
        .map_err(ServeError::Http)?;
    let (jobs, rx) = crossbeam_channel::unbounded();
    let metrics = Arc::new(metrics::Metrics::default());
    {
        // Set before the first connection is accepted: /metrics shows the slots and budget from the start.
        let mut e = metrics.engine.lock().unwrap_or_else(|p| p.into_inner());
        e.slots = ctx.n_seq();
        e.budget = ctx.plan().map(|p| p.memory.budget);
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    let state = http::AppState {
        jobs,
        metrics: metrics.clone(),
        model_id: opts.model_id.as_str().into(),
        queue: opts.queue as u64,
        shutdown: shutdown.clone(),
        next_id: Arc::new(AtomicU64::new(1)),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let app = http::router(state, opts.body_limit);
    let flag = shutdown.clone();
    let server = std::thread::Builder::new()
        .name("pinion-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        signal().await;
                        flag.store(true, Ordering::Release);
                    })
                    .await
            })
        })
        .map_err(ServeError::Http)?;
    ready(local);
    engine::run(ctx, &rx, metrics, &shutdown);
    drop(rx);
    match server.join() {
        Ok(r) => r.map_err(ServeError::Http),
        Err(_) => Err(ServeError::Http(std::io::Error::other("the HTTP thread panicked"))),
    }
}

/// Seconds running streams may go on after a shutdown signal.
pub const GRACE_SECONDS: u64 = engine::GRACE.as_secs();

/// Resolves at SIGTERM or SIGINT.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // No signal handling: run until the process is killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
