//! Each fixture converted to each type equals the reference file: metadata (keys, order, types, values), tensor
//! directory (names, shapes, types, order), every tensor's bytes, and then the whole file byte for byte. Then
//! pinion runs the converted file and the reference one: the same greedy tokens.

use pinion_format::Gguf;
use pinion_runtime::{Context, ContextParams, Logits, Model};

use crate::util::{FIXTURES, TYPES, data, run, scratch};

/// Compares parsed files first (so that a difference is reported by name), then the bytes.
fn assert_same_gguf(name: &str, got: &[u8], want: &[u8]) {
    let g = Gguf::parse(got).unwrap();
    let w = Gguf::parse(want).unwrap();
    let keys = |f: &Gguf<'_>| f.metadata.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&g), keys(&w), "{name}: metadata keys (in order)");
    for ((k, a), (_, b)) in g.metadata.iter().zip(&w.metadata) {
        assert_eq!(a.type_id(), b.type_id(), "{name}: type of {k}");
        assert!(a == b, "{name}: {k} = {a:?}, reference {b:?}");
    }
    let infos =
        |f: &Gguf<'_>| f.tensors.iter().map(|t| (t.name.clone(), t.dims.clone(), t.ty)).collect::<Vec<_>>();
    assert_eq!(infos(&g), infos(&w), "{name}: tensor names, shapes, types (in order)");
    for (a, b) in g.tensors.iter().zip(&w.tensors) {
        assert!(g.tensor_data(a).unwrap() == w.tensor_data(b).unwrap(), "{name}: data of {}", a.name);
    }
    assert_eq!(got.len(), want.len(), "{name}: file length");
    assert!(got == want, "{name}: the files differ in layout (offsets or padding)");
}

#[test]
fn converted_files_equal_the_reference_converters() {
    let dir = scratch("reference");
    for fixture in FIXTURES {
        for (ty, suffix) in TYPES {
            let out = dir.join(format!("{fixture}.{suffix}.gguf"));
            let summary = run(&data().join(fixture), &out, ty).unwrap();
            let got = std::fs::read(&out).unwrap();
            let want = std::fs::read(data().join(format!("{fixture}.{suffix}.gguf"))).unwrap();
            assert_eq!(summary.n_bytes, got.len() as u64);
            assert_same_gguf(&format!("{fixture} {suffix}"), &got, &want);
        }
    }
}

/// Greedy ids of `steps` tokens after `prompt`, evaluated one token at a time after the prompt.
fn greedy(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ctx = Context::new(model, ContextParams::new(64, 1)).unwrap();
    let mut logits = ctx.eval(prompt, Logits::Last).unwrap().to_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i as u32)
            .unwrap();
        out.push(next);
        logits = ctx.eval(&[next], Logits::Last).unwrap().to_vec();
    }
    out
}

#[test]
fn converted_files_run_as_the_reference_files() {
    let dir = scratch("greedy");
    for fixture in FIXTURES {
        for (ty, suffix) in TYPES {
            let out = dir.join(format!("{fixture}.{suffix}.gguf"));
            run(&data().join(fixture), &out, ty).unwrap();
            let ours = Model::load(&out).unwrap();
            let theirs = Model::load(&data().join(format!("{fixture}.{suffix}.gguf"))).unwrap();
            let prompt =
                ours.tokenizer().encode("The engine reads the weights of a layer from flash.", true, false);
            assert_eq!(
                prompt,
                theirs.tokenizer().encode("The engine reads the weights of a layer from flash.", true, false)
            );
            let a = greedy(&ours, &prompt, 16);
            let b = greedy(&theirs, &prompt, 16);
            eprintln!("{fixture} {suffix}: prompt {prompt:?} -> {a:?}");
            assert_eq!(a, b, "{fixture} {suffix}: greedy tokens");
        }
    }
}
