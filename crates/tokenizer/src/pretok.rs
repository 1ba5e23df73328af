//! Pre-tokenizers: splitting text into words before BPE, as llama.cpp's `unicode_regex_split` does.
//!
//! llama.cpp applies a list of regexes in sequence, each one refining the pieces left by the previous one (no
//! piece ever spans a boundary made earlier), and for each regex keeps both the matches and the gaps between
//! them as pieces. The GPT-2 and Llama-3 patterns need look-ahead, which the `regex` crate lacks, so, like
//! llama.cpp's `unicode_regex_split_custom_gpt2` and `_llama3`, they are written out by hand here; the short
//! class-run patterns are hand-written too. Positions are counted in codepoints, as in llama.cpp.

use std::ops::Range;

use crate::unicode::{self, LETTER, NUMBER, PUNCT, WHITESPACE};

/// The family of pre-tokenizer regexes a BPE vocabulary uses (GGUF `tokenizer.ggml.pre`).
///
/// Several GGUF names share one family; [`PreTokenizer::from_gguf_name`] maps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreTokenizer {
    /// llama.cpp's fallback (`"default"` or a missing name): punctuation runs, the GPT-2 pattern, digit runs,
    /// then groups of three ASCII digits.
    Default,
    /// The GPT-2 pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`.
    Gpt2,
    /// `\p{N}` (every digit alone), then the GPT-2 pattern: SmolLM, StarCoder and relatives.
    Smollm,
    /// The Llama-3 pattern, with digits in groups of up to three.
    Llama3,
    /// The Llama-3 pattern with every digit alone: Qwen2 and relatives.
    Qwen2,
}

/// Everything a GGUF pre-tokenizer name decides in llama.cpp's `llama_vocab::impl::load`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PreConfig {
    pub(crate) kind: PreTokenizer,
    /// Whole words found in the vocabulary are emitted without running BPE merges.
    pub(crate) ignore_merges: bool,
    /// The default of `add_bos` when the GGUF does not say.
    pub(crate) add_bos: bool,
    /// llama.cpp's `clean_spaces` (`clean_up_tokenization_spaces`), applied when detokenizing.
    pub(crate) clean_spaces: bool,
}

impl PreTokenizer {
    /// The family and settings llama.cpp gives a GGUF `tokenizer.ggml.pre` name, or `None` when pinion does not
    /// know the name (llama.cpp refuses to load such a model).
    pub(crate) fn config(name: &str) -> Option<PreConfig> {
        use PreTokenizer::*;
        let cfg = |kind, ignore_merges, add_bos, clean_spaces| PreConfig {
            kind,
            ignore_merges,
            add_bos,
            clean_spaces,
        };
        Some(match name {
            "default" => cfg(Default, false, false, true),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
            | "lfm2" | "jina-v5-nano" => cfg(Llama3, true, true, true),
            "dbrx" | "smaug-bpe" => cfg(Llama3, false, false, true),
            "gpt-2" | "phi-2" | "gigachat" | "a.x-4.0" | "mellum" | "mpt" | "olmo" | "jais" | "exaone4" => {
                cfg(Gpt2, false, false, true)
            }
            "trillion" | "granite-docling" => cfg(Gpt2, false, false, false),
            "smollm" | "command-r" => cfg(Smollm, false, false, false),
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
                cfg(Smollm, false, false, true)
            }
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" => {
                cfg(Qwen2, false, false, false)
            }
            "stablelm2" | "megrez" => cfg(Qwen2, false, false, true),
            _ => return None,
        })
    }

    /// The family llama.cpp uses for a GGUF `tokenizer.ggml.pre` name, if pinion supports it.
    pub fn from_gguf_name(name: &str) -> Option<PreTokenizer> {
        Self::config(name).map(|c| c.kind)
    }

    /// Splits `text` into words, appending their byte ranges (relative to `text`) to `out`.
    ///
    /// The ranges are contiguous and cover `text` exactly.
    pub(crate) fn split(self, text: &str, out: &mut Vec<Range<usize>>) {
        if text.is_empty() {
            return;
        }
        let cps = Cps::new(text);
        let whole = vec![cps.len()];
        let pieces = match self {
            PreTokenizer::Gpt2 => split_gpt2(&cps, &whole),
            PreTokenizer::Smollm => split_gpt2(&cps, &split_runs(&cps, &whole, Run::EachNumber)),
            PreTokenizer::Llama3 => split_llama3(&cps, &whole, 3),
            PreTokenizer::Qwen2 => split_llama3(&cps, &whole, 1),
            PreTokenizer::Default => {
                let a = split_runs(&cps, &whole, Run::PunctOrMathSymbols);
                let b = split_gpt2(&cps, &a);
                let c = split_runs(&cps, &b, Run::Numbers);
                split_runs(&cps, &c, Run::AsciiDigitTriples)
            }
        };
        let mut cp = 0;
        for len in pieces {
            out.push(cps.byte_at(cp)..cps.byte_at(cp + len));
            cp += len;
        }
    }
}

/// The codepoints of a text with their category flags and byte offsets.
struct Cps {
    chars: Vec<char>,
    flags: Vec<u8>,
    /// Byte offset of each codepoint, plus the text's length at the end.
    bytes: Vec<usize>,
}

impl Cps {
    fn new(text: &str) -> Cps {
        let n = text.len();
        let mut chars = Vec::with_capacity(n);
        let mut flags = Vec::with_capacity(n);
        let mut bytes = Vec::with_capacity(n + 1);
        let classes = unicode::table();
        for (i, c) in text.char_indices() {
            chars.push(c);
            flags.push(classes.flags(c));
            bytes.push(i);
        }
        bytes.push(n);
        Cps { chars, flags, bytes }
    }

    fn len(&self) -> usize {
        self.chars.len()
    }

    fn byte_at(&self, cp: usize) -> usize {
        self.bytes[cp]
    }
}

/// A view of one piece of the text: positions outside `[ini, end)` read as "no codepoint", exactly as
/// llama.cpp's `_get_cpt` / `_get_flags` return `OUT_OF_RANGE` and empty flags there.
struct Piece<'a> {
    cps: &'a Cps,
    ini: usize,
    end: usize,
}

impl Piece<'_> {
    fn cpt(&self, pos: usize) -> Option<char> {
        (self.ini <= pos && pos < self.end).then(|| self.cps.chars[pos])
    }

    fn flags(&self, pos: usize) -> u8 {
        if self.ini <= pos && pos < self.end { self.cps.flags[pos] } else { 0 }
    }

    fn in_range(&self, pos: usize) -> bool {
        self.ini <= pos && pos < self.end
    }

    /// llama.cpp's `!(is_whitespace | is_letter | is_number) && as_uint()`: a codepoint that exists and is
    /// none of whitespace, letter or number.
    fn is_other(&self, pos: usize) -> bool {
        self.in_range(pos) && self.flags(pos) & (WHITESPACE | LETTER | NUMBER) == 0
    }
}

/// Collects piece lengths, skipping empty ones, like llama.cpp's `_add_token`.
struct Emitter<'a> {
    out: &'a mut Vec<usize>,
    prev_end: usize,
}

impl Emitter<'_> {
    fn add(&mut self, end: usize) -> usize {
        let len = end - self.prev_end;
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }
}

fn is_contraction_tail(a: Option<char>, b: Option<char>) -> usize {
    match (a, b) {
        (Some('s' | 't' | 'm' | 'd'), _) => 2,
        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
        _ => 0,
    }
}

/// The GPT-2 pattern, as llama.cpp's `unicode_regex_split_custom_gpt2`.
fn split_gpt2(cps: &Cps, offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut start = 0;
    for &len in offsets {
        let p = Piece { cps, ini: start, end: start + len };
        start += len;
        let mut em = Emitter { out: &mut out, prev_end: p.ini };
        let mut pos = p.ini;
        while pos < p.end {
            let cpt = p.cpt(pos);
            let flags = p.flags(pos);

            // 's|'t|'re|'ve|'m|'ll|'d
            if cpt == Some('\'') && pos + 1 < p.end {
                let next = p.cpt(pos + 1);
                let next2 = if pos + 2 < p.end { p.cpt(pos + 2) } else { None };
                let n = is_contraction_tail(next, next2);
                if n > 0 {
                    pos += em.add(pos + n);
                    continue;
                }
            }

            let space = cpt == Some(' ');
            let f2 = if space { p.flags(pos + 1) } else { flags };
            // ` ?\p{L}+` and ` ?\p{N}+`
            if let Some(class) = [LETTER, NUMBER].into_iter().find(|&c| f2 & c != 0) {
                pos += space as usize;
                while p.flags(pos) & class != 0 {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }
            // ` ?[^\s\p{L}\p{N}]+`
            let other_at = if space { pos + 1 } else { pos };
            if p.is_other(other_at) {
                pos = other_at;
                while p.is_other(pos) {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }

            let mut n_ws = 0;
            while p.flags(pos + n_ws) & WHITESPACE != 0 {
                n_ws += 1;
            }
            // `\s+(?!\S)`: all but the last whitespace when something follows.
            if n_ws > 1 && p.in_range(pos + n_ws) {
                pos += n_ws - 1;
                em.add(pos);
                continue;
            }
            // `\s+`
            if n_ws > 0 {
                pos += n_ws;
                em.add(pos);
                continue;
            }
            // No match: the codepoint stands alone.
            pos += 1;
            em.add(pos);
        }
    }
    out
}

/// Python's `str.lower()[0]`, which llama.cpp's `unicode_tolower` table holds.
fn to_lower(c: Option<char>) -> Option<char> {
    c.map(|c| c.to_lowercase().next().unwrap_or(c))
}

/// The Llama-3 pattern, as llama.cpp's `unicode_regex_split_custom_llama3`, with digit groups of up to
/// `max_digits` (3 for Llama-3; 1 gives Qwen2's `\p{N}`).
fn split_llama3(cps: &Cps, offsets: &[usize], max_digits: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut start = 0;
    for &len in offsets {
        let p = Piece { cps, ini: start, end: start + len };
        start += len;
        let mut em = Emitter { out: &mut out, prev_end: p.ini };
        let mut pos = p.ini;
        while pos < p.end {
            let cpt = p.cpt(pos);
            let flags = p.flags(pos);

            // (?i:'s|'t|'re|'ve|'m|'ll|'d)
            if cpt == Some('\'') && pos + 1 < p.end {
                let next = to_lower(p.cpt(pos + 1));
                let next2 = if pos + 2 < p.end { to_lower(p.cpt(pos + 2)) } else { None };
                let n = is_contraction_tail(next, next2);
                if n > 0 {
                    pos += em.add(pos + n);
                    continue;
                }
            }

            // [^\r\n\p{L}\p{N}]?\p{L}+
            let is_cr_lf = matches!(cpt, Some('\r' | '\n'));
            if !(is_cr_lf || flags & NUMBER != 0) && (flags & LETTER != 0 || p.flags(pos + 1) & LETTER != 0) {
                pos += 1;
                while p.flags(pos) & LETTER != 0 {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }

            // \p{N}{1,3}
            if flags & NUMBER != 0 {
                let mut ini = pos;
                while p.flags(pos) & NUMBER != 0 {
                    pos += 1;
                    if pos - ini >= max_digits {
                        em.add(pos);
                        ini = pos;
                    }
                }
                em.add(pos);
                continue;
            }

            // ` ?[^\s\p{L}\p{N}]+[\r\n]*`. llama.cpp tests the current codepoint's flags for being non-empty
            // here, which always holds inside the piece.
            let space = cpt == Some(' ');
            let other_at = if space { pos + 1 } else { pos };
            let f2 = p.flags(other_at);
            if f2 & (WHITESPACE | LETTER | NUMBER) == 0 && p.in_range(pos) {
                pos = other_at;
                while p.is_other(pos) {
                    pos += 1;
                }
                while matches!(p.cpt(pos), Some('\r' | '\n')) {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }

            let mut n_ws = 0;
            let mut last_end_r_or_n = 0;
            while p.flags(pos + n_ws) & WHITESPACE != 0 {
                if matches!(p.cpt(pos + n_ws), Some('\r' | '\n')) {
                    last_end_r_or_n = pos + n_ws + 1;
                }
                n_ws += 1;
            }
            // \s*[\r\n]+
            if last_end_r_or_n > 0 {
                pos = last_end_r_or_n;
                em.add(pos);
                continue;
            }
            // \s+(?!\S)
            if n_ws > 1 && p.in_range(pos + n_ws) {
                pos += n_ws - 1;
                em.add(pos);
                continue;
            }
            // \s+
            if n_ws > 0 {
                pos += n_ws;
                em.add(pos);
                continue;
            }
            pos += 1;
            em.add(pos);
        }
    }
    out
}

/// The simple patterns llama.cpp runs through `std::regex`; each match and each gap between matches becomes a
/// piece.
#[derive(Clone, Copy)]
enum Run {
    /// `\p{N}`: every number codepoint alone.
    EachNumber,
    /// `\p{N}+`.
    Numbers,
    /// `[\p{P}\$\+<=>\^~\|]+`.
    PunctOrMathSymbols,
    /// `[0-9][0-9][0-9]`.
    AsciiDigitTriples,
}

impl Run {
    /// The length of the match starting at `pos`, if any (leftmost-first, as `std::regex_iterator`).
    fn match_at(self, p: &Piece<'_>, pos: usize) -> usize {
        let run = |pred: &dyn Fn(usize) -> bool| {
            let mut n = 0;
            while p.in_range(pos + n) && pred(pos + n) {
                n += 1;
            }
            n
        };
        match self {
            Run::EachNumber => (p.flags(pos) & NUMBER != 0) as usize,
            Run::Numbers => run(&|i| p.flags(i) & NUMBER != 0),
            Run::PunctOrMathSymbols => run(&|i| {
                p.flags(i) & PUNCT != 0
                    || matches!(p.cpt(i), Some('$' | '+' | '<' | '=' | '>' | '^' | '~' | '|'))
            }),
            Run::AsciiDigitTriples => {
                if run(&|i| matches!(p.cpt(i), Some('0'..='9'))) >= 3 {
                    3
                } else {
                    0
                }
            }
        }
    }
}

fn split_runs(cps: &Cps, offsets: &[usize], run: Run) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut start = 0;
    for &len in offsets {
        let p = Piece { cps, ini: start, end: start + len };
        start += len;
        let mut em = Emitter { out: &mut out, prev_end: p.ini };
        let mut pos = p.ini;
        while pos < p.end {
            let n = run.match_at(&p, pos);
            if n > 0 {
                em.add(pos);
                pos += n;
                em.add(pos);
            } else {
                pos += 1;
            }
        }
        em.add(p.end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        let mut r = Vec::new();
        pre.split(text, &mut r);
        r.into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn gpt2_pattern() {
        let g = PreTokenizer::Gpt2;
        assert_eq!(words(g, "Hello world"), ["Hello", " world"]);
        assert_eq!(words(g, "Don't you'll"), ["Don", "'t", " you", "'ll"]);
        assert_eq!(words(g, "  leading and trailing   "), [" ", " leading", " and", " trailing", "   "]);
        assert_eq!(words(g, "a   b"), ["a", "  ", " b"]);
        assert_eq!(words(g, "x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(words(g, "3.14 ok!!"), ["3", ".", "14", " ok", "!!"]);
        assert_eq!(words(g, "\tTab"), ["\t", "Tab"]);
        assert_eq!(words(g, "x \t"), ["x", " \t"]);
    }

    #[test]
    fn smollm_splits_every_digit() {
        let s = PreTokenizer::Smollm;
        assert_eq!(words(s, "Numbers: 3.14"), ["Numbers", ":", " ", "3", ".", "1", "4"]);
        assert_eq!(words(s, "year 1999"), ["year", " ", "1", "9", "9", "9"]);
        assert_eq!(words(s, "x² + y²"), ["x", "²", " +", " y", "²"]);
    }

    #[test]
    fn llama3_pattern() {
        let l = PreTokenizer::Llama3;
        assert_eq!(words(l, "Hello world"), ["Hello", " world"]);
        assert_eq!(words(l, "1234567"), ["123", "456", "7"]);
        assert_eq!(words(l, "I'LL go"), ["I", "'LL", " go"]);
        assert_eq!(words(l, "a\n\n  b"), ["a", "\n\n", " ", " b"]);
        assert_eq!(words(l, "(x) ok..\n"), ["(x", ")", " ok", "..\n"]);
        assert_eq!(words(PreTokenizer::Qwen2, "x 123"), ["x", " ", "1", "2", "3"]);
    }

    #[test]
    fn default_pattern() {
        let d = PreTokenizer::Default;
        assert_eq!(words(d, "a+b=12345!"), ["a", "+", "b", "=", "123", "45", "!"]);
    }

    #[test]
    fn pieces_cover_the_text() {
        for pre in [
            PreTokenizer::Default,
            PreTokenizer::Gpt2,
            PreTokenizer::Smollm,
            PreTokenizer::Llama3,
            PreTokenizer::Qwen2,
        ] {
            let text = "Ünïcödé 日本語 123 'S x\r\n\t  y 🚀!? ";
            assert_eq!(words(pre, text).concat(), text, "{pre:?}");
        }
    }
}
