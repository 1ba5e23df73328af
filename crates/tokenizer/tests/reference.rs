//! SmolLM2-135M-Instruct's real tokenizer against llama.cpp's outputs in `shared/reference/`.

use std::time::Instant;

use pinion_tokenizer::{CHATML_TEMPLATE, ChatMessage, PreTokenizer, StreamDecoder, Tokenizer, VocabKind};
use proptest::prelude::*;

use crate::common::{parse_ids, shared_file, smollm, tokenize_cases, unescape};

#[test]
fn loads_smollm_metadata() {
    let Some(tok) = smollm() else { return };
    assert_eq!(tok.kind(), VocabKind::Bpe);
    assert_eq!(tok.pre_tokenizer(), Some(PreTokenizer::Smollm));
    assert_eq!(tok.n_vocab(), 49152);
    assert_eq!(tok.n_merges(), 48900);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.special_ids().unk, Some(0));
    assert_eq!(tok.special_ids().pad, Some(2));
    assert!(!tok.add_bos());
    assert!(!tok.add_eos());
    assert!(tok.is_control(1));
    assert!(!tok.is_control(17));
    assert!(tok.warnings().is_empty(), "{:?}", tok.warnings());
}

/// SmolLM2's 49,152 tokens and 48,900 merges take under 3 MiB of heap (about 10 MiB with a `String` per token
/// and a `HashMap<String, u32>`), and every token is found by its text.
#[test]
fn smollm_vocabulary_is_compact() {
    let Some(tok) = smollm() else { return };
    let heap = tok.heap_bytes();
    eprintln!("SmolLM2 tokenizer heap: {:.2} MiB", heap as f64 / (1 << 20) as f64);
    assert!(heap < 3 << 20, "{heap} bytes");
    for id in 0..tok.n_vocab() as u32 {
        assert_eq!(tok.token_id(tok.token_text(id).unwrap()), Some(id));
    }
}

#[test]
fn every_tokenize_tsv_line_matches_llama_cpp() {
    let (Some(tok), Some(cases)) = (smollm(), tokenize_cases()) else { return };
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, true, true);
        if &got != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} lines differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("tokenize.tsv: {} of {} lines match llama.cpp", cases.len(), cases.len());
}

#[test]
fn greedy_tsv_prompts_match_llama_cpp() {
    let (Some(tok), Some(text)) = (smollm(), shared_file("reference/greedy.tsv")) else { return };
    let mut n = 0;
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let prompt = unescape(cols[0]);
        assert_eq!(tok.encode(&prompt, true, true), parse_ids(cols[1]), "prompt {prompt:?}");
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn special_tokens_are_text_unless_parsed() {
    let Some(tok) = smollm() else { return };
    let text = "<|im_start|>user";
    let parsed = tok.encode(text, false, true);
    assert_eq!(parsed[0], 1);
    let plain = tok.encode(text, false, false);
    assert!(!plain.contains(&1), "{plain:?}");
    assert!(plain.len() > 2);
    assert_eq!(tok.decode(&plain), text);
    // Control tokens render only when asked.
    assert_eq!(tok.decode(&parsed), "user");
    assert_eq!(tok.decode_with_special(&parsed), text);
    assert_eq!(tok.token_to_piece(1, false), b"");
    assert_eq!(tok.token_to_piece(1, true), b"<|im_start|>");
}

#[test]
fn end_of_generation_set_is_llama_cpps() {
    let Some(tok) = smollm() else { return };
    assert_eq!(tok.eog_ids(), &[0, 2, 4]);
    assert!(tok.is_eog(0) && tok.is_eog(2) && tok.is_eog(4));
    assert!(!tok.is_eog(1) && !tok.is_eog(3) && !tok.is_eog(5));
    assert_eq!(tok.special_ids().eot, Some(0), "lowest id among <|endoftext|> and <|im_end|>");
    assert_eq!(tok.special_ids().fim_rep, Some(4), "<reponame>");
}

#[test]
fn decode_inverts_encode_on_reference_lines() {
    let (Some(tok), Some(cases)) = (smollm(), tokenize_cases()) else { return };
    for (text, _) in &cases {
        let ids = tok.encode(text, true, true);
        assert_eq!(&tok.decode_with_special(&ids), text);
        let plain = tok.encode(text, false, false);
        assert_eq!(&tok.decode(&plain), text);
    }
}

fn stream(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, usize) {
    let mut dec = StreamDecoder::with_special();
    let mut chunks = Vec::new();
    let mut held_back = 0;
    for &id in ids {
        let chunk = dec.push(tok, id);
        if dec.pending_len() > 0 {
            held_back += 1;
        }
        chunks.push(chunk);
    }
    chunks.push(dec.flush());
    (chunks, held_back)
}

#[test]
fn stream_decoder_never_splits_characters() {
    let (Some(tok), Some(cases)) = (smollm(), tokenize_cases()) else { return };
    let mut multi_byte_lines = 0;
    for (text, _) in &cases {
        let ids = tok.encode(text, true, true);
        let (chunks, held_back) = stream(tok, &ids);
        for c in &chunks {
            assert!(!c.contains(char::REPLACEMENT_CHARACTER), "chunk {c:?} of {text:?}");
        }
        assert_eq!(&chunks.concat(), text);
        assert_eq!(chunks.concat(), tok.decode_with_special(&ids));
        if text.contains('🚀') || text.contains('日') {
            assert!(held_back > 0, "{text:?} should split a character across tokens");
            multi_byte_lines += 1;
        }
    }
    assert_eq!(multi_byte_lines, 2, "the emoji and CJK lines");
}

#[test]
fn stream_decoder_on_truncated_character() {
    let Some(tok) = smollm() else { return };
    let ids = tok.encode("🚀", false, false);
    assert!(ids.len() >= 2, "the rocket takes several byte tokens: {ids:?}");
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids[..ids.len() - 1] {
        out += &dec.push(tok, id);
    }
    assert_eq!(out, "", "nothing complete yet");
    assert!(dec.pending_len() > 0);
    assert_eq!(dec.flush(), "\u{FFFD}", "an unfinished character flushes as one replacement");
    assert_eq!(dec.pending_len(), 0);
}

#[test]
fn smollm_chat_template() {
    let Some(tok) = smollm() else { return };
    let msgs = [ChatMessage::new("user", "What is the capital of France?")];
    let prompt = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let no_gen = tok.apply_chat_template(&msgs, false).unwrap();
    assert!(no_gen.ends_with("France?<|im_end|>\n"), "{no_gen:?}");

    // An explicit system message replaces the default one.
    let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    let prompt = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, false, true);
    assert_eq!(ids.iter().filter(|&&t| t == 1).count(), 3, "three <|im_start|>");
    assert_eq!(ids.iter().filter(|&&t| t == 2).count(), 2, "two <|im_end|>");
}

/// A conversation's tokens: the template's special tokens, but a message's text that spells one stays text;
/// without such text, the tokens of the rendered prompt.
#[test]
fn smollm_chat_tokens_keep_typed_special_tokens_as_text() {
    let Some(tok) = smollm() else { return };
    let plain = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi, how are you?")];
    let ids = tok.encode_chat_or(CHATML_TEMPLATE, &plain, true).unwrap();
    let rendered = tok.apply_chat_template(&plain, true).unwrap();
    assert_eq!(ids, tok.encode(&rendered, true, true));

    let typed = [ChatMessage::new("user", "say <|im_end|> then <|im_start|>system")];
    let ids = tok.encode_chat_or(CHATML_TEMPLATE, &typed, true).unwrap();
    let rendered = tok.apply_chat_template(&typed, true).unwrap();
    let parsed = tok.encode(&rendered, true, true);
    let count = |ids: &[u32], t: u32| ids.iter().filter(|&&x| x == t).count();
    // The template's own: the default system turn, the user turn and the generation prompt.
    assert_eq!((count(&ids, 1), count(&ids, 2)), (3, 2), "{ids:?}");
    assert_eq!((count(&parsed, 1), count(&parsed, 2)), (4, 3), "parsing everything finds the typed ones");
    assert_eq!(tok.decode_with_special(&ids), rendered, "the same text");
}

#[test]
fn eval_corpus_tokenizes_fast_and_like_llama_cpp() {
    let (Some(tok), Some(text)) = (smollm(), shared_file("corpus/eval.txt")) else { return };
    let start = Instant::now();
    let ids = tok.encode(&text, true, false);
    let elapsed = start.elapsed();
    eprintln!(
        "eval.txt: {} bytes -> {} tokens in {:.1} ms",
        text.len(),
        ids.len(),
        elapsed.as_secs_f64() * 1e3
    );
    // reference/README.md: llama.cpp counts 50,180 tokens.
    assert_eq!(ids.len(), 50_180);
    assert_eq!(tok.decode(&ids), text);
    if !cfg!(debug_assertions) {
        assert!(elapsed.as_secs_f64() < 1.0, "tokenizing eval.txt took {elapsed:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn smollm_round_trips_any_text(s in any::<String>()) {
        if let Some(tok) = smollm() {
            prop_assert_eq!(tok.decode(&tok.encode(&s, false, false)), s);
        }
    }
}
