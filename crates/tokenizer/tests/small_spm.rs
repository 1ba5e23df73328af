//! SentencePiece-style tokenization on a small vocabulary built here, with byte-fallback tokens, checked
//! against ids worked out by hand from llama.cpp's `llm_tokenizer_spm_session`.

use pinion_tokenizer::{StreamDecoder, TokenType, Tokenizer, TokenizerParts, VocabKind};

const UNK: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;

/// Id of the byte-fallback token `<0xXX>`.
fn byte(b: u8) -> u32 {
    3 + b as u32
}

/// Normal pieces after the 256 byte tokens, with their scores.
const PIECES: &[(&str, f32)] = &[
    ("▁", -5.0),      // 259
    ("h", -6.0),      // 260
    ("e", -6.0),      // 261
    ("l", -6.0),      // 262
    ("o", -6.0),      // 263
    ("w", -6.0),      // 264
    ("r", -6.0),      // 265
    ("d", -6.0),      // 266
    ("a", -6.0),      // 267
    ("b", -6.0),      // 268
    ("c", -6.0),      // 269
    ("ll", -1.0),     // 270
    ("he", -2.0),     // 271
    ("hell", -1.5),   // 272
    ("hello", -0.5),  // 273
    ("▁hello", -0.2), // 274
    ("▁w", -2.5),     // 275
    ("or", -3.0),     // 276
    ("ld", -2.8),     // 277
    ("▁wor", -2.0),   // 278
    ("▁world", -9.0), // 279
    ("aa", -1.0),     // 280
    ("ab", -3.0),     // 281
    ("bc", -1.0),     // 282
];

fn piece(text: &str) -> u32 {
    259 + PIECES.iter().position(|(t, _)| *t == text).unwrap() as u32
}

fn vocab() -> Tokenizer {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    let mut scores = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TokenType::Byte);
        scores.push(0.0);
    }
    for (t, s) in PIECES {
        tokens.push(t.to_string());
        types.push(TokenType::Normal);
        scores.push(*s);
    }
    let mut p = TokenizerParts::new(VocabKind::Spm, tokens);
    p.token_types = Some(types);
    p.scores = Some(scores);
    Tokenizer::from_parts(p).unwrap()
}

#[test]
fn defaults_of_llama_vocabularies() {
    let t = vocab();
    assert_eq!(t.bos_id(), Some(BOS));
    assert_eq!(t.eos_id(), Some(EOS));
    assert_eq!(t.special_ids().unk, Some(UNK));
    assert!(t.add_bos());
    assert!(!t.add_eos());
    assert_eq!(t.eog_ids(), &[EOS], "</s> by text, and the EOS");
    assert_eq!(byte(0x0A), t.token_id("<0x0A>").unwrap());
    assert_eq!(piece("▁"), t.token_id("▁").unwrap());
}

#[test]
fn highest_score_merges_first() {
    // "▁hello▁world": "ll" (-1.0), then "he" (-2.0), then "hell" (-1.5, queued by the "he" merge), "hello",
    // "▁hello"; then "▁w" (-2.5), "ld" (-2.8), "or" (-3.0), "▁wor" (-2.0) and finally "▁world" (-9.0, the only
    // pair left).
    let t = vocab();
    assert_eq!(t.encode("hello world", false, false), [piece("▁hello"), piece("▁world")]);
    assert_eq!(t.encode("hello world", true, false), [BOS, piece("▁hello"), piece("▁world")]);
    // "▁abc": "bc" (-1.0) beats "ab" (-3.0).
    assert_eq!(t.encode("abc", false, false), [piece("▁"), piece("a"), piece("bc")]);
}

#[test]
fn equal_scores_merge_leftmost_first() {
    // "▁aaa": the pairs at 1-2 and 2-3 are both "aa"; the left one merges, which invalidates the right one.
    let t = vocab();
    assert_eq!(t.encode("aaa", false, false), [piece("▁"), piece("aa"), piece("a")]);
}

#[test]
fn characters_outside_the_vocabulary_fall_back_to_bytes() {
    let t = vocab();
    // 'i' and the emoji are not pieces: 'i' is one byte, U+1F600 four.
    let ids = t.encode("hi 😀", false, false);
    assert_eq!(
        ids,
        [piece("▁"), piece("h"), byte(b'i'), piece("▁"), byte(0xF0), byte(0x9F), byte(0x98), byte(0x80)]
    );
    // The first piece loses the space SentencePiece added.
    assert_eq!(t.decode(&ids), "hi 😀");

    let mut d = StreamDecoder::new();
    let chunks: Vec<String> = ids.iter().map(|&i| d.push(&t, i)).collect();
    assert_eq!(chunks, ["", "h", "i", " ", "", "", "", "😀"]);
    assert_eq!(d.flush(), "");
}

#[test]
fn space_prefix_after_special_tokens() {
    let t = vocab();
    // Text after a special token gets the prefix space again (llama.cpp's is_prev_special).
    assert_eq!(t.encode("hello</s>hello", false, true), [piece("▁hello"), EOS, piece("▁hello")]);
    // Detokenizing strips only the very first space, even when the first token renders as nothing.
    assert_eq!(t.decode(&[BOS, piece("▁hello"), piece("▁world")]), " hello world");
    assert_eq!(t.decode(&[piece("▁hello"), piece("▁world")]), "hello world");
    assert_eq!(t.decode_with_special(&[BOS, piece("▁hello")]), "<s> hello");
}

#[test]
fn without_space_prefix() {
    let mut p =
        TokenizerParts::new(VocabKind::Spm, vec!["<unk>".into(), "<s>".into(), "</s>".into(), "a".into()]);
    p.add_space_prefix = Some(false);
    p.token_types = Some(vec![TokenType::Unknown, TokenType::Control, TokenType::Control, TokenType::Normal]);
    let t = Tokenizer::from_parts(p).unwrap();
    // No byte tokens and no "b": llama.cpp would throw here; pinion falls back to <unk>.
    assert_eq!(t.encode("ab", false, false), [3, UNK]);
    assert_eq!(t.encode("ab", true, false), [BOS, 3, UNK]);
}
