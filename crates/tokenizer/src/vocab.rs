//! Compact storage for a vocabulary's strings: all texts back to back in one buffer with a table of offsets,
//! and an open-addressing hash table of ids to find a text's id, instead of one or two heap allocations per
//! token. SmolLM2's 49,152 token texts take 0.9 MiB this way, where a `Vec<String>` and a
//! `HashMap<String, u32>` took about 6 MiB.

use std::hash::Hasher;

use rustc_hash::FxHasher;

/// The texts of a table do not fit in its 32-bit offsets (4 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooLarge;

/// Offsets of items stored back to back: item `i` is `starts[i]..starts[i + 1]` of the buffer.
#[derive(Clone, Debug)]
struct Starts(Vec<u32>);

impl Starts {
    fn with_capacity(n: usize) -> Starts {
        let mut v = Vec::with_capacity(n + 1);
        v.push(0);
        Starts(v)
    }

    fn len(&self) -> usize {
        self.0.len() - 1
    }

    /// The byte range of item `i`, if there is one.
    fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        match self.0.get(i..)? {
            &[start, end, ..] => Some(start as usize..end as usize),
            _ => None,
        }
    }

    /// Records that the buffer now ends at `end`.
    fn push(&mut self, end: usize) -> Result<(), TooLarge> {
        self.0.push(u32::try_from(end).map_err(|_| TooLarge)?);
        Ok(())
    }

    fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }

    fn heap_bytes(&self) -> usize {
        self.0.capacity() * size_of::<u32>()
    }
}

/// Byte strings stored in one buffer, indexed from 0.
#[derive(Clone, Debug)]
pub(crate) struct ByteArena {
    bytes: Vec<u8>,
    starts: Starts,
}

impl ByteArena {
    /// An empty arena with room for `n` items of `bytes` bytes in all.
    pub(crate) fn with_capacity(n: usize, bytes: usize) -> ByteArena {
        ByteArena { bytes: Vec::with_capacity(bytes), starts: Starts::with_capacity(n) }
    }

    /// The buffer to append the next item's bytes to; [`ByteArena::finish_item`] ends the item.
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Ends the item whose bytes were appended to [`ByteArena::buffer`] since the previous item.
    pub(crate) fn finish_item(&mut self) -> Result<(), TooLarge> {
        self.starts.push(self.bytes.len())
    }

    /// Item `i`, or `None` past the end.
    pub(crate) fn get(&self, i: usize) -> Option<&[u8]> {
        self.starts.range(i).map(|r| &self.bytes[r])
    }

    /// Drops spare capacity.
    pub(crate) fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.starts.shrink_to_fit();
    }

    /// Bytes allocated on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.starts.heap_bytes()
    }
}

/// UTF-8 strings stored in one buffer, indexed from 0.
#[derive(Clone, Debug)]
pub(crate) struct StrArena {
    text: String,
    starts: Starts,
}

impl StrArena {
    fn with_capacity(n: usize, bytes: usize) -> StrArena {
        StrArena { text: String::with_capacity(bytes), starts: Starts::with_capacity(n) }
    }

    /// Number of strings.
    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }

    /// String `i`, or `None` past the end.
    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        // Every range starts and ends where a pushed `&str` did, so it is on character boundaries.
        self.starts.range(i).map(|r| &self.text[r])
    }

    fn push(&mut self, s: &str) -> Result<(), TooLarge> {
        self.text.push_str(s);
        let r = self.starts.push(self.text.len());
        if r.is_err() {
            self.text.truncate(self.text.len() - s.len());
        }
        r
    }

    fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.starts.shrink_to_fit();
    }

    /// Bytes allocated on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.starts.heap_bytes()
    }
}

/// A slot of [`StrTable`]'s hash table that holds no id.
const EMPTY: u32 = u32::MAX;

fn hash(text: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(text.as_bytes());
    h.finish()
}

/// Distinct strings numbered in insertion order, found by number ([`StrTable::get`]) or by text
/// ([`StrTable::id`]).
///
/// The hash table is linear-probing over twice as many slots as strings (8 bytes per string), each the id of a
/// string or [`EMPTY`]; at most half full, a lookup, hit or miss, compares against about one or two texts.
#[derive(Clone, Debug)]
pub(crate) struct StrTable {
    arena: StrArena,
    slots: Vec<u32>,
}

/// The number of slots for `n` strings.
fn n_slots(n: usize) -> usize {
    n.max(4) * 2
}

impl StrTable {
    /// An empty table sized for `n` strings of `bytes` bytes in all; it grows past that as needed.
    pub(crate) fn with_capacity(n: usize, bytes: usize) -> StrTable {
        StrTable { arena: StrArena::with_capacity(n, bytes), slots: vec![EMPTY; n_slots(n)] }
    }

    /// Number of strings.
    pub(crate) fn len(&self) -> usize {
        self.arena.len()
    }

    /// String `id`, or `None` past the end.
    pub(crate) fn get(&self, id: u32) -> Option<&str> {
        self.arena.get(id as usize)
    }

    /// Length of all strings together.
    pub(crate) fn text_bytes(&self) -> usize {
        self.arena.text.len()
    }

    /// String `id`, which must exist.
    pub(crate) fn text(&self, id: u32) -> &str {
        self.get(id).unwrap_or_else(|| panic!("string {id} of {} looked up", self.len()))
    }

    /// The id of `text`, if present.
    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        match self.slots[self.probe(text)] {
            EMPTY => None,
            id => Some(id),
        }
    }

    /// The slot holding `text`, or the empty slot where it would go.
    fn probe(&self, text: &str) -> usize {
        let n = self.slots.len();
        // The hash scaled to `0..n` (Lemire's multiply-shift), which needs no power-of-two size.
        let mut i = ((hash(text) as u128 * n as u128) >> 64) as usize;
        loop {
            let id = self.slots[i];
            if id == EMPTY || self.arena.get(id as usize) == Some(text) {
                return i;
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// The id of `text`, adding it with the next id if absent; the flag says whether it was added.
    pub(crate) fn intern(&mut self, text: &str) -> Result<(u32, bool), TooLarge> {
        let mut slot = self.probe(text);
        if self.slots[slot] != EMPTY {
            return Ok((self.slots[slot], false));
        }
        let id = self.len();
        // Ids stay below `EMPTY`, and the table at most half full.
        if id >= EMPTY as usize {
            return Err(TooLarge);
        }
        if (id + 1) * 2 > self.slots.len() {
            self.grow();
            slot = self.probe(text);
        }
        self.arena.push(text)?;
        self.slots[slot] = id as u32;
        Ok((id as u32, true))
    }

    fn grow(&mut self) {
        self.slots = vec![EMPTY; self.slots.len() * 2];
        for id in 0..self.len() as u32 {
            let slot = self.probe(self.text(id));
            self.slots[slot] = id;
        }
    }

    /// Drops spare capacity of the strings (the hash table keeps its size).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.arena.shrink_to_fit();
    }

    /// The strings without the hash table.
    pub(crate) fn into_arena(mut self) -> StrArena {
        self.arena.shrink_to_fit();
        self.arena
    }

    /// Bytes allocated on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.arena.heap_bytes() + self.slots.capacity() * size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_finds_every_string_by_id_and_text() {
        let mut t = StrTable::with_capacity(2, 4);
        let words: Vec<String> = (0..1000).map(|i| format!("w{i}")).chain(["".into(), "▁é".into()]).collect();
        for (i, w) in words.iter().enumerate() {
            assert_eq!(t.intern(w), Ok((i as u32, true)));
        }
        assert_eq!(t.len(), words.len());
        for (i, w) in words.iter().enumerate() {
            assert_eq!(t.intern(w), Ok((i as u32, false)));
            assert_eq!(t.id(w), Some(i as u32));
            assert_eq!(t.get(i as u32), Some(w.as_str()));
        }
        assert_eq!(t.id("w1000"), None);
        assert_eq!(t.id("w"), None);
        assert_eq!(t.get(words.len() as u32), None);
        assert!(t.slots.len() >= 2 * t.len());
        let arena = t.into_arena();
        assert_eq!(arena.get(1001), Some("▁é"));
        assert_eq!(arena.heap_bytes(), words.iter().map(String::len).sum::<usize>() + 4 * (words.len() + 1));
    }

    #[test]
    fn byte_arena_items() {
        let mut a = ByteArena::with_capacity(3, 0);
        for item in [&b"ab"[..], b"", b"\xff"] {
            a.buffer().extend_from_slice(item);
            a.finish_item().unwrap();
        }
        assert_eq!(a.get(0), Some(&b"ab"[..]));
        assert_eq!(a.get(1), Some(&b""[..]));
        assert_eq!(a.get(2), Some(&b"\xff"[..]));
        assert_eq!(a.get(3), None);
    }
}
