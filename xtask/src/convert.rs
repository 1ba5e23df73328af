//! `cargo xtask convert`: a Hugging Face model directory to GGUF (pinion-convert).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pinion_convert::{ConvertParams, OutType, convert};

#[derive(Args)]
pub(crate) struct ConvertArgs {
    /// The Hugging Face model directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
    hf_dir: PathBuf,
    /// The GGUF file to write (replaced; written to FILE.partial first).
    #[arg(long)]
    out: PathBuf,
    /// Type of the matrices: f16 and q8_0 as llama.cpp's convert_hf_to_gguf.py, q4_0 as `llama-quantize --pure`
    /// of the f16 file.
    #[arg(long = "type", default_value = "f16")]
    ty: OutType,
}

pub(crate) fn run(args: &ConvertArgs) -> Result<()> {
    let params = ConvertParams { model_dir: &args.hf_dir, out: &args.out, out_type: args.ty };
    let s = convert(&params).with_context(|| format!("converting {}", args.hf_dir.display()))?;
    eprintln!(
        "xtask convert: {} ({}, {} tensors, {} parameters, {} bytes)",
        args.out.display(),
        s.arch,
        s.n_tensors,
        s.n_params,
        s.n_bytes
    );
    Ok(())
}
