//! `[sweep.searcher]`: how a sweep chooses its trials' values and how long each runs.
//!
//! `grid` and `random` run every trial to the end of its schedule. `asha` is asynchronous
//! successive halving (Li et al., "A System for Massively Parallel Hyperparameter Tuning",
//! MLSys 2020): trials run in segments up to rungs of growing resource (epochs or steps) and
//! only the best `1 / reduction_factor` of a rung's trials go on to the next. This module
//! holds the settings and where the rungs lie; the decisions are the coordinator's.

use serde::{Deserialize, Serialize};

use crate::job::JobSpec;
use crate::problems::Problems;
use crate::sweep::parameters::{Distribution, Parameter, sets_field};
use crate::train::{MAX_STEPS, ScheduleSpec};

/// Largest ASHA reduction factor.
pub const MAX_REDUCTION_FACTOR: u32 = 256;
/// Most rungs of an ASHA bracket.
pub const MAX_RUNGS: usize = 32;
/// ASHA's reduction factor when the file gives none.
pub const DEFAULT_REDUCTION_FACTOR: u32 = 4;

/// Relative margin under which a rung's resource counts as the top rung's.
const RUNG_TOLERANCE: f64 = 1e-9;

/// `sweep.searcher.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SearcherKind {
    /// Every combination of the `choice` parameters, in file order.
    Grid,
    /// Values drawn at random, each trial run to the end.
    #[default]
    Random,
    /// Values drawn at random; asynchronous successive halving stops the worse trials early.
    Asha,
}

impl SearcherKind {
    /// The name used in files (`grid`, `random`, `asha`).
    pub fn name(self) -> &'static str {
        match self {
            SearcherKind::Grid => "grid",
            SearcherKind::Random => "random",
            SearcherKind::Asha => "asha",
        }
    }
}

/// How a sweep chooses values and how long trials run.
#[derive(Debug, Clone, PartialEq)]
pub enum Searcher {
    /// Every combination of choices, each trial run to the end.
    Grid,
    /// Random values, each trial run to the end.
    Random,
    /// Random values, trials promoted rung by rung (see [`AshaSpec`]).
    Asha(AshaSpec),
}

impl Searcher {
    /// Which searcher this is.
    pub fn kind(&self) -> SearcherKind {
        match self {
            Searcher::Grid => SearcherKind::Grid,
            Searcher::Random => SearcherKind::Random,
            Searcher::Asha(_) => SearcherKind::Asha,
        }
    }
}

/// What ASHA's resources count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResourceUnit {
    /// Passes over the training split (fractions allowed).
    #[default]
    Epochs,
    /// Optimizer steps.
    Steps,
}

/// How long a trial segment runs before it stops with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Resource {
    /// After this many optimizer steps of the whole run (`schedule.stop_after_steps`).
    Steps(u64),
    /// After this many epochs of the whole run (`schedule.stop_after_epochs`).
    Epochs(f64),
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Steps(steps) => write!(f, "{steps} steps"),
            Resource::Epochs(epochs) => write!(f, "{epochs} epochs"),
        }
    }
}

/// `[sweep.searcher]` of `kind = "asha"`: asynchronous successive halving (Li et al., "A
/// System for Massively Parallel Hyperparameter Tuning", MLSys 2020).
///
/// Bracket `s` has rungs at `min_resource * reduction_factor^(k + s)` for every `k` that stays
/// below `max_resource`, then a top rung at `max_resource`; of the trials that reach a rung,
/// the best `1 / reduction_factor` go on to the next.
#[derive(Debug, Clone, PartialEq)]
pub struct AshaSpec {
    /// Share of the trials of a rung promoted to the next: `1 / reduction_factor`, 2 to 256.
    /// Default 4.
    pub reduction_factor: u32,
    /// The first rung (the grace period), in `resource_unit`, above 0 (at least 1 step).
    /// Default 1.
    pub min_resource: f64,
    /// The top rung, in `resource_unit`, at most the base job's whole run. Default: the whole
    /// run (`schedule.epochs`, or `schedule.max_steps` in steps).
    pub max_resource: f64,
    /// What the resources count. Default epochs.
    pub resource_unit: ResourceUnit,
    /// Number of brackets, 1 to the number of rungs; trials are dealt to them in turn.
    /// Default 1.
    pub brackets: u32,
    /// The base job's whole run in `resource_unit`, when known: a top rung there runs to the
    /// end instead of stopping.
    pub whole_run: Option<f64>,
}

impl AshaSpec {
    /// The resource of each rung of bracket `bracket`, lowest first, the top rung
    /// (`max_resource`) last; at most [`MAX_RUNGS`] rungs.
    pub fn rung_resources(&self, bracket: u32) -> Vec<f64> {
        rung_resources(
            self.min_resource,
            self.max_resource,
            self.reduction_factor,
            bracket,
        )
    }

    /// Number of rungs of the first bracket (the longest).
    pub fn rung_count(&self) -> usize {
        self.rung_resources(0).len()
    }

    /// Where each segment of a trial of bracket `bracket` stops, rung by rung: `None` for a
    /// top rung that is the whole run (the segment runs to the end).
    pub fn rungs(&self, bracket: u32) -> Vec<Option<Resource>> {
        let resources = self.rung_resources(bracket);
        let top = resources.len().saturating_sub(1);
        resources
            .into_iter()
            .enumerate()
            .map(|(rung, resource)| {
                let whole = self
                    .whole_run
                    .is_some_and(|whole| rung == top && resource >= whole * (1.0 - RUNG_TOLERANCE));
                (!whole).then(|| match self.resource_unit {
                    ResourceUnit::Epochs => Resource::Epochs(resource),
                    ResourceUnit::Steps => Resource::Steps(resource.floor() as u64),
                })
            })
            .collect()
    }
}

/// The rungs of bracket `bracket` from `min` up to `max` by factors of `factor` (at most
/// [`MAX_RUNGS`], the last always `max`).
fn rung_resources(min: f64, max: f64, factor: u32, bracket: u32) -> Vec<f64> {
    let factor = f64::from(factor.max(2));
    let mut resources = Vec::new();
    let mut resource = min * factor.powi(i32::try_from(bracket).unwrap_or(i32::MAX));
    while resource < max * (1.0 - RUNG_TOLERANCE) && resources.len() + 1 < MAX_RUNGS {
        resources.push(resource);
        resource *= factor;
    }
    resources.push(max);
    resources
}

/// Number of rungs from `min` to `max` by `factor`, or `None` beyond [`MAX_RUNGS`].
fn rung_count(min: f64, max: f64, factor: u32) -> Option<usize> {
    let factor = f64::from(factor.max(2));
    let mut count = 1;
    let mut resource = min;
    while resource < max * (1.0 - RUNG_TOLERANCE) {
        count += 1;
        if count > MAX_RUNGS {
            return None;
        }
        resource *= factor;
    }
    Some(count)
}

/// `[sweep.searcher]` as written (defaults in [`AshaSpec`]).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct SearcherSection {
    pub(crate) kind: SearcherKind,
    pub(crate) reduction_factor: Option<u32>,
    pub(crate) min_resource: Option<f64>,
    pub(crate) max_resource: Option<f64>,
    pub(crate) resource_unit: Option<ResourceUnit>,
    pub(crate) brackets: Option<u32>,
}

/// Reads `[sweep.searcher]`, checked against its kind, the parameters and the base job `base`
/// (when valid), recording every problem.
pub(crate) fn read(
    section: &SearcherSection,
    parameters: &[Parameter],
    base: Option<&JobSpec>,
    problems: &mut Problems,
) -> Searcher {
    if section.kind == SearcherKind::Asha {
        return Searcher::Asha(asha(section, parameters, base, problems));
    }
    let asha_options = [
        ("reduction_factor", section.reduction_factor.is_some()),
        ("min_resource", section.min_resource.is_some()),
        ("max_resource", section.max_resource.is_some()),
        ("resource_unit", section.resource_unit.is_some()),
        ("brackets", section.brackets.is_some()),
    ];
    for (option, given) in asha_options {
        if given {
            problems.push(
                format!("sweep.searcher.{option}"),
                format!(
                    "only with kind = \"asha\", found kind = \"{}\"",
                    section.kind.name()
                ),
            );
        }
    }
    if section.kind == SearcherKind::Random {
        return Searcher::Random;
    }
    for parameter in parameters {
        if !matches!(parameter.distribution, Distribution::Choice(_)) {
            problems.push(
                parameter.field(),
                format!(
                    "a {} range, expected choice: a grid runs every combination of choices",
                    parameter.distribution.name()
                ),
            );
        }
    }
    Searcher::Grid
}

/// Checks the ASHA options of `section`, filling in their defaults.
fn asha(
    section: &SearcherSection,
    parameters: &[Parameter],
    base: Option<&JobSpec>,
    problems: &mut Problems,
) -> AshaSpec {
    let unit = section.resource_unit.unwrap_or_default();
    let schedule = base.map(|base| base.schedule.clone().unwrap_or_default());
    let whole_run = schedule
        .as_ref()
        .and_then(|schedule| whole_run(schedule, unit));
    let reduction_factor = section.reduction_factor.unwrap_or(DEFAULT_REDUCTION_FACTOR);
    problems.check_range(
        "sweep.searcher.reduction_factor",
        reduction_factor,
        2,
        MAX_REDUCTION_FACTOR,
    );
    let problem_count = problems.0.len();
    let min_resource = section.min_resource.unwrap_or(1.0);
    let least = match unit {
        ResourceUnit::Epochs => 0.0,
        ResourceUnit::Steps => 1.0,
    };
    if !(min_resource.is_finite() && min_resource > 0.0 && min_resource >= least) {
        let expected = match unit {
            ResourceUnit::Epochs => "above 0 epochs",
            ResourceUnit::Steps => "at least 1 step",
        };
        problems.push(
            "sweep.searcher.min_resource",
            format!("{min_resource}, expected {expected}"),
        );
    }
    let max_resource = match (section.max_resource, whole_run) {
        (Some(max), _) => max,
        (None, Some(whole)) => whole,
        (None, None) => {
            if schedule.is_some() {
                problems.push(
                    "sweep.searcher.max_resource",
                    "missing, expected the steps of the top rung (the base job sets no \
                     schedule.max_steps to run to)",
                );
            }
            min_resource
        }
    };
    check_max_resource(max_resource, unit, whole_run, problems);
    if problems.0.len() == problem_count && min_resource > max_resource {
        problems.push(
            "sweep.searcher.min_resource",
            format!("{min_resource}, expected at most max_resource = {max_resource}"),
        );
    }
    for parameter in parameters {
        if let Some(field) = ["schedule.epochs", "schedule.max_steps"]
            .into_iter()
            .find(|field| sets_field(&parameter.path, field))
        {
            problems.push(
                parameter.field(),
                format!(
                    "sets {field}, the run's length that asha's rungs divide; search it with \
                     kind = \"random\" or \"grid\""
                ),
            );
        }
    }
    let brackets = section.brackets.unwrap_or(1);
    if problems.0.len() == problem_count {
        match rung_count(min_resource, max_resource, reduction_factor) {
            None => problems.push(
                "sweep.searcher.min_resource",
                format!(
                    "{min_resource}, expected at most {MAX_RUNGS} rungs up to max_resource = \
                     {max_resource}: raise min_resource or reduction_factor"
                ),
            ),
            Some(rungs) => problems.check_range(
                "sweep.searcher.brackets",
                brackets,
                1,
                u32::try_from(rungs).unwrap_or(u32::MAX),
            ),
        }
    }
    AshaSpec {
        reduction_factor,
        min_resource,
        max_resource,
        resource_unit: unit,
        brackets,
        whole_run,
    }
}

/// The run of a job with `schedule`, in `unit`, when known: its epochs, or its
/// `max_steps`.
fn whole_run(schedule: &ScheduleSpec, unit: ResourceUnit) -> Option<f64> {
    match unit {
        ResourceUnit::Epochs => Some(f64::from(schedule.epochs)),
        ResourceUnit::Steps => schedule.max_steps.map(|steps| steps as f64),
    }
}

/// Records a problem unless `max` is a positive amount of `unit` (whole steps) within the
/// base job's run.
fn check_max_resource(
    max: f64,
    unit: ResourceUnit,
    whole_run: Option<f64>,
    problems: &mut Problems,
) {
    let field = "sweep.searcher.max_resource";
    let valid = match unit {
        ResourceUnit::Epochs => max.is_finite() && max > 0.0,
        ResourceUnit::Steps => max.fract() == 0.0 && (1.0..=MAX_STEPS as f64).contains(&max),
    };
    if !valid {
        let expected = match unit {
            ResourceUnit::Epochs => "above 0 epochs".to_owned(),
            ResourceUnit::Steps => format!("a whole number of steps, 1 to {MAX_STEPS}"),
        };
        problems.push(field, format!("{max}, expected {expected}"));
    } else if let Some(whole) = whole_run
        && max > whole * (1.0 + RUNG_TOLERANCE)
    {
        let (what, source) = match unit {
            ResourceUnit::Epochs => ("epochs", "schedule.epochs"),
            ResourceUnit::Steps => ("steps", "schedule.max_steps"),
        };
        problems.push(
            field,
            format!("{max} {what}, expected at most the base job's run of {whole} (job.{source})"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::fixtures::{BASE, LR, assert_refused, sweep};
    use crate::sweep::parse_sweep;

    #[test]
    fn asha_defaults_to_rungs_up_to_the_whole_run() {
        let spec =
            parse_sweep(&sweep(&format!("[sweep.searcher]\nkind = \"asha\"\n{LR}"))).unwrap();
        let asha = spec.asha().unwrap();
        assert_eq!(
            (
                asha.reduction_factor,
                asha.min_resource,
                asha.max_resource,
                asha.brackets
            ),
            (4, 1.0, 4.0, 1)
        );
        assert_eq!(asha.resource_unit, ResourceUnit::Epochs);
        // The top rung is the whole run: its segment runs to the end.
        assert_eq!(asha.rungs(0), [Some(Resource::Epochs(1.0)), None]);
        assert_eq!(asha.rung_count(), 2);
        let two = parse_sweep(&sweep(&format!(
            "[sweep.searcher]\nkind = \"asha\"\nbrackets = 2\n{LR}"
        )))
        .unwrap();
        assert_eq!(
            two.asha().unwrap().rungs(1),
            [None],
            "the second bracket runs whole trials"
        );
    }

    #[test]
    fn asha_in_steps_stops_at_whole_steps() {
        let base = BASE.replace("epochs = 4", "epochs = 4\nmax_steps = 1000");
        let text = format!(
            "version = 1\n[sweep.searcher]\nkind = \"asha\"\nresource_unit = \"steps\"\n\
             min_resource = 10.5\nreduction_factor = 3\n{LR}{base}"
        );
        let spec = parse_sweep(&text).unwrap();
        let rungs = spec.asha().unwrap().rungs(0);
        let steps = [10, 31, 94, 283, 850].map(|steps| Some(Resource::Steps(steps)));
        assert_eq!(rungs[..5], steps);
        assert_eq!(rungs[5], None);
        // Without schedule.max_steps the top rung must be given.
        assert_refused(
            &sweep(&format!(
                "[sweep.searcher]\nkind = \"asha\"\nresource_unit = \"steps\"\n{LR}"
            )),
            "sweep.searcher.max_resource: missing, expected the steps of the top rung",
        );
        let spec = parse_sweep(&sweep(&format!(
            "[sweep.searcher]\nkind = \"asha\"\nresource_unit = \"steps\"\nmax_resource = 400\n{LR}"
        )))
        .unwrap();
        assert_eq!(
            spec.asha().unwrap().rungs(0).last(),
            Some(&Some(Resource::Steps(400)))
        );
        assert_refused(
            &sweep(&format!(
                "[sweep.searcher]\nkind = \"asha\"\nresource_unit = \"steps\"\nmin_resource = 0.5\n\
                 max_resource = 400.5\n{LR}"
            )),
            "sweep.searcher.min_resource: 0.5, expected at least 1 step",
        );
        assert_refused(
            &sweep(&format!(
                "[sweep.searcher]\nkind = \"asha\"\nresource_unit = \"steps\"\nmax_resource = 400.5\n{LR}"
            )),
            "sweep.searcher.max_resource: 400.5, expected a whole number of steps",
        );
    }

    /// A sweep of the learning rate by ASHA with the `[sweep.searcher]` lines `options`.
    fn asha(options: &str) -> String {
        sweep(&format!(
            "[sweep.searcher]\nkind = \"asha\"\n{options}\n{LR}"
        ))
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            (
                "min_resource = 3\nmax_resource = 2",
                "sweep.searcher.min_resource: 3, expected at most max_resource = 2",
            ),
            (
                "max_resource = 8",
                "sweep.searcher.max_resource: 8 epochs, expected at most the base job's run of 4 (job.schedule.epochs)",
            ),
            (
                "max_resource = -1",
                "sweep.searcher.max_resource: -1, expected above 0 epochs",
            ),
            (
                "min_resource = 0",
                "sweep.searcher.min_resource: 0, expected above 0 epochs",
            ),
            (
                "min_resource = nan",
                "sweep.searcher.min_resource: NaN, expected above 0 epochs",
            ),
            (
                "reduction_factor = 1",
                "sweep.searcher.reduction_factor: 1, expected 2 to 256",
            ),
            (
                "brackets = 3",
                "sweep.searcher.brackets: 3, expected 1 to 2",
            ),
            (
                "brackets = 0",
                "sweep.searcher.brackets: 0, expected 1 to 2",
            ),
            (
                "min_resource = 1e-30\nreduction_factor = 2",
                "sweep.searcher.min_resource: 0.000000000000000000000000000001, expected at most 32 rungs",
            ),
        ];
        for (options, expected) in cases {
            assert_refused(&asha(options), expected);
        }
        let epochs = "[sweep.searcher]\nkind = \"asha\"\n[sweep.parameters]\nschedule.epochs = { choice = [2, 4] }";
        assert_refused(
            &sweep(epochs),
            "sweep.parameters.\"schedule.epochs\": sets schedule.epochs, the run's length",
        );
        let other_searchers = [
            (
                "reduction_factor = 3\nbrackets = 1",
                "sweep.searcher.reduction_factor: only with kind = \"asha\", found kind = \"random\"",
            ),
            (
                "kind = \"grid\"\nmin_resource = 1",
                "sweep.searcher.min_resource: only with kind = \"asha\", found kind = \"grid\"",
            ),
            (
                "kind = \"random\"\nresource_unit = \"steps\"",
                "sweep.searcher.resource_unit: only with kind = \"asha\"",
            ),
        ];
        for (options, expected) in other_searchers {
            let parameters = "[sweep.parameters]\noptimizer.lr = { choice = [0.1] }";
            assert_refused(
                &sweep(&format!("[sweep.searcher]\n{options}\n{parameters}")),
                expected,
            );
        }
    }
}
