//! `cohort sample`: text from a transformer checkpoint.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cohort_trainer::language_model::sample::Sampler;

use crate::args::SampleArgs;

/// Loads the checkpoint and prints the prompt followed by the generated text.
pub fn run(args: &SampleArgs) -> Result<ExitCode> {
    let sampler = Sampler::load(&args.checkpoint)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    eprintln!(
        "cohort: sampling {} characters from a model trained {} steps (temperature {})",
        args.tokens,
        sampler.step(),
        args.temperature
    );
    let text = sampler.generate(&args.prompt, args.tokens, args.temperature, args.seed)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}{text}", args.prompt)?;
    Ok(ExitCode::SUCCESS)
}
