//! Byte-level BPE merging of one pre-tokenized word, as llama.cpp's `llm_tokenizer_bpe_session`.
//!
//! llama.cpp keys merges on pairs of strings. Here every string that can appear as a symbol (every token, plus
//! any merge operand or result that is not a token) gets a symbol id, and merges are keyed on pairs of ids: the
//! same ranking, without building a string per candidate pair. Symbol ids below the vocabulary size are the
//! token ids themselves.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::unicode;
use crate::vocab::{StrArena, StrTable, TooLarge};
use rustc_hash::FxHashMap;

/// The merge table of a byte-level BPE vocabulary.
#[derive(Debug)]
pub(crate) struct BpeModel {
    /// `(left << 32 | right)` to `(rank, merged symbol)`.
    merges: FxHashMap<u64, (u32, u32)>,
    /// Texts of symbols that are not tokens, indexed by `symbol - n_vocab`.
    extra: StrArena,
    n_vocab: u32,
    /// The symbol of each raw byte (its GPT-2 character).
    byte_sym: [u32; 256],
    /// The GPT-2 character of each raw byte.
    pub(crate) byte_char: [char; 256],
    /// Tokens whose text is one ASCII character, for llama.cpp's fallback on symbols that are not tokens.
    ascii_token: [Option<u32>; 128],
}

fn pair_key(left: u32, right: u32) -> u64 {
    (left as u64) << 32 | right as u64
}

impl BpeModel {
    /// Builds the merge table. `merges` are `"left right"` lines; a line's index is its rank.
    pub(crate) fn new(vocab: &StrTable, merges: &[&str]) -> Result<BpeModel, TooLarge> {
        let n_vocab = vocab.len() as u32;
        let mut extra = StrTable::with_capacity(0, 0);
        let mut intern = |s: &str| -> Result<u32, TooLarge> {
            if let Some(id) = vocab.id(s) {
                return Ok(id);
            }
            let (id, _) = extra.intern(s)?;
            n_vocab.checked_add(id).filter(|&sym| sym != DEAD).ok_or(TooLarge)
        };

        let byte_char = unicode::byte_to_char_table();
        let mut byte_sym = [0u32; 256];
        for (b, sym) in byte_sym.iter_mut().enumerate() {
            *sym = intern(byte_char[b].encode_utf8(&mut [0u8; 4]))?;
        }

        let mut table = FxHashMap::default();
        table.reserve(merges.len());
        let mut joined = String::new();
        for (rank, line) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte; a line without one becomes the
            // (never matching) pair of empty strings.
            let (left, right) = match line.as_bytes().iter().skip(1).position(|&b| b == b' ') {
                Some(p) => (&line[..p + 1], &line[p + 2..]),
                None => ("", ""),
            };
            let l = intern(left)?;
            let r = intern(right)?;
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            let m = intern(&joined)?;
            // The first occurrence of a pair keeps its rank, as `unordered_map::emplace` does.
            table.entry(pair_key(l, r)).or_insert((rank as u32, m));
        }

        let mut ascii_token = [None; 128];
        for (b, slot) in ascii_token.iter_mut().enumerate() {
            *slot = vocab.id(char::from(b as u8).encode_utf8(&mut [0u8; 4]));
        }

        Ok(BpeModel { merges: table, extra: extra.into_arena(), n_vocab, byte_sym, byte_char, ascii_token })
    }

    /// Number of merge rules.
    pub(crate) fn n_merges(&self) -> usize {
        self.merges.len()
    }

    /// Bytes allocated on the heap: the merge table as hashbrown lays it out (a power of two of buckets, at
    /// most 7/8 full, each an entry and a control byte) and the extra symbols' texts.
    pub(crate) fn heap_bytes(&self) -> usize {
        let cap = self.merges.capacity();
        let buckets = match cap {
            0 => 0,
            1..8 => (cap + 1).next_power_of_two(),
            _ => (cap * 8).div_ceil(7).next_power_of_two(),
        };
        buckets * (size_of::<(u64, (u32, u32))>() + 1) + self.extra.heap_bytes()
    }

    /// Merges the raw bytes of one word and appends the resulting token ids to `out`.
    pub(crate) fn encode_word(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let syms = &mut scratch.syms;
        let heap = &mut scratch.heap;
        syms.clear();
        heap.clear();
        let n = word.len();
        for (i, &b) in word.iter().enumerate() {
            let prev = if i == 0 { NONE } else { i as u32 - 1 };
            let next = if i + 1 == n { NONE } else { i as u32 + 1 };
            syms.push(Sym { sym: self.byte_sym[b as usize], prev, next });
        }
        for i in 1..n {
            self.push_pair(syms, heap, i as u32 - 1, i as u32);
        }

        while let Some(Reverse(cand)) = heap.pop() {
            let (l, r) = (cand.left as usize, cand.right as usize);
            // Skip pairs made stale by an earlier merge: a symbol that was merged away (`DEAD`) or changed.
            if syms[l].sym != cand.left_sym || syms[r].sym != cand.right_sym {
                continue;
            }
            syms[l].sym = cand.merged;
            syms[r].sym = DEAD;
            let next = syms[r].next;
            syms[l].next = next;
            if next != NONE {
                syms[next as usize].prev = cand.left;
            }
            let prev = syms[l].prev;
            if prev != NONE {
                self.push_pair(syms, heap, prev, cand.left);
            }
            if next != NONE {
                self.push_pair(syms, heap, cand.left, next);
            }
        }

        let mut i = if n > 0 { 0 } else { NONE };
        while i != NONE {
            let s = syms[i as usize];
            if s.sym < self.n_vocab {
                out.push(s.sym);
            } else {
                // Not a token: llama.cpp looks up each byte of the symbol's text as a one-byte token, which can
                // only succeed for ASCII bytes.
                let text = self.extra.get((s.sym - self.n_vocab) as usize).unwrap_or_default();
                out.extend(
                    text.bytes().filter(|b| b.is_ascii()).filter_map(|b| self.ascii_token[b as usize]),
                );
            }
            i = s.next;
        }
    }

    fn push_pair(&self, syms: &[Sym], heap: &mut BinaryHeap<Reverse<Candidate>>, left: u32, right: u32) {
        let (ls, rs) = (syms[left as usize].sym, syms[right as usize].sym);
        if let Some(&(rank, merged)) = self.merges.get(&pair_key(ls, rs)) {
            heap.push(Reverse(Candidate { rank, left, right, left_sym: ls, right_sym: rs, merged }));
        }
    }
}

const NONE: u32 = u32::MAX;
const DEAD: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Sym {
    sym: u32,
    prev: u32,
    next: u32,
}

/// A candidate merge. Ordered by rank, then by position, as llama.cpp's `llm_bigram_bpe::comparator`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    rank: u32,
    left: u32,
    right: u32,
    left_sym: u32,
    right_sym: u32,
    merged: u32,
}

/// Buffers reused across the words of one `encode` call.
#[derive(Default)]
pub(crate) struct Scratch {
    syms: Vec<Sym>,
    heap: BinaryHeap<Reverse<Candidate>>,
}
