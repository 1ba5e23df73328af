//! SentencePiece-style BPE, as llama.cpp's `llm_tokenizer_spm_session`: start from single characters and
//! repeatedly merge the adjacent pair whose concatenation is the highest-scoring token.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::vocab::StrTable;

/// What the merge loop needs from the vocabulary.
pub(crate) struct SpmVocab<'a> {
    pub(crate) tokens: &'a StrTable,
    pub(crate) scores: &'a [f32],
    /// The token of each byte for characters that are not tokens: `<0xXX>`, else the byte itself as a token.
    pub(crate) byte_tokens: &'a [Option<u32>; 256],
}

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    /// Length in bytes; 0 once merged into the symbol on its left.
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

/// A candidate merge. The heap pops the highest score first and, among equal scores, the leftmost pair, as
/// llama.cpp's `llm_bigram_spm::comparator`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

/// Tokenizes `text` (whitespace already escaped to U+2581) and appends the ids to `out`.
pub(crate) fn encode(vocab: &SpmVocab<'_>, text: &str, out: &mut Vec<u32>) {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        let len = c.len_utf8();
        let next = if start + len == text.len() { NONE } else { i + 1 };
        syms.push(Sym { start, len, prev: if i == 0 { NONE } else { i - 1 }, next });
    }

    let mut heap = BinaryHeap::new();
    let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, left: usize, right: usize| {
        if left == NONE || right == NONE {
            return;
        }
        let (l, r) = (syms[left], syms[right]);
        let size = l.len + r.len;
        if let Some(id) = vocab.tokens.id(&text[l.start..l.start + size]) {
            let score = vocab.scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Bigram { score, left, right, size });
        }
    };
    for i in 1..syms.len() {
        try_add(&syms, &mut heap, i - 1, i);
    }

    while let Some(b) = heap.pop() {
        let (l, r) = (syms[b.left], syms[b.right]);
        // Skip pairs made stale by an earlier merge.
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
            continue;
        }
        syms[b.left].len += r.len;
        syms[b.right].len = 0;
        syms[b.left].next = r.next;
        if r.next != NONE {
            syms[r.next].prev = b.left;
        }
        let prev = syms[b.left].prev;
        let next = syms[b.left].next;
        try_add(&syms, &mut heap, prev, b.left);
        try_add(&syms, &mut heap, b.left, next);
    }

    let mut i = if syms.is_empty() { NONE } else { 0 };
    while i != NONE {
        let s = syms[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.tokens.id(piece) {
            Some(id) => out.push(id),
            // A merged symbol is always a token, so only a single character can get here; it is spelled out
            // as byte tokens.
            None => out.extend(piece.bytes().filter_map(|b| vocab.byte_tokens[b as usize])),
        }
        i = s.next;
    }
}
