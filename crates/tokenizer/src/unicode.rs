//! Unicode facts the pre-tokenizers need: per-codepoint category flags and GPT-2's byte-to-character mapping.
//!
//! llama.cpp classifies codepoints with a table (`unicode-data.cpp`) generated from Python's `regex` module
//! (`\p{L}`, `\p{N}`, `\p{P}`, `\s`) at Unicode 15.1: codepoints assigned later are "undefined" there. This
//! module builds the same classification once per process (a two-level table of about 42 KiB) from the
//! `regex` crate's Unicode tables, restricted to codepoints assigned by Unicode 15.1 (`\p{Age=V15_1}`), so
//! that a letter added in Unicode 16 is not a letter here either. Whitespace is the Unicode `White_Space`
//! property, which is what both Python's `regex` `\s` and [`char::is_whitespace`] implement.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

/// The codepoint is a letter (`\p{L}`).
pub(crate) const LETTER: u8 = 1 << 0;
/// The codepoint is a number (`\p{N}`).
pub(crate) const NUMBER: u8 = 1 << 1;
/// The codepoint is punctuation (`\p{P}`).
pub(crate) const PUNCT: u8 = 1 << 2;
/// The codepoint is whitespace (`\s`, the `White_Space` property).
pub(crate) const WHITESPACE: u8 = 1 << 3;

/// Number of Unicode codepoints.
const N_CODEPOINTS: usize = 0x11_0000;

/// Codepoints per block of [`Table`].
const BLOCK_SHIFT: u32 = 8;
const BLOCK_LEN: usize = 1 << BLOCK_SHIFT;

/// One byte of flags per codepoint, as a two-level table: the 4,352 blocks of 256 codepoints share the 132
/// distinct contents among them (most blocks are all letters, or unassigned), about 42 KiB where a flat table
/// takes 1.1 MiB of heap for the whole process.
pub(crate) struct Table {
    /// For each block of codepoints, which block of `blocks` holds its flags.
    index: Box<[u16]>,
    /// Distinct blocks of flags, `BLOCK_LEN` bytes each.
    blocks: Box<[u8]>,
}

/// The table, built on first use and shared by every tokenizer.
pub(crate) fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| compress(&build_flat_table()))
}

/// One byte of flags per codepoint.
fn build_flat_table() -> Box<[u8]> {
    let mut flags = vec![0u8; N_CODEPOINTS].into_boxed_slice();
    let mut all = String::with_capacity(4 * N_CODEPOINTS);
    for c in (0..N_CODEPOINTS as u32).filter_map(char::from_u32) {
        all.push(c);
        if c.is_whitespace() {
            flags[c as usize] |= WHITESPACE;
        }
    }
    // Runs of each class are found with one pass of the regex engine over a string holding every codepoint,
    // which is far faster than matching codepoints one at a time.
    for (pattern, bit) in [
        (r"[\p{L}&&\p{Age=V15_1}]+", LETTER),
        (r"[\p{N}&&\p{Age=V15_1}]+", NUMBER),
        (r"[\p{P}&&\p{Age=V15_1}]+", PUNCT),
    ] {
        let re = Regex::new(pattern).expect("constant Unicode class pattern compiles");
        for m in re.find_iter(&all) {
            for c in m.as_str().chars() {
                flags[c as usize] |= bit;
            }
        }
    }
    flags
}

/// The two-level form of a flat table: equal blocks are stored once.
fn compress(flat: &[u8]) -> Table {
    let mut seen: HashMap<&[u8], u16> = HashMap::new();
    let mut blocks = Vec::new();
    let index = flat
        .chunks(BLOCK_LEN)
        .map(|block| {
            *seen.entry(block).or_insert_with(|| {
                blocks.extend_from_slice(block);
                // At most N_CODEPOINTS / BLOCK_LEN = 4,352 distinct blocks.
                (blocks.len() / BLOCK_LEN - 1) as u16
            })
        })
        .collect();
    Table { index, blocks: blocks.into_boxed_slice() }
}

impl Table {
    /// The category flags of `c`.
    #[inline]
    pub(crate) fn flags(&self, c: char) -> u8 {
        let cp = c as usize;
        if cp < BLOCK_LEN {
            // The first block is stored first: one load for ASCII and Latin-1.
            return self.blocks[cp];
        }
        let block = self.index[cp >> BLOCK_SHIFT] as usize;
        self.blocks[block << BLOCK_SHIFT | (cp & (BLOCK_LEN - 1))]
    }
}

/// The category flags of `c`.
#[cfg(test)]
fn flags(c: char) -> u8 {
    table().flags(c)
}

/// Forces the table to be built now rather than on the first tokenization.
pub(crate) fn warm_up() {
    let _ = table();
}

/// GPT-2's `bytes_to_unicode`: every byte maps to a printable character, bytes that are printable in Latin-1 to
/// themselves and the rest to U+0100 and up, in byte order.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut printable = [false; 256];
    for b in (0x21..=0x7E).chain(0xA1..=0xAC).chain(0xAE..=0xFF) {
        printable[b] = true;
    }
    let mut n = 0u32;
    for b in 0..256usize {
        let cp = if printable[b] {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        map[b] = char::from_u32(cp).expect("codepoints below 0x200 are valid");
    }
    map
}

/// The inverse of [`byte_to_char_table`]: the byte a character stands for, if it is one of the 256.
pub(crate) fn char_to_byte(table: &[char; 256], c: char) -> Option<u8> {
    // The mapping is monotone in two pieces, so a direct computation would do, but a search of 256 entries is
    // simple and only runs when the token-to-piece cache is built.
    table.iter().position(|&m| m == c).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_common_characters() {
        assert_eq!(flags('a'), LETTER);
        assert_eq!(flags('Ω'), LETTER);
        assert_eq!(flags('日'), LETTER);
        assert_eq!(flags('7'), NUMBER);
        assert_eq!(flags('²'), NUMBER);
        assert_eq!(flags('Ⅻ'), NUMBER);
        assert_eq!(flags('!'), PUNCT);
        assert_eq!(flags('«'), PUNCT);
        assert_eq!(flags('$'), 0);
        assert_eq!(flags('∑'), 0);
        assert_eq!(flags(' '), WHITESPACE);
        assert_eq!(flags('\u{a0}'), WHITESPACE);
        assert_eq!(flags('\u{3000}'), WHITESPACE);
        assert_eq!(flags('\u{1c}'), 0, "U+001C is not White_Space");
        assert_eq!(flags('\u{301}'), 0, "combining marks are \\p{{M}}, not letters");
        // llama.cpp's table is Unicode 15.1: CJK Extension I (15.1) is in, Unicode 16's additions are not.
        assert_eq!(flags('\u{2EBF0}'), LETTER);
        assert_eq!(flags('\u{1C89}'), 0, "Cyrillic TJE, new in Unicode 16");
        assert_eq!(flags('\u{1FBF0}'), NUMBER);
        assert_eq!(flags('\u{1CCF0}'), 0, "outlined digit zero, new in Unicode 16");
    }

    #[test]
    fn two_level_table_equals_the_flat_one() {
        let flat = build_flat_table();
        let t = table();
        for c in (0..N_CODEPOINTS as u32).filter_map(char::from_u32) {
            assert_eq!(flags(c), flat[c as usize], "U+{:04X}", c as u32);
        }
        assert_eq!(t.index.len(), N_CODEPOINTS / BLOCK_LEN);
        assert!(t.blocks.len() + 2 * t.index.len() < 64 * 1024, "{} bytes of blocks", t.blocks.len());
    }

    #[test]
    fn gpt2_byte_mapping() {
        let t = byte_to_char_table();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'\t' as usize], 'ĉ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let mut seen = std::collections::HashSet::new();
        for (b, &c) in t.iter().enumerate() {
            assert!(seen.insert(c), "character {c:?} used twice");
            assert_eq!(char_to_byte(&t, c), Some(b as u8));
        }
    }
}
