//! Backend 2: a pool of threads doing blocking positioned reads, for systems without a usable io_uring or file
//! systems that refuse O_DIRECT.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender};

use crate::engine::{Completion, ReadOp, Shared, Step};

/// Worker loop: one read at a time until the request channel closes.
pub(crate) fn run(shared: Arc<Shared>, rx: Receiver<ReadOp>, tx: Sender<Completion>) {
    while let Ok(mut op) = rx.recv() {
        let mut buf = match shared.acquire_blocking(&op) {
            // Shutting down: the engine is gone, and so is anyone waiting for this read.
            None => continue,
            Some(Ok(b)) => b,
            Some(Err(kind)) => {
                let at = op.offset;
                shared.finish(op, Err((at, kind)), &tx);
                continue;
            }
        };
        shared.stats.issue();
        let outcome = loop {
            let at = op.offset + op.done as u64;
            let res = match shared.file.read_at(&mut buf[op.done..op.len], at) {
                Ok(n) => n as i64,
                Err(e) => -(e.raw_os_error().unwrap_or(libc::EIO) as i64),
            };
            match op.advance(shared.faults.apply(at, res), &shared.stats) {
                Step::Again => {
                    shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                }
                Step::Done => break Ok(()),
                Step::Failed(at, kind) => break Err((at, kind)),
            }
        };
        shared.stats.retire();
        shared.finish(op, outcome.map(|()| buf), &tx);
    }
}
