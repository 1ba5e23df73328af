//! The read-ahead stream: a token's reads that do not depend on its activations, in the order the token uses
//! them (with thresholds, every unpinned gate block, or whole record for layers read whole; then the output
//! head's rows not in memory), submitted while earlier layers compute, within the plan's read-ahead window.
//! Reads are released to the window as the clusters that use them finish, so the device stays busy across
//! layer boundaries without holding more than the window in buffers.

use pinion_io::ReadRequest;

use crate::error::RuntimeError;
use crate::offload::io::Reader;

/// Fewest bytes of reads submitted at once (when more are left): a few records' worth, merged into reads of the
/// I/O engine's coalescing limit.
const BATCH: u64 = 512 << 10;

/// A token's read-ahead (see the module documentation).
pub(crate) struct Stream {
    /// The token's reads, in the order it uses them.
    reqs: Vec<ReadRequest>,
    /// The next read to submit.
    next: usize,
    /// Bytes submitted and not yet released (page rounded, as the buffers that hold them).
    outstanding: u64,
    /// Most bytes outstanding at once.
    window: u64,
}

/// Bytes of pool buffer a read of `len` bytes at `offset` takes (whole pages).
fn footprint(r: &ReadRequest) -> u64 {
    let start = r.offset / 4096 * 4096;
    (r.offset + r.len as u64).div_ceil(4096) * 4096 - start
}

impl Stream {
    /// A stream of `reqs` (a token's reads, in the order it uses them) that keeps at most `window` bytes
    /// outstanding.
    pub(crate) fn new(window: u64, reqs: Vec<ReadRequest>) -> Stream {
        Stream { window, reqs, next: 0, outstanding: 0 }
    }

    /// Starts a token's reads over (a token uses all of its own, so nothing of the previous one is left).
    pub(crate) fn restart(&mut self) {
        self.next = 0;
        self.outstanding = 0;
    }

    /// Bytes of a token's reads.
    pub(crate) fn bytes(&self) -> u64 {
        self.reqs.iter().map(|r| r.len as u64).sum()
    }

    /// Whether a read of `tag` is (or will be) submitted by the stream this token.
    pub(crate) fn has(&self, tag: u64) -> bool {
        self.reqs.iter().any(|r| r.tag == tag)
    }

    /// Submits reads while the window has room (always at least one, so a read larger than the window still
    /// goes). Reads go in batches of at least [`BATCH`] bytes (or all that is left): the I/O engine merges
    /// adjacent requests of one batch into larger reads, which the device serves faster.
    pub(crate) fn refill(&mut self, reader: &Reader) -> Result<(), RuntimeError> {
        let room = self.window.saturating_sub(self.outstanding);
        let left: u64 = self.reqs[self.next..].iter().map(footprint).sum();
        if self.outstanding > 0 && room < BATCH.min(left) {
            return Ok(());
        }
        let start = self.next;
        while self.next < self.reqs.len() {
            let f = footprint(&self.reqs[self.next]);
            if self.outstanding > 0 && self.outstanding + f > self.window {
                break;
            }
            self.outstanding += f;
            self.next += 1;
        }
        reader.submit(&self.reqs[start..self.next], "read-ahead")
    }

    /// Releases the window room of a used read of `len` bytes at `offset`.
    pub(crate) fn consumed(&mut self, offset: u64, len: usize) {
        let f = footprint(&ReadRequest { offset, len, tag: 0 });
        self.outstanding = self.outstanding.saturating_sub(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprints_are_whole_pages() {
        assert_eq!(footprint(&ReadRequest { offset: 0, len: 1, tag: 0 }), 4096);
        assert_eq!(footprint(&ReadRequest { offset: 4095, len: 2, tag: 0 }), 8192);
        assert_eq!(footprint(&ReadRequest { offset: 8192, len: 8192, tag: 0 }), 8192);
    }
}
