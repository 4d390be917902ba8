//! Sweep files: a base training job, the job fields to search over, and how to search them.
//!
//! ```toml
//! version = 1
//! name = "mlp-lr"
//!
//! [sweep]
//! max_trials = 16              # 1 to 1000; default 16 (grid: the grid's size)
//! max_concurrent_trials = 4    # 1 to max_trials; default 4 (or max_trials when fewer)
//! metric = "eval_accuracy"     # or "eval_loss"; default "eval_accuracy"
//! mode = "max"                 # default: the metric's natural direction
//! seed = 0                     # default 0
//!
//! [sweep.searcher]
//! kind = "asha"                # "grid" | "random" | "asha"; default "random"
//! reduction_factor = 4         # asha: 2 to 256; default 4
//! min_resource = 0.125         # asha: the first rung, > 0; default 1
//! max_resource = 2             # asha: the top rung; default the base job's whole run
//! resource_unit = "epochs"     # asha: "epochs" | "steps"; default "epochs"
//! brackets = 1                 # asha: 1 to the number of rungs; default 1
//!
//! [sweep.parameters]           # see [`parameters`]
//! optimizer.lr = { loguniform = [1e-4, 1e-1] }
//!
//! [job]                        # the base job: an ordinary `kind = "train"` job file
//! version = 1
//! kind = "train"
//! ```
//!
//! Every trial is an ordinary job built from `[job]` with its parameter values set
//! ([`SweepSpec::trial_job`]); a trial that ASHA pauses and promotes runs as several
//! segments, each a job that stops after its rung (`schedule.stop_after_steps` or
//! `stop_after_epochs`, the learning-rate schedule still the whole run's) and resumes from the
//! previous segment's checkpoint (`checkpoint.resume_from`). The sweep sets those fields and
//! the job name, so neither the base job nor a parameter may.
//!
//! [`parse_sweep`] checks everything before any trial runs and reports every problem with
//! its field path (`sweep.parameters."optimizer.lr": ...`), including what the job parser
//! would say of trials built from the ends of each range and from every choice.

pub mod parameters;
pub mod searcher;

use serde::Deserialize;

use crate::job::{JobKind, JobSpec, MAX_NAME_LEN, MAX_SPEC_BYTES, is_valid_name};
use crate::objective::{Metric, Mode, Objective};
use crate::parse::set_field;
use crate::problems::{Problem, Problems, SpecError};

pub use parameters::{Distribution, Parameter};
pub use searcher::{AshaSpec, Resource, ResourceUnit, Searcher, SearcherKind};
/// A parameter's value: any TOML value (re-exported so that callers need no `toml` of their
/// own).
pub use toml::Value;

/// Most trials one sweep may run.
pub const MAX_TRIALS: u32 = 1000;
/// Trials of a sweep that gives no `max_trials` (other than a grid).
pub const DEFAULT_MAX_TRIALS: u32 = 16;
/// Trials running at once when a sweep gives no `max_concurrent_trials`.
pub const DEFAULT_MAX_CONCURRENT_TRIALS: u32 = 4;
/// Longest sweep name: a job name, less room for a trial's suffix.
pub const MAX_SWEEP_NAME_LEN: usize = MAX_NAME_LEN - 16;

/// A validated sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// Name of the sweep (a job name of at most [`MAX_SWEEP_NAME_LEN`] bytes). Default
    /// `"sweep"`.
    pub name: String,
    /// Most trials started; for a grid, the grid's size.
    pub max_trials: u32,
    /// Most trials running at once, `1..=max_trials`.
    pub max_concurrent_trials: u32,
    /// The metric trials are ranked by. Default `eval_accuracy`.
    pub metric: Metric,
    /// Its direction as the file gives it; `None`: the metric's natural one.
    pub mode: Option<Mode>,
    /// Seed of the random search: the same seed gives the same trials. Default 0.
    pub seed: u64,
    /// How trials' values are chosen and how long each runs.
    pub searcher: Searcher,
    /// The searched fields, in file order.
    pub parameters: Vec<Parameter>,
    /// The base job (`[job]`), as a TOML table.
    pub job: toml::Table,
}

/// What distinguishes one trial segment's job from the base job besides its parameter
/// values.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The job's name.
    pub name: String,
    /// Where the segment stops with a checkpoint; `None`: it runs to the end.
    pub stop_after: Option<Resource>,
    /// The checkpoint directory it resumes from (the previous segment's); `None`: from
    /// scratch.
    pub resume_from: Option<String>,
}

impl SweepSpec {
    /// What trials are ranked by.
    pub fn objective(&self) -> Objective {
        Objective::new(self.metric, self.mode)
    }

    /// The ASHA settings, for `kind = "asha"`.
    pub fn asha(&self) -> Option<&AshaSpec> {
        match &self.searcher {
            Searcher::Asha(asha) => Some(asha),
            _ => None,
        }
    }

    /// Number of combinations of the `choice` parameters (the other parameters count once).
    pub fn grid_size(&self) -> u64 {
        grid_size(&self.parameters)
    }

    /// Builds the job of one trial segment: the base job with `values` set at their paths,
    /// then the segment's name, stop and checkpoint. Returns the validated job and its TOML
    /// text (what is submitted).
    pub fn trial_job(
        &self,
        values: &[(String, Value)],
        segment: &Segment,
    ) -> Result<(JobSpec, String), SpecError> {
        let mut edits: Vec<(&str, Value)> = values
            .iter()
            .map(|(path, value)| (path.as_str(), value.clone()))
            .collect();
        edits.push(("name", Value::String(segment.name.clone())));
        match segment.stop_after {
            Some(Resource::Steps(steps)) => {
                let steps = i64::try_from(steps).map_err(|_| {
                    SpecError::Parse(Problem::new(
                        "schedule.stop_after_steps",
                        format!("{steps}, expected at most {}", i64::MAX),
                    ))
                })?;
                edits.push(("schedule.stop_after_steps", Value::Integer(steps)));
            }
            Some(Resource::Epochs(epochs)) => {
                edits.push(("schedule.stop_after_epochs", Value::Float(epochs)));
            }
            None => {}
        }
        if let Some(checkpoint) = &segment.resume_from {
            edits.push(("checkpoint.resume_from", Value::String(checkpoint.clone())));
        }
        job_with(&self.job, edits)
    }
}

/// The base job `base` with each of `edits` (a dotted path and its value) set, parsed and
/// validated as a job file; with its TOML text.
pub(crate) fn job_with<'a>(
    base: &toml::Table,
    edits: impl IntoIterator<Item = (&'a str, Value)>,
) -> Result<(JobSpec, String), SpecError> {
    let mut job = base.clone();
    for (path, value) in edits {
        set_field(&mut job, path, value).map_err(SpecError::Parse)?;
    }
    let text = toml::to_string(&job)
        .map_err(|error| SpecError::Parse(Problem::new("", error.to_string())))?;
    let spec = crate::parse::parse(&text)?;
    Ok((spec, text))
}

/// Parses a sweep file and validates it, reporting every problem with its field path.
pub fn parse_sweep(text: &str) -> Result<SweepSpec, SpecError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(SpecError::Parse(Problem::new(
            "",
            format!("{} bytes, expected at most {MAX_SPEC_BYTES}", text.len()),
        )));
    }
    let file = read_file(text)?;
    let mut problems = Problems::default();
    if file.version != crate::SPEC_VERSION {
        problems.push(
            "version",
            format!("{}, expected {}", file.version, crate::SPEC_VERSION),
        );
    }
    if !is_valid_name(&file.name) || file.name.len() > MAX_SWEEP_NAME_LEN {
        problems.push(
            "name",
            format!(
                "{}, expected 1 to {MAX_SWEEP_NAME_LEN} characters of a-z, A-Z, 0-9, '-', '_' \
                 or '.'",
                cohort_proto::text::excerpt(&file.name)
            ),
        );
    }
    let base = base_job(&file.job, &mut problems);
    let sweep = &file.sweep;
    let parameters = parameters::read(&sweep.parameters, text, &mut problems);
    let searcher = searcher::read(&sweep.searcher, &parameters, base.as_ref(), &mut problems);
    let (max_trials, max_concurrent_trials) =
        trial_limits(sweep, searcher.kind(), &parameters, &mut problems);
    if base.is_some() && parameters::within_bounds(&parameters) {
        parameters::probe(&file.job, &parameters, &mut problems);
    }
    problems.into_result()?;
    Ok(SweepSpec {
        name: file.name,
        max_trials,
        max_concurrent_trials,
        metric: sweep.metric,
        mode: sweep.mode,
        seed: sweep.seed,
        searcher,
        parameters,
        job: file.job,
    })
}

/// A sweep file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    /// Format version; must be 1. Required.
    version: u32,
    /// The sweep's name. Default `"sweep"`.
    #[serde(default = "default_name")]
    name: String,
    /// `[sweep]`.
    #[serde(default)]
    sweep: SweepSection,
    /// `[job]`: the base job. Required.
    job: toml::Table,
}

fn default_name() -> String {
    "sweep".to_owned()
}

/// `[sweep]` as written (defaults in [`SweepSpec`]).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SweepSection {
    max_trials: Option<u32>,
    max_concurrent_trials: Option<u32>,
    metric: Metric,
    mode: Option<Mode>,
    seed: u64,
    searcher: searcher::SearcherSection,
    parameters: toml::Table,
}

/// Reads the sweep file's shape; a syntax or shape error is one problem naming where.
fn read_file(text: &str) -> Result<SweepFile, SpecError> {
    crate::parse::deserialize(text)
}

/// Checks the base job: no field the sweep sets, valid as a job file, `kind = "train"`.
/// Returns it parsed when it is all that.
fn base_job(job: &toml::Table, problems: &mut Problems) -> Option<JobSpec> {
    let mut job = job.clone();
    for field in parameters::CONTROLLED_FIELDS.iter().skip(1) {
        let Some((section, key)) = field.split_once('.') else {
            continue;
        };
        if let Some(Value::Table(table)) = job.get_mut(section)
            && table.remove(key).is_some()
        {
            problems.push(
                format!("job.{field}"),
                "set by the sweep for each trial segment; remove it from [job]",
            );
        }
    }
    match job_with(&job, []) {
        Err(error) => {
            for problem in error.problems() {
                let path = match problem.path.as_str() {
                    "" => "job".to_owned(),
                    path => format!("job.{path}"),
                };
                problems.push(path, problem.message);
            }
            None
        }
        Ok((spec, _)) if spec.kind != JobKind::Train => {
            problems.push(
                "job.kind",
                "\"command\", expected \"train\": sweeps rank trials by their evaluation metrics",
            );
            None
        }
        Ok((spec, _)) => Some(spec),
    }
}

/// Checks `max_trials` and `max_concurrent_trials`, returning them with their defaults.
fn trial_limits(
    sweep: &SweepSection,
    kind: SearcherKind,
    parameters: &[Parameter],
    problems: &mut Problems,
) -> (u32, u32) {
    if let Some(max) = sweep.max_trials {
        problems.check_range("sweep.max_trials", max, 1, MAX_TRIALS);
    }
    let max_trials = if kind == SearcherKind::Grid {
        let size = grid_size(parameters);
        let (bound, field, named) = match sweep.max_trials {
            Some(max) => (max, "sweep.max_trials", format!("max_trials = {max}")),
            None => (MAX_TRIALS, "sweep.parameters", MAX_TRIALS.to_string()),
        };
        if size > u64::from(bound) {
            problems.push(
                field,
                format!("grid of {size} trials, expected at most {named}"),
            );
        }
        u32::try_from(size)
            .unwrap_or(u32::MAX)
            .clamp(1, bound.max(1))
    } else {
        sweep.max_trials.unwrap_or(DEFAULT_MAX_TRIALS)
    };
    let max_concurrent_trials = match sweep.max_concurrent_trials {
        Some(concurrent) => {
            if concurrent == 0 || concurrent > max_trials {
                problems.push(
                    "sweep.max_concurrent_trials",
                    format!("{concurrent}, expected 1 to max_trials = {max_trials}"),
                );
            }
            concurrent
        }
        None => DEFAULT_MAX_CONCURRENT_TRIALS.min(max_trials),
    };
    (max_trials, max_concurrent_trials)
}

/// Number of combinations of the `choice` parameters of `parameters` (saturating).
fn grid_size(parameters: &[Parameter]) -> u64 {
    parameters
        .iter()
        .map(|parameter| match &parameter.distribution {
            Distribution::Choice(values) => values.len() as u64,
            _ => 1,
        })
        .fold(1, u64::saturating_mul)
}

/// What the tests of the sweep modules build their files from.
#[cfg(test)]
pub(crate) mod fixtures {
    use cohort_proto::text::MAX_ERROR_BYTES;

    use super::parse_sweep;
    use crate::problems::Problem;

    /// The base job of the tests' sweeps: 4 epochs of an MLP with SGD.
    pub(crate) const BASE: &str = r#"
[job]
version = 1
name = "base"
kind = "train"
[job.model]
kind = "mlp"
hidden = [512, 256]
[job.data]
dataset = "fashion-mnist"
[job.optimizer]
kind = "sgd"
lr = 0.01
[job.schedule]
epochs = 4
batch_size = 256
"#;

    pub(crate) const LR: &str =
        "[sweep.parameters]\noptimizer.lr = { loguniform = [1e-4, 1e-1] }\n";

    /// A sweep file of `head` (its `[sweep]` tables) and the base job.
    pub(crate) fn sweep(head: &str) -> String {
        format!("version = 1\nname = \"mlp-lr\"\n{head}\n{BASE}")
    }

    /// Every problem of the sweep file `text`, which must be refused, as text.
    pub(crate) fn refused(text: &str) -> Vec<String> {
        let error = parse_sweep(text).expect_err("an invalid sweep was accepted");
        assert!(error.to_string().len() <= MAX_ERROR_BYTES, "{error}");
        error.problems().iter().map(Problem::to_string).collect()
    }

    /// Asserts that some problem of the refused `text` starts with `expected`.
    pub(crate) fn assert_refused(text: &str, expected: &str) {
        let problems = refused(text);
        assert!(
            problems.iter().any(|problem| problem.starts_with(expected)),
            "expected {expected:?} among {problems:#?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use cohort_proto::text::MAX_ERROR_BYTES;
    use proptest::prelude::*;

    use super::fixtures::{BASE, LR, assert_refused, refused, sweep};
    use super::*;

    #[test]
    fn the_asha_example_parses_in_file_order() {
        let text = sweep(
            r#"
[sweep]
max_trials = 16
max_concurrent_trials = 4
metric = "eval_accuracy"
mode = "max"
seed = 7

[sweep.searcher]
kind = "asha"
reduction_factor = 4
min_resource = 0.125
max_resource = 2
resource_unit = "epochs"
brackets = 1

[sweep.parameters]
optimizer.lr = { loguniform = [1e-4, 1e-1] }
"model.hidden" = { choice = [[256], [512, 256]] }
schedule.batch_size = { int = [64, 512] }
optimizer.momentum = { uniform = [0.0, 0.95] }
"#,
        );
        let spec = parse_sweep(&text).unwrap();
        assert_eq!(spec.name, "mlp-lr");
        assert_eq!(
            (spec.max_trials, spec.max_concurrent_trials, spec.seed),
            (16, 4, 7)
        );
        assert_eq!(spec.objective(), Objective::natural(Metric::EvalAccuracy));
        let paths: Vec<&str> = spec.parameters.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "optimizer.lr",
                "model.hidden",
                "schedule.batch_size",
                "optimizer.momentum"
            ]
        );
        assert_eq!(
            spec.parameters[0].distribution,
            Distribution::LogUniform {
                low: 1e-4,
                high: 1e-1
            }
        );
        assert_eq!(
            spec.parameters[2].distribution,
            Distribution::Int { low: 64, high: 512 }
        );
        let asha = spec.asha().unwrap();
        assert_eq!(asha.rung_resources(0), [0.125, 0.5, 2.0]);
        // The top rung is 2 of the job's 4 epochs: it stops there too.
        assert_eq!(
            asha.rungs(0),
            [
                Some(Resource::Epochs(0.125)),
                Some(Resource::Epochs(0.5)),
                Some(Resource::Epochs(2.0))
            ]
        );
        assert_eq!(spec.job["name"].as_str(), Some("base"));
    }

    #[test]
    fn a_minimal_sweep_takes_the_defaults() {
        let text = format!("version = 1\n{LR}{BASE}");
        let spec = parse_sweep(&text).unwrap();
        assert_eq!(spec.name, "sweep");
        assert_eq!(spec.searcher, Searcher::Random);
        assert_eq!((spec.max_trials, spec.max_concurrent_trials), (16, 4));
        assert_eq!(
            (spec.metric, spec.mode, spec.seed),
            (Metric::EvalAccuracy, None, 0)
        );
        assert_eq!(spec.objective().mode, Mode::Max);
        let loss = parse_sweep(&sweep(&format!(
            "[sweep]\nmetric = \"eval_loss\"\nmax_trials = 2\n{LR}"
        )))
        .unwrap();
        assert_eq!(loss.objective(), Objective::natural(Metric::EvalLoss));
        assert_eq!(
            loss.max_concurrent_trials, 2,
            "at most max_trials run at once"
        );
    }

    #[test]
    fn a_grid_runs_every_combination_and_no_more_than_max_trials() {
        let grid = "[sweep.searcher]\nkind = \"grid\"\n[sweep.parameters]\n\
                    optimizer.lr = { choice = [0.1, 0.01] }\n\
                    model.hidden = { choice = [[64], [128], [256]] }\n";
        let spec = parse_sweep(&sweep(grid)).unwrap();
        assert_eq!(
            (
                spec.grid_size(),
                spec.max_trials,
                spec.max_concurrent_trials
            ),
            (6, 6, 4)
        );
        assert_refused(
            &sweep(&format!("[sweep]\nmax_trials = 4\n{grid}")),
            "sweep.max_trials: grid of 6 trials, expected at most max_trials = 4",
        );
        let within = parse_sweep(&sweep(&format!("[sweep]\nmax_trials = 40\n{grid}"))).unwrap();
        assert_eq!(within.max_trials, 6, "a grid runs each point once");
        let values: Vec<String> = (0..1001).map(|i| format!("{}", i + 1)).collect();
        assert_refused(
            &sweep(&format!(
                "[sweep.searcher]\nkind = \"grid\"\n[sweep.parameters]\n\
                 schedule.batch_size = {{ choice = [{}] }}\n",
                values.join(", ")
            )),
            "sweep.parameters: grid of 1001 trials, expected at most 1000",
        );
        assert_refused(
            &sweep(&format!("[sweep.searcher]\nkind = \"grid\"\n{LR}")),
            "sweep.parameters.\"optimizer.lr\": a loguniform range, expected choice",
        );
    }

    #[test]
    fn the_header_and_the_base_job_are_checked() {
        let text = sweep(LR);
        assert_refused(
            &text.replacen("version = 1", "version = 2", 1),
            "version: 2, expected 1",
        );
        assert_refused(
            &text.replace("mlp-lr", "a b"),
            "name: \"a b\", expected 1 to 48",
        );
        assert_refused(&text.replace("mlp-lr", &"n".repeat(49)), "name: \"nnnn");
        assert_refused(&format!("version = 1\n{LR}"), "missing field `job`");
        assert_refused(
            &format!("{text}\n# {}\n", "x".repeat(MAX_SPEC_BYTES)),
            "65845 bytes, expected at most 65536",
        );
        assert_refused(
            &text.replace(
                "kind = \"train\"",
                "kind = \"command\"\n[job.command]\nprogram = \"sh\"",
            ),
            "job.",
        );
        let command = format!(
            "version = 1\n{LR}[job]\nversion = 1\nkind = \"command\"\n[job.command]\nprogram = \"sh\"\n"
        );
        assert_refused(&command, "job.kind: \"command\", expected \"train\"");
        assert_refused(
            &text.replace("epochs = 4", "epochs = 4\nstop_after_steps = 10"),
            "job.schedule.stop_after_steps: set by the sweep for each trial segment",
        );
        assert_refused(
            &text.replace("epochs = 4", "epochs = 4\nstop_after_epochs = 1.5"),
            "job.schedule.stop_after_epochs: set by the sweep",
        );
        assert_refused(
            &format!("{text}[job.checkpoint]\nresume_from = \"/runs/a/step-00000010\"\n"),
            "job.checkpoint.resume_from: set by the sweep",
        );
        assert_refused(
            &text.replace("lr = 0.01", "lr = -1.0"),
            "job.optimizer.lr: -1, expected",
        );
        assert_refused(
            &text.replace("lr = 0.01", "lr = \"x\""),
            "job.optimizer.lr: invalid type",
        );
        assert_refused("version = 1\n[sweep\n", "line 2, column 7");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = sweep(
            "[sweep]\nmax_trials = 0\n[sweep.searcher]\nbrackets = 2\n[sweep.parameters]\n\
             optimizer.lr = { uniform = [0.2, 0.1] }\nmodel.kind = { uniform = [0, 1] }\n",
        )
        .replace("mlp-lr", "a b");
        let problems = refused(&text);
        for expected in [
            "name: ",
            "sweep.max_trials: ",
            "sweep.searcher.brackets: ",
            "sweep.parameters.\"optimizer.lr\".uniform: ",
            "sweep.parameters.\"model.kind\": model.kind is not a number",
        ] {
            assert!(
                problems.iter().any(|problem| problem.starts_with(expected)),
                "{expected:?} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn trial_jobs_carry_their_values_name_stop_and_checkpoint() {
        let spec = parse_sweep(&sweep(LR)).unwrap();
        let values = vec![
            ("optimizer.lr".to_owned(), Value::Float(0.003)),
            (
                "model.hidden".to_owned(),
                toml::toml! { x = [128] }["x"].clone(),
            ),
        ];
        let segment = Segment {
            name: "mlp-lr-3".to_owned(),
            stop_after: Some(Resource::Epochs(0.5)),
            resume_from: Some("/runs/mlp-lr-3/checkpoints/step-00000010".to_owned()),
        };
        let (job, text) = spec.trial_job(&values, &segment).unwrap();
        assert_eq!(job.name, "mlp-lr-3");
        assert_eq!(job.optimizer.as_ref().unwrap().lr, Some(0.003));
        assert_eq!(job.model.as_ref().unwrap().hidden, [128]);
        let schedule = job.schedule.as_ref().unwrap();
        assert_eq!(
            (schedule.epochs, schedule.stop_after_epochs),
            (4, Some(0.5))
        );
        assert_eq!(schedule.stop_after_steps, None);
        assert_eq!(
            job.checkpoint.as_ref().unwrap().resume_from.as_deref(),
            segment.resume_from.as_deref()
        );
        assert_eq!(crate::parse(&text).unwrap(), job, "the text is the job");

        let steps = Segment {
            name: "mlp-lr-4".to_owned(),
            stop_after: Some(Resource::Steps(40)),
            resume_from: None,
        };
        let (job, _) = spec.trial_job(&values, &steps).unwrap();
        assert_eq!(job.schedule.as_ref().unwrap().stop_after_steps, Some(40));
        assert!(
            job.checkpoint
                .is_none_or(|checkpoint| checkpoint.resume_from.is_none())
        );
        let whole = Segment {
            name: "mlp-lr-5".to_owned(),
            stop_after: None,
            resume_from: None,
        };
        let (job, _) = spec.trial_job(&[], &whole).unwrap();
        assert_eq!(
            job.optimizer.as_ref().unwrap().lr,
            Some(0.01),
            "the base job's own value"
        );
        assert_eq!(job.schedule.as_ref().unwrap().stop_after_epochs, None);

        let error = spec
            .trial_job(&[("optimizer.lr".to_owned(), Value::Float(-1.0))], &whole)
            .unwrap_err()
            .to_string();
        assert!(error.contains("optimizer.lr: -1, expected"), "{error}");
        let error = spec
            .trial_job(&[("model.kind.x".to_owned(), Value::Float(1.0))], &whole)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("model.kind: a string, expected a table"),
            "{error}"
        );
    }

    #[test]
    fn every_refusal_of_the_sweep_section_names_its_field() {
        let lr = "[sweep.parameters]\noptimizer.lr = { uniform = [0.1, 0.2] }";
        let cases = [
            ("max_trials = 0", "sweep.max_trials: 0, expected 1 to 1000"),
            (
                "max_trials = 1001",
                "sweep.max_trials: 1001, expected 1 to 1000",
            ),
            (
                "max_trials = 4\nmax_concurrent_trials = 5",
                "sweep.max_concurrent_trials: 5, expected 1 to max_trials = 4",
            ),
            (
                "max_concurrent_trials = 0",
                "sweep.max_concurrent_trials: 0, expected 1 to max_trials = 16",
            ),
            ("foo = 1", "sweep.foo: unknown field `foo`"),
            ("metric = \"loss\"", "sweep.metric: unknown variant `loss`"),
            ("mode = \"up\"", "sweep.mode: unknown variant `up`"),
            ("seed = -1", "sweep.seed: invalid value: integer `-1`"),
        ];
        for (lines, expected) in cases {
            assert_refused(&sweep(&format!("[sweep]\n{lines}\n{lr}")), expected);
        }
        assert_refused(
            &sweep("[sweep.searcher]\nkind = \"bayes\"\n"),
            "sweep.searcher.kind: unknown variant `bayes`",
        );
    }

    /// `low` and `high` as a TOML array.
    fn pair(low: f64, high: f64) -> String {
        format!("[{}, {}]", Value::Float(low), Value::Float(high))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cohort_proto::fuzz_cases().min(256)))]

        #[test]
        fn any_range_is_accepted_or_refused_by_name(
            low in prop_oneof![any::<f64>(), -2.0..2.0f64],
            high in prop_oneof![any::<f64>(), -2.0..2.0f64],
            kind in prop::sample::select(&["uniform", "loguniform"][..]),
        ) {
            let text = sweep(&format!(
                "[sweep.parameters]\noptimizer.momentum = {{ {kind} = {} }}\n",
                pair(low, high)
            ));
            match parse_sweep(&text) {
                Ok(spec) => {
                    prop_assert!(low.is_finite() && high.is_finite() && low < high);
                    prop_assert!((0.0..1.0).contains(&low) && high < 1.0);
                    prop_assert_eq!(spec.parameters.len(), 1);
                }
                Err(error) => {
                    let error = error.to_string();
                    prop_assert!(error.len() <= MAX_ERROR_BYTES, "{}", error);
                    prop_assert!(
                        error.starts_with("job spec: sweep.parameters.\"optimizer.momentum\""),
                        "{}",
                        error
                    );
                }
            }
        }
    }
}
