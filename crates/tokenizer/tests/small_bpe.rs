//! Byte-level BPE on small vocabularies built here, checked against ids worked out by hand from llama.cpp's
//! algorithm (`llm_tokenizer_bpe_session`, `tokenizer_st_partition`, `special_eog_ids`).

use pinion_tokenizer::{
    PreTokenizer, StreamDecoder, TokenType, Tokenizer, TokenizerError, TokenizerParts, VocabKind,
};
use proptest::prelude::*;

/// GPT-2's byte-to-character mapping, written out independently of the crate's.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

fn enc(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

/// A vocabulary of the 256 byte tokens (id = byte), then the result of each merge (unless listed in `omit`),
/// then `extra` tokens.
fn parts(pre: &str, merges: &[&str], omit: &[&str], extra: &[(&str, TokenType)]) -> TokenizerParts {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types = vec![TokenType::Normal; 256];
    for m in merges {
        let joined = m.replace(' ', "");
        if !omit.contains(&joined.as_str()) && !tokens.contains(&joined) {
            tokens.push(joined);
            types.push(TokenType::Normal);
        }
    }
    for (t, ty) in extra {
        tokens.push(t.to_string());
        types.push(*ty);
    }
    let mut p = TokenizerParts::new(VocabKind::Bpe, tokens);
    p.pre = Some(pre.to_string());
    p.token_types = Some(types);
    p.merges = Some(merges.iter().map(|m| m.to_string()).collect());
    p
}

fn build(pre: &str, merges: &[&str], extra: &[(&str, TokenType)]) -> Tokenizer {
    Tokenizer::from_parts(parts(pre, merges, &[], extra)).unwrap()
}

fn id(tok: &Tokenizer, text: &str) -> u32 {
    tok.token_id(text).unwrap_or_else(|| panic!("no token {text:?}"))
}

fn b(c: char) -> u32 {
    c as u32
}

#[test]
fn merges_apply_in_rank_order() {
    let t = build("gpt-2", &["a b", "b c"], &[]);
    assert_eq!(t.encode("abc", false, false), [id(&t, "ab"), b('c')]);
    let t = build("gpt-2", &["b c", "a b"], &[]);
    assert_eq!(t.encode("abc", false, false), [b('a'), id(&t, "bc")]);
}

#[test]
fn equal_pairs_merge_leftmost_first() {
    // "aaa": both "a a" pairs have rank 0; the left one merges, the right "a" is left over.
    let t = build("gpt-2", &["a a"], &[]);
    assert_eq!(t.encode("aaa", false, false), [id(&t, "aa"), b('a')]);
    assert_eq!(t.encode("aaaa", false, false), [id(&t, "aa"), id(&t, "aa")]);
}

#[test]
fn merges_chain_within_a_word_only() {
    let g = enc(" ");
    let m1 = format!("{g} t");
    let m3 = format!("{g}t he");
    let t = build("gpt-2", &[&m1, "h e", &m3], &[]);
    let the = id(&t, &format!("{g}the"));
    assert_eq!(t.encode(" the", false, false), [the]);
    // No merge crosses the word boundary between "the" and " the".
    assert_eq!(t.encode("the the", false, false), [b('t'), id(&t, "he"), the]);
}

#[test]
fn merge_results_missing_from_the_vocabulary() {
    // llama.cpp looks up each byte of a non-token symbol as a one-byte token: ASCII bytes survive.
    let t = Tokenizer::from_parts(parts("gpt-2", &["x y"], &["xy"], &[])).unwrap();
    assert_eq!(t.encode("xy", false, false), [b('x'), b('y')]);
    // Non-ASCII characters are two bytes in GPT-2's encoding, so nothing at all is emitted for them.
    let e_acute = enc("é");
    let merge = e_acute.chars().map(String::from).collect::<Vec<_>>().join(" ");
    let t = Tokenizer::from_parts(parts("gpt-2", &[&merge], &[&e_acute], &[])).unwrap();
    assert_eq!(t.encode("é", false, false), Vec::<u32>::new());
    assert_eq!(t.encode("aéb", false, false), [b('a'), b('b')]);
}

#[test]
fn special_tokens_are_partitioned_longest_first() {
    let t = build(
        "gpt-2",
        &[],
        &[("<s>", TokenType::Control), ("<s>x", TokenType::Control), ("<tool>", TokenType::UserDefined)],
    );
    let (s, sx, tool) = (id(&t, "<s>"), id(&t, "<s>x"), id(&t, "<tool>"));
    assert_eq!(t.encode("<s>x<s>", false, true), [sx, s]);
    assert_eq!(t.encode("a<s>b", false, true), [b('a'), s, b('b')]);
    // Without parse_special, control tokens are text; user-defined tokens are recognised regardless.
    let plain = t.encode("<s><tool>", false, false);
    assert_eq!(plain, [b('<'), b('s'), b('>'), tool]);
    assert_eq!(t.decode(&plain), "<s><tool>");
    // Control tokens render only when asked; user-defined ones always.
    assert_eq!(t.decode(&[s, tool]), "<tool>");
    assert_eq!(t.decode_with_special(&[s, tool]), "<s><tool>");
}

#[test]
fn bos_and_eos_follow_the_vocabulary() {
    let mut p = parts("gpt-2", &[], &[], &[("<bos>", TokenType::Control), ("<eos>", TokenType::Control)]);
    p.special_ids.bos = Some(256);
    p.special_ids.eos = Some(257);
    let t = Tokenizer::from_parts(p.clone()).unwrap();
    assert_eq!(t.encode("a", true, false), [b('a')], "gpt2 vocabularies add nothing by default");
    p.add_bos = Some(true);
    p.add_eos = Some(true);
    let t = Tokenizer::from_parts(p).unwrap();
    assert_eq!(t.encode("a", true, false), [256, b('a'), 257]);
    assert_eq!(t.encode("a", false, false), [b('a')]);
    assert_eq!(t.encode("", true, false), [256, 257]);
}

#[test]
fn llama3_defaults_and_ignore_merges() {
    let g = enc(" ");
    let extra = [(format!("{g}the"), TokenType::Normal)];
    let extra: Vec<(&str, TokenType)> = extra.iter().map(|(s, t)| (s.as_str(), *t)).collect();
    // Without merges, only llama3's ignore_merges can produce the whole-word token.
    let t = build("llama-bpe", &[], &extra);
    assert_eq!(t.pre_tokenizer(), Some(PreTokenizer::Llama3));
    assert!(t.add_bos(), "llama-bpe adds BOS by default");
    assert_eq!(t.bos_id(), Some(11), "gpt2 vocabularies default BOS to 11");
    assert_eq!(t.encode(" the", false, false), [256]);
    assert_eq!(t.encode(" the", true, false), [11, 256]);
    let t = build("gpt-2", &[], &extra);
    assert_eq!(t.encode(" the", false, false), [u32::from(b' '), b('t'), b('h'), b('e')]);
}

#[test]
fn missing_and_unknown_pre_tokenizers() {
    let mut p = parts("gpt-2", &[], &[], &[]);
    p.pre = None;
    let t = Tokenizer::from_parts(p.clone()).unwrap();
    assert_eq!(t.pre_tokenizer(), Some(PreTokenizer::Default));
    assert!(t.warnings().iter().any(|w| w.contains("missing pre-tokenizer")), "{:?}", t.warnings());
    p.pre = Some("no-such-pre".to_string());
    match Tokenizer::from_parts(p) {
        Err(TokenizerError::UnknownPreTokenizer { name }) => assert_eq!(name, "no-such-pre"),
        other => panic!("expected UnknownPreTokenizer, got {other:?}"),
    }
}

#[test]
fn vocabulary_errors() {
    let mut p = parts("gpt-2", &[], &[], &[]);
    p.tokens[5] = p.tokens[4].clone();
    match Tokenizer::from_parts(p) {
        Err(TokenizerError::DuplicateToken { first: 4, second: 5, .. }) => {}
        other => panic!("expected DuplicateToken, got {other:?}"),
    }

    let mut p = parts("gpt-2", &[], &[], &[]);
    p.merges = None;
    assert!(matches!(Tokenizer::from_parts(p), Err(TokenizerError::MissingMerges)));

    let mut p = parts("gpt-2", &[], &[], &[]);
    p.scores = Some(vec![0.0; 10]);
    assert!(matches!(
        Tokenizer::from_parts(p),
        Err(TokenizerError::ShortArray { expected: 256, found: 10, .. })
    ));

    // BOS defaults to 11 for gpt2 vocabularies; in a vocabulary of 3 tokens that default is disabled.
    let mut p = TokenizerParts::new(VocabKind::Bpe, vec!["a".into(), "b".into(), "c".into()]);
    p.pre = Some("gpt-2".into());
    p.merges = Some(vec![]);
    p.add_bos = Some(true);
    assert!(matches!(Tokenizer::from_parts(p), Err(TokenizerError::MissingSpecialToken { .. })));

    let p = TokenizerParts::new(VocabKind::Bpe, vec![]);
    assert!(matches!(Tokenizer::from_parts(p), Err(TokenizerError::EmptyVocab)));
}

#[test]
fn end_of_generation_by_text() {
    let t = build(
        "gpt-2",
        &[],
        &[
            ("<|eot_id|>", TokenType::Normal),
            ("<|fim_pad|>", TokenType::Control),
            ("<|start_header_id|>", TokenType::Control),
        ],
    );
    let (eot, fim_pad) = (id(&t, "<|eot_id|>"), id(&t, "<|fim_pad|>"));
    // BPE's default EOS is 11, which is in the set too.
    assert_eq!(t.eog_ids(), &[11, eot, fim_pad]);
    assert_eq!(t.special_ids().eot, Some(eot));
    assert!(t.is_control(eot), "an EOG-looking token is promoted to control");
    assert!(t.warnings().iter().any(|w| w.contains("<|eot_id|>")));
    assert!(!t.is_eog(id(&t, "<|start_header_id|>")));

    // gpt-oss: with <|return|> and <|call|> present, <|end|> ends a message, not the generation.
    let extra = [
        ("<|end|>", TokenType::Control),
        ("<|return|>", TokenType::Control),
        ("<|call|>", TokenType::Control),
    ];
    let t = build("gpt-2", &[], &extra);
    assert!(!t.is_eog(id(&t, "<|end|>")));
    assert!(t.is_eog(id(&t, "<|return|>")) && t.is_eog(id(&t, "<|call|>")));
    let t = build("gpt-2", &[], &extra[..1]);
    assert!(t.is_eog(id(&t, "<|end|>")));
}

#[test]
fn gpt2_vocabularies_clean_up_spaces_when_decoding() {
    let t = build("gpt-2", &[], &[]);
    let ids = t.encode("Hello , world !", false, false);
    assert_eq!(t.decode(&ids), "Hello, world!");
    // The streaming decoder emits pieces as they are, as llama.cpp's streaming does.
    let mut d = StreamDecoder::new();
    let streamed: String = ids.iter().map(|&i| d.push(&t, i)).collect::<String>() + &d.flush();
    assert_eq!(streamed, "Hello , world !");
    // SmolLM-style vocabularies do not clean up.
    let t = build("smollm", &[], &[]);
    assert_eq!(t.decode(&t.encode("Hello , world !", false, false)), "Hello , world !");
}

#[test]
fn out_of_range_ids_render_as_nothing() {
    let t = build("gpt-2", &[], &[]);
    assert_eq!(t.token_to_piece(100_000, true), b"");
    assert_eq!(t.decode(&[b('a'), 100_000, b('b')]), "ab");
}

/// The tokenizer keeps its per-token data in a few flat containers, not an allocation (or three) per token:
/// its heap is about twice the vocabulary's text plus a few dozen bytes per token and per merge.
#[test]
fn heap_is_proportional_to_the_vocabulary() {
    let letters: Vec<char> = ('a'..='z').collect();
    let mut merges = Vec::new();
    for &x in &letters {
        for &y in &letters {
            merges.push(format!("{x} {y}"));
        }
    }
    for &x in &letters {
        for &y in &letters {
            for &z in &letters {
                merges.push(format!("{x}{y} {z}"));
            }
        }
    }
    let merges: Vec<&str> = merges.iter().map(String::as_str).collect();
    let t = build("gpt-2", &merges, &[("<|endoftext|>", TokenType::Control)]);
    let n = t.n_vocab();
    assert_eq!(n, 256 + 26 * 26 + 26 * 26 * 26 + 1);
    assert_eq!(t.n_merges(), merges.len());
    let text_bytes: usize = (0..n as u32).map(|id| t.token_text(id).unwrap().len()).sum();
    let heap = t.heap_bytes();
    let bound = 2 * text_bytes + 32 * n + 48 * t.n_merges() + 16 * 1024;
    assert!(heap >= text_bytes, "heap_bytes {heap} does not even count the {text_bytes} bytes of token text");
    assert!(heap <= bound, "heap_bytes {heap} over {bound} for {n} tokens of {text_bytes} bytes");

    // Every token is found by its text, and renders as the bytes its text stands for.
    for id in 0..n as u32 {
        let text = t.token_text(id).unwrap();
        assert_eq!(t.token_id(text), Some(id), "{text:?}");
        if id < 256 {
            assert_eq!(t.token_to_piece(id, false), [id as u8]);
        }
    }
    assert_eq!(t.token_to_piece(id(&t, "abc"), false), b"abc");
    assert_eq!(t.token_to_piece(id(&t, "<|endoftext|>"), true), b"<|endoftext|>");
    assert_eq!(t.token_id("abcd"), None);
    assert_eq!(t.token_text(n as u32), None);
    assert_eq!(t.encode("abcabd xyz", false, false), [id(&t, "abc"), id(&t, "abd"), b(' '), id(&t, "xyz")]);
}

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        1 => Just("<tool>".to_string()),
        1 => Just("<|endoftext|>".to_string()),
        1 => "[ \t\n]{1,4}",
        1 => "[0-9a-z' ]{1,12}",
    ]
}

fn roundtrip_vocab() -> Tokenizer {
    let g = enc(" ");
    let merges =
        [format!("{g} t"), "h e".to_string(), format!("{g}t he"), "i n".to_string(), "' s".to_string()];
    let merges: Vec<&str> = merges.iter().map(String::as_str).collect();
    build("smollm", &merges, &[("<|endoftext|>", TokenType::Control), ("<tool>", TokenType::UserDefined)])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn byte_level_bpe_is_lossless(parts in proptest::collection::vec(fragment(), 0..8)) {
        let tok = roundtrip_vocab();
        let text = parts.concat();
        prop_assert_eq!(tok.decode(&tok.encode(&text, false, false)), text.clone());
        prop_assert_eq!(tok.decode_with_special(&tok.encode(&text, true, true)), text.clone());

        let ids = tok.encode(&text, false, false);
        let mut d = StreamDecoder::new();
        let mut streamed = String::new();
        for &i in &ids {
            streamed += &d.push(&tok, i);
        }
        streamed += &d.flush();
        prop_assert_eq!(streamed, text);
    }
}

#[test]
fn tokenizer_and_decoder_are_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<StreamDecoder>();
}
