//! Incremental detokenization for streaming generated text.

use crate::tokenizer::Tokenizer;

/// Turns tokens into text as they arrive, never splitting a UTF-8 character.
///
/// A token's piece can end in the middle of a multi-byte character (byte-level BPE splits emoji and CJK
/// characters across tokens); those bytes are held back until the character is complete. Bytes that can never
/// form a character become U+FFFD, as in [`Tokenizer::decode`]. Call [`StreamDecoder::flush`] at the end to
/// release whatever is still held.
///
/// The concatenated output equals [`Tokenizer::decode`] (or [`Tokenizer::decode_with_special`]) of the whole
/// sequence, except that llama.cpp's `clean_spaces` pass, which needs the whole text, is not applied: like
/// llama.cpp's own streaming examples, pieces are emitted as they are. SmolLM's and Qwen2's vocabularies do not
/// use that pass.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    special: bool,
    first: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder that leaves control tokens out.
    pub fn new() -> StreamDecoder {
        StreamDecoder { special: false, first: true, pending: Vec::new() }
    }

    /// A decoder that writes control tokens out as their text.
    pub fn with_special() -> StreamDecoder {
        StreamDecoder { special: true, ..StreamDecoder::new() }
    }

    /// Adds one token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        let mut piece = tokenizer.token_to_piece(id, self.special);
        if self.first && tokenizer.strips_first_space() {
            piece = piece.strip_prefix(b" ").unwrap_or(piece);
        }
        self.first = false;
        self.pending.extend_from_slice(piece);
        self.take_complete()
    }

    /// Returns everything still held, with an unfinished character as U+FFFD, and resets the decoder.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.first = true;
        out
    }

    /// Number of bytes held back waiting for the rest of a character.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is UTF-8 by construction of `valid_up_to`.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An unfinished character at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        StreamDecoder::new()
    }
}
