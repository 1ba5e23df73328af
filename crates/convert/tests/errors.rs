//! What the converter refuses, with a typed error naming it, leaving nothing at the output path.

use std::path::Path;

use pinion_convert::{ConvertError, OutType, partial_path};

use crate::util::{copy_fixture, run, scratch};

/// Converts `model` expecting an error, and checks that neither the output nor its temporary file exists.
fn refused(model: &Path, out: &Path) -> ConvertError {
    let err = run(model, out, OutType::Q8_0).expect_err("the conversion should fail");
    assert!(!out.exists(), "{} was left behind ({err})", out.display());
    assert!(!partial_path(out).exists(), "{} was left behind", partial_path(out).display());
    err
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(c.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

#[test]
fn an_unknown_architecture_is_refused_by_name() {
    let tmp = scratch("unknown-arch");
    let model = copy_fixture("tiny-qwen2.5-instruct", &tmp);
    edit_config(&model, |c| {
        c.insert("architectures".into(), serde_json::json!(["MixtralForCausalLM"]));
    });
    match refused(&model, &tmp.join("out.gguf")) {
        ConvertError::UnsupportedArchitecture { name } => assert_eq!(name, "MixtralForCausalLM"),
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn unsupported_rope_scaling_is_refused_by_name() {
    let tmp = scratch("rope-yarn");
    let model = copy_fixture("Tiny-Llama3-v0.1", &tmp);
    edit_config(&model, |c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                               "original_max_position_embeddings": 256}),
        );
    });
    match refused(&model, &tmp.join("out.gguf")) {
        ConvertError::Unsupported { what } => assert!(what.contains("yarn"), "{what}"),
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_missing_tensor_is_refused_by_name() {
    // An untied model without lm_head.weight: the safetensors file rewritten without it.
    let tmp = scratch("missing-tensor");
    let model = copy_fixture("tiny-qwen3-150K", &tmp);
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| n != "lm_head.weight").collect();
    let rewritten = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, rewritten).unwrap();
    match refused(&model, &tmp.join("out.gguf")) {
        ConvertError::MissingTensor { name } => assert_eq!(name, "lm_head.weight"),
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn an_unknown_tensor_is_refused_by_name() {
    let tmp = scratch("unknown-tensor");
    let model = copy_fixture("tiny-qwen2.5-instruct", &tmp);
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    let norm = all.iter().find(|(n, _)| n == "model.norm.weight").unwrap().1.clone();
    all.push(("model.layers.0.mlp.experts.0.weight".into(), norm));
    std::fs::write(&path, safetensors::serialize(all, None).unwrap()).unwrap();
    match refused(&model, &tmp.join("out.gguf")) {
        ConvertError::UnknownTensor { name, .. } => assert_eq!(name, "model.layers.0.mlp.experts.0.weight"),
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_truncated_safetensors_file_is_refused_and_an_old_output_is_kept() {
    let tmp = scratch("truncated");
    let model = copy_fixture("Tiny-Llama3-v0.1", &tmp);
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let out = tmp.join("out.gguf");
    match refused(&model, &out) {
        ConvertError::Truncated { expected, got, .. } => assert_eq!(expected - got, 1000),
        e => panic!("unexpected error: {e}"),
    }
    // A file already at the output path is left as it was.
    std::fs::write(&out, b"previous").unwrap();
    assert!(run(&model, &out, OutType::F16).is_err());
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
    assert!(!partial_path(&out).exists());
}

#[test]
fn a_wrong_shape_is_refused_by_name() {
    let tmp = scratch("shape");
    let model = copy_fixture("tiny-qwen3-150K", &tmp);
    edit_config(&model, |c| {
        c.insert("intermediate_size".into(), 96.into());
    });
    match refused(&model, &tmp.join("out.gguf")) {
        ConvertError::ShapeMismatch { name, expected, got } => {
            assert!(name.contains("mlp"), "{name}");
            assert_ne!(expected, got);
        }
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_sentencepiece_tokenizer_is_refused_by_name() {
    let tmp = scratch("spm");
    let model = copy_fixture("Tiny-Llama3-v0.1", &tmp);
    std::fs::write(model.join("tokenizer.model"), b"not read").unwrap();
    match refused(&model, &tmp.join("out.gguf")) {
        ConvertError::Unsupported { what } => assert!(what.contains("SentencePiece"), "{what}"),
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_failure_after_writing_removes_the_partial_file() {
    // The output path is a non-empty directory: everything is written to the partial file, then the rename
    // fails, and the partial file must go.
    let tmp = scratch("rename");
    let out = tmp.join("out.gguf");
    std::fs::create_dir_all(out.join("inside")).unwrap();
    let err =
        run(&crate::util::data().join("tiny-qwen3-150K"), &out, OutType::F16).expect_err("rename fails");
    assert!(matches!(err, ConvertError::Io { .. }), "{err}");
    assert!(out.join("inside").is_dir());
    assert!(!partial_path(&out).exists(), "{} was left behind", partial_path(&out).display());
}
