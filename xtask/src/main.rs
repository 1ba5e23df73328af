//! `cargo xtask`: pinion's auxiliary commands, the ones not expressible with plain `cargo`.
//!
//! This is the rust-analyzer pattern: a binary in the workspace, run through the alias in `.cargo/config.toml`,
//! so that tooling is written in Rust, versioned with the code and needs nothing installed beyond the toolchain.
//! Offline model work (fetch, synth, and the preparation steps profile, calibrate, train, pack, plan, prepare) lives here as thin drivers over library
//! functions; nothing depends on this crate.

mod device;
mod iobench;
mod prepare;
mod progress;
mod synth;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use pinion_prepare::registry;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "pinion's auxiliary commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a known model (default smollm2-135m) into models/, checking its sha256.
    Fetch {
        #[arg(default_value = "smollm2-135m")]
        name: String,
    },
    /// The whole test suite: fetch the test model, tidy, layering, then every test of the workspace.
    Test {
        /// Extra arguments for the test runner (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check source hygiene: every .rs file opens with `//!`, no #[should_panic] or #[ignore] tests.
    Tidy,
    /// Check that crates depend only on the crates below them (docs/architecture.md).
    CheckLayering,
    /// Profile FFN activations over a calibration text: firing counts, score samples, token samples.
    Profile(prepare::ProfileCmd),
    /// Per-layer CATS thresholds for target sparsities, from a profile (or profiling first).
    Calibrate(prepare::CalibrateCmd),
    /// Train per-layer activation predictors on a profile's token samples.
    Train(prepare::TrainCmd),
    /// Pack a GGUF into the neuron-cluster format from a profile and thresholds (and predictors).
    Pack(prepare::PackCmd),
    /// Print the plan of a prepared model for memory budgets.
    Plan(prepare::PlanCmd),
    /// Profile, calibrate, train, pack and plan a model into a directory `pinion -m DIR` runs (resumable).
    Prepare(prepare::PrepareCmd),
    /// The main job: fetch the default model if absent, prepare it if needed (prepare's defaults: the weighted
    /// rule at the highest sparsity within 3% perplexity on held-out calibration text, no predictors for this
    /// SiLU model), then `pinion run` it under a memory budget smaller than the model (default --mem-budget 70%
    /// -c 512) with the arguments given.
    Run {
        /// Arguments for `pinion run` (a prompt with -p, -n, --mem-budget, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure this machine for the planner: reads by size and depth, memory bandwidth, kernel speed.
    ProfileDevice(device::DeviceArgs),
    /// Read throughput of the io crate by read size and queue depth, for both backends (O_DIRECT).
    IoBench(iobench::IoBenchArgs),
    /// Write a synthetic llama-style GGUF model with random weights and planted activation skew.
    Synth(synth::SynthArgs),
    /// Run a synthetic mixture of experts and print its routing statistics against the planted ones.
    SynthStats(synth::SynthStatsArgs),
}

fn main() -> Result<()> {
    let root = workspace_root()?;
    match Cli::parse().command {
        Cmd::Fetch { name } => {
            fetch(&name)?;
        }
        Cmd::Test { args } => test(&root, &args)?,
        Cmd::Tidy => tidy::tidy(&root)?,
        Cmd::CheckLayering => tidy::check_layering(&root)?,
        Cmd::ProfileDevice(args) => device::run(&args)?,
        Cmd::IoBench(args) => iobench::io_bench(&args)?,
        Cmd::Synth(args) => synth::synth(&args)?,
        Cmd::SynthStats(args) => synth::synth_stats(&args)?,
        Cmd::Profile(args) => prepare::profile(&args)?,
        Cmd::Calibrate(args) => prepare::calibrate(&args)?,
        Cmd::Train(args) => prepare::train(&args)?,
        Cmd::Prepare(args) => prepare::prepare_all(&args)?,
        Cmd::Run { args } => run_main_job(&root, &args)?,
        Cmd::Pack(args) => prepare::pack_cmd(&args)?,
        Cmd::Plan(args) => prepare::plan_cmd(&args)?,
    }
    Ok(())
}

/// `cargo xtask run`: prepare the default model (resuming: a finished preparation is only checked) and run it
/// under a memory budget with the release `pinion` binary.
fn run_main_job(root: &Path, args: &[String]) -> Result<()> {
    #[derive(Parser)]
    struct Prep {
        #[command(flatten)]
        cmd: prepare::PrepareCmd,
    }
    let model = fetch(registry::SMOLLM2_135M.name)?;
    let dir = model.with_file_name(format!(
        "{}.prepared",
        model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    let prep = Prep::parse_from([
        "prepare".into(),
        "--model".into(),
        model.to_string_lossy().into_owned(),
        "--out".into(),
        dir.to_string_lossy().into_owned(),
    ]);
    prepare::prepare_all(&prep.cmd)?;
    let mut run: Vec<String> = vec!["run".into(), "-m".into(), dir.to_string_lossy().into_owned()];
    if !args.iter().any(|a| a == "--mem-budget" || a.starts_with("--mem-budget=")) {
        run.extend(["--mem-budget".into(), "70%".into()]);
    }
    if !args.iter().any(|a| a == "-c" || a == "--ctx-size" || a.starts_with("--ctx-size=")) {
        run.extend(["-c".into(), "512".into()]);
    }
    run.extend(args.iter().cloned());
    eprintln!("xtask run: pinion {}", run.join(" "));
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["run", "--quiet", "--release", "--package", "pinion-cli", "--bin", "pinion", "--"])
        .args(&run)
        .status()
        .context("starting cargo run")?;
    if !status.success() {
        bail!("pinion run failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("xtask has no parent directory")?.to_path_buf())
}

fn fetch(name: &str) -> Result<PathBuf> {
    let model = registry::known_model(name).with_context(|| format!("unknown model '{name}'"))?;
    let path = registry::fetch(model, &registry::models_dir(), &mut |l| eprintln!("xtask fetch: {l}"))?;
    Ok(path)
}

/// A directory holding the `openai` Python package, for the server's client test (`PYTHONPATH`): installed
/// under target/ with pip the first time.
fn openai_client(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/pyenv");
    let has = |d: &Path| {
        Command::new("python3")
            .args(["-c", "import openai"])
            .env("PYTHONPATH", d)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(&dir) {
        return Ok(dir);
    }
    eprintln!("xtask test: pip install openai into {} (the server's client test)", dir.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
        .arg(&dir)
        .arg("openai>=1.40")
        .status()
        .context("running python3 -m pip (apt-get install python3-pip)")?;
    if !status.success() || !has(&dir) {
        bail!("could not install the openai Python package into {} ({status})", dir.display());
    }
    Ok(dir)
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    let model = fetch(registry::SMOLLM2_135M.name)?;
    let gemma = fetch(registry::GEMMA3_270M.name)?;
    tidy::tidy(root)?;
    tidy::check_layering(root)?;
    let nextest =
        Command::new("cargo").args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success());
    let pyenv = openai_client(root)?;
    let mut cmd = Command::new("cargo");
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("xtask test: cargo-nextest not found, using cargo test");
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    cmd.args(extra)
        .current_dir(root)
        .env("PINION_REQUIRE_MODEL", "1")
        .env("PINION_MODEL", &model)
        .env("PINION_GEMMA_MODEL", &gemma)
        .env("PYTHONPATH", &pyenv);
    eprintln!("xtask test: {cmd:?}");
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}
