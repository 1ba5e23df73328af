//! The fixed region: bytes loaded once, before decoding starts, and never evicted (resident weights and the
//! plan's pinned neurons).
//!
//! One allocation, reserved in full by [`FixedRegionBuilder::new`] and never reallocated (a reallocation would
//! hold the old and the new copy at once). Entries are appended one after the other, each starting at an
//! address that is a multiple of 64 bytes so that kernels may view quantized blocks in place; there is no other
//! padding, so small entries share pages. The allocation is zeroed memory, which the OS backs only when it is
//! written: reserving more than is pushed costs address space, not memory. Once built, the region is immutable,
//! so [`FixedRegion::get`] takes no lock and touches no atomic: it is a bounds-checked slice.
//!
//! The allocation is a plain `Vec<u8>` of `capacity + 63` bytes whose first 64-byte aligned address is the
//! region's start, not a vector of 64-byte aligned blocks: the standard allocator zeroes an allocation aligned
//! above 16 bytes by writing it (`aligned_alloc`, then `memset`), which would back the whole reservation at
//! once, while a byte vector's zeroed allocation is `calloc`, lazily backed.

use std::fmt;

use crate::error::CacheError;

/// Alignment of every fixed-region entry, in bytes (a cache line; enough for any quantized block type).
pub const FIXED_ALIGN: usize = 64;

/// Bytes an entry of `len` bytes takes from a fixed region's capacity when another entry follows it: `len`
/// rounded up to [`FIXED_ALIGN`]. (The last entry needs only `len`.) A region holding entries of lengths
/// `l_1..l_n` needs a capacity of `sum(fixed_entry_bytes(l_i))`.
pub const fn fixed_entry_bytes(len: usize) -> usize {
    len.div_ceil(FIXED_ALIGN).saturating_mul(FIXED_ALIGN)
}

/// Bytes a fixed region of `capacity` bytes allocates: `capacity` and `FIXED_ALIGN - 1` bytes of slack to
/// align its start, in one allocation. There is no per-entry bookkeeping (the caller keeps the [`FixedId`]s),
/// and the [`FixedRegion`] value itself is a few words, held by its owner.
pub const fn fixed_region_bytes(capacity: usize) -> usize {
    capacity.saturating_add(FIXED_ALIGN - 1)
}

/// Where an entry of a [`FixedRegion`] is: its offset (a multiple of [`FIXED_ALIGN`]) and length. Returned by
/// [`FixedRegionBuilder::push`]; valid for the region that builder builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FixedId {
    offset: usize,
    len: usize,
}

impl FixedId {
    /// Offset of the entry's first byte in the region.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length of the entry in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the entry is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Builds a [`FixedRegion`]: reserves its capacity once, then appends entries.
pub struct FixedRegionBuilder {
    buf: Vec<u8>,
    /// Offset in `buf` of the region's first byte, the first 64-byte aligned address.
    base: usize,
    capacity: usize,
    /// End of the last entry, in bytes.
    end: usize,
    n_entries: usize,
}

impl fmt::Debug for FixedRegionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedRegionBuilder")
            .field("capacity", &self.capacity)
            .field("used", &self.end)
            .field("n_entries", &self.n_entries)
            .finish()
    }
}

impl FixedRegionBuilder {
    /// A builder for a region of `capacity` bytes, allocated now (zeroed, so backed by memory only as entries
    /// are written; see [`fixed_region_bytes`]).
    pub fn new(capacity: usize) -> FixedRegionBuilder {
        // `vec![0; n]` is a zeroed allocation (calloc), not a loop writing zeros.
        let buf = vec![0u8; fixed_region_bytes(capacity)];
        let base = (FIXED_ALIGN - buf.as_ptr() as usize % FIXED_ALIGN) % FIXED_ALIGN;
        FixedRegionBuilder { buf, base, capacity, end: 0, n_entries: 0 }
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes used so far: the end of the last entry.
    pub fn used(&self) -> usize {
        self.end
    }

    /// Appends a copy of `bytes`. [`CacheError::FixedFull`] if it does not fit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<FixedId, CacheError> {
        let id = self.reserve(bytes.len())?;
        self.bytes_mut(id).copy_from_slice(bytes);
        Ok(id)
    }

    /// Appends an entry of `len` bytes and lets `fill` write it in place (for instance, read it from a file),
    /// without an intermediate buffer. `fill` gets zeroed bytes. If it fails, the entry is taken back (its bytes
    /// zeroed again) and its error returned; if the entry does not fit, `fill` is not called and
    /// [`CacheError::FixedFull`] is returned, converted to `E`.
    pub fn push_with<E>(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<FixedId, E>
    where
        E: From<CacheError>,
    {
        let (end, n_entries) = (self.end, self.n_entries);
        let id = self.reserve(len)?;
        match fill(self.bytes_mut(id)) {
            Ok(()) => Ok(id),
            Err(e) => {
                self.bytes_mut(id).fill(0);
                (self.end, self.n_entries) = (end, n_entries);
                Err(e)
            }
        }
    }

    /// The finished region. Nothing is copied or reallocated: the unused tail of the capacity stays reserved
    /// (and, never written, unbacked).
    pub fn build(self) -> FixedRegion {
        FixedRegion {
            buf: self.buf,
            base: self.base,
            len: self.end,
            capacity: self.capacity,
            n_entries: self.n_entries,
        }
    }

    fn reserve(&mut self, len: usize) -> Result<FixedId, CacheError> {
        let offset = fixed_entry_bytes(self.end);
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => {
                self.end = end;
                self.n_entries += 1;
                Ok(FixedId { offset, len })
            }
            _ => Err(CacheError::FixedFull { len, offset, capacity: self.capacity }),
        }
    }

    fn bytes_mut(&mut self, id: FixedId) -> &mut [u8] {
        let start = self.base + id.offset;
        &mut self.buf[start..start + id.len]
    }
}

/// The fixed region: immutable bytes read without locks; see the module documentation. Share it by reference
/// (it is `Sync`); [`SegmentedCache`](crate::SegmentedCache) owns one.
pub struct FixedRegion {
    /// The allocation; moving it (from the builder) does not move its bytes, so `base` stays aligned.
    buf: Vec<u8>,
    base: usize,
    len: usize,
    capacity: usize,
    n_entries: usize,
}

impl fmt::Debug for FixedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedRegion")
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .field("n_entries", &self.n_entries)
            .finish()
    }
}

impl FixedRegion {
    /// An empty region (capacity 0).
    pub fn empty() -> FixedRegion {
        FixedRegionBuilder::new(0).build()
    }

    /// The bytes of entry `id`, which starts at a multiple of [`FIXED_ALIGN`] bytes. `id` must come from this
    /// region's builder: another region's id gives other bytes or, past this region's end, panics (a bug in the
    /// caller, not bad input).
    #[inline]
    pub fn get(&self, id: FixedId) -> &[u8] {
        &self.as_bytes()[id.offset..id.offset + id.len]
    }

    /// All bytes of the region, entries and the padding between them (zeros), up to the end of the last entry.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.base..self.base + self.len]
    }

    /// Bytes used: the end of the last entry.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte is used.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The capacity it was built with, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries pushed.
    pub fn n_entries(&self) -> usize {
        self.n_entries
    }

    /// Bytes of the allocation (for tests of [`fixed_region_bytes`]).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.buf.capacity()
    }
}
