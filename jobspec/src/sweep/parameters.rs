//! `[sweep.parameters]`: the job fields a sweep searches over, one distribution each, and the
//! check that every value a distribution can give makes a valid job.
//!
//! ```toml
//! [sweep.parameters]
//! optimizer.lr = { loguniform = [1e-4, 1e-1] }       # a dotted key (nested tables)...
//! "model.hidden" = { choice = [[256], [512, 256]] }  # ...or a quoted dotted name
//! schedule.batch_size = { int = [64, 512] }          # integers, both ends included
//! optimizer.momentum = { uniform = [0.0, 0.95] }
//! ```
//!
//! Both spellings name the same field, `optimizer.lr`; a leaf is the table holding one of
//! `uniform`, `loguniform`, `int` or `choice`. Parameters keep their order in the file (the
//! order a grid enumerates and a random search draws them in), read from the spans of the
//! document since toml's tables sort their keys.
//!
//! A distribution is checked against the base job the way trials will be built: the job is
//! rebuilt with the parameter at the ends and the middle of its range, or at every choice, and
//! run through the job parser, whose unknown-field, type and range errors are then reported
//! under the parameter's own path (`sweep.parameters."optimizer.lr"`).

use std::collections::BTreeSet;

use toml::Value;

use crate::problems::{Problem, Problems, field_key};

/// Most parameters one sweep may search.
pub const MAX_PARAMETERS: usize = 64;
/// Most values all the `choice` lists of one sweep may hold together (each is checked by
/// building a job from it).
pub const MAX_CHOICE_VALUES: usize = 1024;
/// Most problems reported for one parameter by building jobs from its values.
const MAX_PROBLEMS_PER_PARAMETER: usize = 3;

/// The four distribution keys, as a leaf table holds exactly one of them.
const DISTRIBUTION_KEYS: [&str; 4] = ["uniform", "loguniform", "int", "choice"];

/// Job fields the sweep itself sets for every trial segment, which no parameter may set.
pub(crate) const CONTROLLED_FIELDS: [&str; 4] = [
    "name",
    "schedule.stop_after_steps",
    "schedule.stop_after_epochs",
    "checkpoint.resume_from",
];

/// One searched job field.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    /// Dotted path of the job field, e.g. `optimizer.lr` (however the file spelled it).
    pub path: String,
    /// Where its values come from.
    pub distribution: Distribution,
}

impl Parameter {
    /// The parameter's field path in a sweep file, for problems:
    /// `sweep.parameters."optimizer.lr"`.
    pub fn field(&self) -> String {
        parameter_field(&self.path)
    }
}

/// Where a parameter's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Distribution {
    /// Real numbers drawn uniformly from `low..high` (`uniform = [low, high]`).
    Uniform {
        /// Lower end.
        low: f64,
        /// Upper end, above `low`.
        high: f64,
    },
    /// Real numbers whose logarithm is uniform in `ln low..ln high`
    /// (`loguniform = [low, high]`, `0 < low`): as many draws in 1e-4..1e-3 as in 1e-2..1e-1.
    LogUniform {
        /// Lower end, above 0.
        low: f64,
        /// Upper end, above `low`.
        high: f64,
    },
    /// Integers drawn uniformly from `low..=high` (`int = [low, high]`).
    Int {
        /// Lowest value.
        low: i64,
        /// Highest value, above `low`.
        high: i64,
    },
    /// One of the listed TOML values, each as likely (`choice = [...]`).
    Choice(Vec<Value>),
}

impl Distribution {
    /// The key that names the distribution in a file (`uniform`, `loguniform`, `int`,
    /// `choice`).
    pub fn name(&self) -> &'static str {
        match self {
            Distribution::Uniform { .. } => "uniform",
            Distribution::LogUniform { .. } => "loguniform",
            Distribution::Int { .. } => "int",
            Distribution::Choice(_) => "choice",
        }
    }

    /// The values a job is built from to check the distribution against it: both ends and
    /// the middle of a range (the geometric middle of a log-uniform one), or every choice.
    pub(crate) fn probes(&self) -> Vec<Value> {
        match self {
            Distribution::Uniform { low, high } => {
                vec![
                    Value::Float(*low),
                    Value::Float(low / 2.0 + high / 2.0),
                    Value::Float(*high),
                ]
            }
            Distribution::LogUniform { low, high } => {
                let middle = ((low.ln() + high.ln()) / 2.0).exp().max(*low).min(*high);
                vec![
                    Value::Float(*low),
                    Value::Float(middle),
                    Value::Float(*high),
                ]
            }
            Distribution::Int { low, high } => {
                let middle = (i128::from(*low) + i128::from(*high)) / 2;
                let middle = i64::try_from(middle).unwrap_or(*low);
                let mut values = vec![*low, middle, *high];
                values.dedup();
                values.into_iter().map(Value::Integer).collect()
            }
            Distribution::Choice(values) => values.clone(),
        }
    }
}

/// `sweep.parameters."a.b"`: the field path of the parameter at job path `path`.
pub(crate) fn parameter_field(path: &str) -> String {
    format!("sweep.parameters.{}", field_key(path))
}

/// Whether the parameter at `path` sets the job field `field`: the field itself or a table
/// holding it.
pub(crate) fn sets_field(path: &str, field: &str) -> bool {
    path == field
        || field
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// A leaf of the parameter tree: its keys as written and the table of its distribution.
struct Leaf<'a> {
    keys: Vec<&'a str>,
    table: &'a toml::Table,
}

/// Reads `[sweep.parameters]` (`table`, from the document `text`) into parameters in file
/// order, recording every problem: a leaf that is not a distribution, a bad range, a path
/// given twice or inside another parameter, a field the sweep sets itself.
pub(crate) fn read(table: &toml::Table, text: &str, problems: &mut Problems) -> Vec<Parameter> {
    let mut leaves = Vec::new();
    collect(table, &mut Vec::new(), &mut leaves, problems);
    if table.is_empty() {
        problems.push("sweep.parameters", "empty, expected at least one parameter");
    }
    if leaves.len() > MAX_PARAMETERS {
        problems.push(
            "sweep.parameters",
            format!(
                "{} parameters, expected at most {MAX_PARAMETERS}",
                leaves.len()
            ),
        );
    }
    let document = toml::de::DeTable::parse(text).ok();
    let mut ordered: Vec<(usize, Leaf<'_>)> = leaves
        .into_iter()
        .map(|leaf| {
            let position = document
                .as_ref()
                .and_then(|document| position(document.get_ref(), &leaf.keys))
                .unwrap_or(usize::MAX);
            (position, leaf)
        })
        .collect();
    ordered.sort_by_key(|(position, _)| *position);
    let mut parameters = Vec::new();
    for (_, leaf) in ordered {
        let path = leaf
            .keys
            .iter()
            .flat_map(|key| key.split('.'))
            .collect::<Vec<_>>()
            .join(".");
        if let Some(distribution) = distribution(&path, leaf.table, problems) {
            parameters.push(Parameter { path, distribution });
        }
    }
    check_paths(&parameters, problems);
    let choices = choice_values(&parameters);
    if choices > MAX_CHOICE_VALUES {
        problems.push(
            "sweep.parameters",
            format!("{choices} choice values in all, expected at most {MAX_CHOICE_VALUES}"),
        );
    }
    parameters
}

/// Number of values in all the `choice` lists of `parameters`.
fn choice_values(parameters: &[Parameter]) -> usize {
    parameters
        .iter()
        .map(|parameter| match &parameter.distribution {
            Distribution::Choice(values) => values.len(),
            _ => 0,
        })
        .sum()
}

/// Whether `parameters` are few enough, with few enough choices, to [`probe`] them.
pub(crate) fn within_bounds(parameters: &[Parameter]) -> bool {
    parameters.len() <= MAX_PARAMETERS && choice_values(parameters) <= MAX_CHOICE_VALUES
}

/// Walks the parameter tree below `keys`, collecting its leaves.
fn collect<'a>(
    table: &'a toml::Table,
    keys: &mut Vec<&'a str>,
    leaves: &mut Vec<Leaf<'a>>,
    problems: &mut Problems,
) {
    for (key, value) in table {
        keys.push(key);
        match value {
            Value::Table(inner) if inner.keys().any(|key| DISTRIBUTION_KEYS.contains(&&**key)) => {
                leaves.push(Leaf {
                    keys: keys.clone(),
                    table: inner,
                });
            }
            Value::Table(inner) if inner.is_empty() => problems.push(
                parameter_field(&keys.join(".")),
                "an empty table, expected one of uniform, loguniform, int or choice",
            ),
            Value::Table(inner) => collect(inner, keys, leaves, problems),
            other => problems.push(
                parameter_field(&keys.join(".")),
                format!(
                    "a {} ({}), expected a table with one of uniform, loguniform, int or \
                     choice (a fixed value belongs in [job])",
                    other.type_str(),
                    short(other)
                ),
            ),
        }
        keys.pop();
    }
}

/// The byte offset in the document of the value at `keys` below `[sweep.parameters]`.
fn position(document: &toml::de::DeTable<'_>, keys: &[&str]) -> Option<usize> {
    let mut table = document;
    let mut offset = None;
    for key in ["sweep", "parameters"].iter().chain(keys) {
        let value = table.get(*key)?;
        offset = Some(value.span().start);
        if let Some(inner) = value.get_ref().as_table() {
            table = inner;
        }
    }
    offset
}

/// Reads the distribution of the leaf `table` of the parameter at `path`.
fn distribution(path: &str, table: &toml::Table, problems: &mut Problems) -> Option<Distribution> {
    let field = parameter_field(path);
    if table.len() != 1 {
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        problems.push(
            &field,
            format!(
                "keys {}, expected exactly one of uniform, loguniform, int or choice",
                keys.join(", ")
            ),
        );
        return None;
    }
    let (key, value) = table.iter().next()?;
    let problem_count = problems.0.len();
    let distribution = match key.as_str() {
        "uniform" | "loguniform" => {
            let (low, high) = real_range(value, &format!("{field}.{key}"), problems)?;
            if key == "uniform" {
                Distribution::Uniform { low, high }
            } else {
                if low <= 0.0 {
                    problems.push(
                        format!("{field}.{key}"),
                        format!("low = {low}, expected above 0 (a log-uniform range)"),
                    );
                }
                Distribution::LogUniform { low, high }
            }
        }
        "int" => {
            let (low, high) = int_range(value, &format!("{field}.int"), problems)?;
            Distribution::Int { low, high }
        }
        "choice" => match value {
            Value::Array(values) if !values.is_empty() => Distribution::Choice(values.clone()),
            Value::Array(_) => {
                problems.push(
                    format!("{field}.choice"),
                    "an empty list, expected at least one value",
                );
                return None;
            }
            other => {
                problems.push(
                    format!("{field}.choice"),
                    format!("a {}, expected a list of values", other.type_str()),
                );
                return None;
            }
        },
        other => {
            problems.push(
                format!("{field}.{}", field_key(other)),
                "unknown, expected one of uniform, loguniform, int or choice",
            );
            return None;
        }
    };
    (problems.0.len() == problem_count).then_some(distribution)
}

/// Reads `[low, high]`, two finite numbers with `low < high`.
fn real_range(value: &Value, field: &str, problems: &mut Problems) -> Option<(f64, f64)> {
    let number = |value: &Value| match value {
        Value::Float(number) => Some(*number),
        Value::Integer(number) => Some(*number as f64),
        _ => None,
    };
    let pair = match value {
        Value::Array(pair) if pair.len() == 2 => number(&pair[0]).zip(number(&pair[1])),
        _ => None,
    };
    let Some((low, high)) = pair else {
        problems.push(
            field,
            format!("{}, expected [low, high], two numbers", short(value)),
        );
        return None;
    };
    if !low.is_finite() || !high.is_finite() {
        problems.push(field, format!("[{low}, {high}], expected finite numbers"));
        return None;
    }
    check_order(low, high, field, problems).then_some((low, high))
}

/// Reads `[low, high]`, two integers with `low < high`.
fn int_range(value: &Value, field: &str, problems: &mut Problems) -> Option<(i64, i64)> {
    let pair = match value {
        Value::Array(pair) if pair.len() == 2 => pair[0].as_integer().zip(pair[1].as_integer()),
        _ => None,
    };
    let Some((low, high)) = pair else {
        problems.push(
            field,
            format!("{}, expected [low, high], two integers", short(value)),
        );
        return None;
    };
    check_order(low, high, field, problems).then_some((low, high))
}

/// Records a problem unless `low < high`: an empty range when they are equal, a reversed one
/// when `low` is above.
fn check_order<T: PartialOrd + std::fmt::Display>(
    low: T,
    high: T,
    field: &str,
    problems: &mut Problems,
) -> bool {
    if low == high {
        problems.push(
            field,
            format!(
                "[{low}, {high}] is an empty range, expected low < high (one value: use choice)"
            ),
        );
    } else if low > high {
        problems.push(
            field,
            format!("[{low}, {high}] is reversed, expected low < high"),
        );
    }
    low < high
}

/// `value` as TOML, as a short excerpt when long.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= cohort_proto::text::EXCERPT_CHARS {
        text
    } else {
        cohort_proto::text::excerpt(&text)
    }
}

/// Records a problem for every parameter given twice (say as `optimizer.lr` and
/// `"optimizer.lr"`), inside another one, with an empty key, or setting a field the sweep
/// sets itself.
fn check_paths(parameters: &[Parameter], problems: &mut Problems) {
    let mut seen = BTreeSet::new();
    for parameter in parameters {
        let path = &parameter.path;
        if path.split('.').any(str::is_empty) {
            problems.push(
                parameter.field(),
                "an empty key, expected a dotted field path",
            );
        }
        if !seen.insert(path.as_str()) {
            problems.push(parameter.field(), "given twice");
        }
        if let Some(outer) = parameters
            .iter()
            .find(|outer| outer.path != *path && sets_field(&outer.path, path))
        {
            problems.push(
                parameter.field(),
                format!("inside {}, which is a parameter too", outer.field()),
            );
        }
        if let Some(controlled) = CONTROLLED_FIELDS
            .iter()
            .find(|controlled| sets_field(path, controlled))
        {
            problems.push(
                parameter.field(),
                format!("sets {controlled}, which the sweep sets for each trial"),
            );
        }
    }
}

/// Checks every parameter against the base job `base`: builds the job with each of its probe
/// values (see [`Distribution::probes`]) and reports the parser's problems under the
/// parameter's path, a type mismatch as such (`model.kind is not a number; use choice`).
pub(crate) fn probe(base: &toml::Table, parameters: &[Parameter], problems: &mut Problems) {
    for parameter in parameters {
        let mut reported = BTreeSet::new();
        for value in parameter.distribution.probes() {
            let Err(error) = super::job_with(base, [(parameter.path.as_str(), value.clone())])
            else {
                continue;
            };
            let found = error.problems();
            if let Some(mismatch) = found
                .iter()
                .find_map(|problem| mismatch(parameter, problem))
            {
                problems.push(parameter.field(), mismatch);
                break;
            }
            for problem in found {
                let text = problem.to_string();
                if reported.len() < MAX_PROBLEMS_PER_PARAMETER && reported.insert(text.clone()) {
                    let message = if problem.message.starts_with("unknown field") {
                        format!("not a field of the job: {text}")
                    } else {
                        format!("with {} = {}: {text}", parameter.path, short(&value))
                    };
                    problems.push(parameter.field(), message);
                }
            }
            if reported.len() >= MAX_PROBLEMS_PER_PARAMETER {
                break;
            }
        }
    }
}

/// The plain message for a numeric distribution over a field of another type, when `problem`
/// (from a job built with one of its values) is serde's type error at that field.
fn mismatch(parameter: &Parameter, problem: &Problem) -> Option<String> {
    let numeric = !matches!(parameter.distribution, Distribution::Choice(_));
    let at_field = problem.path == parameter.path
        || problem
            .path
            .strip_prefix(&parameter.path)
            .is_some_and(|rest| rest.starts_with(['.', '[']));
    let type_error = problem.message.starts_with("invalid type")
        || problem.message.starts_with("wanted string or table");
    if !(numeric && at_field && type_error) {
        return None;
    }
    let expected = problem
        .message
        .rsplit("expected")
        .next()
        .unwrap_or_default();
    let integer = ["u8", "u16", "u32", "u64", "i32", "i64", "usize", "integer"]
        .iter()
        .any(|name| expected.contains(name));
    let path = &parameter.path;
    Some(match (&parameter.distribution, integer) {
        (Distribution::Uniform { .. } | Distribution::LogUniform { .. }, true) => {
            format!("{path} is an integer; use int")
        }
        _ => format!("{path} is not a number; use choice"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::fixtures::{assert_refused, sweep};
    use crate::sweep::parse_sweep;

    /// A sweep of the `[sweep.parameters]` lines `lines`.
    fn parameters(lines: &str) -> String {
        sweep(&format!("[sweep.parameters]\n{lines}\n"))
    }

    #[test]
    fn dotted_keys_quoted_names_and_tables_are_one_path_each_in_file_order() {
        let text = sweep(
            "[sweep.parameters]\n\
             schedule.batch_size = { int = [64, 512] }\n\
             \"model.hidden\" = { choice = [[64], [128, 64]] }\n\
             optimizer.momentum = { uniform = [0.0, 0.95] }\n\
             [sweep.parameters.optimizer.lr]\n\
             loguniform = [1e-4, 1e-1]\n",
        );
        let spec = parse_sweep(&text).unwrap();
        let paths: Vec<&str> = spec.parameters.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "schedule.batch_size",
                "model.hidden",
                "optimizer.momentum",
                "optimizer.lr"
            ]
        );
        assert_eq!(
            spec.parameters[1].field(),
            "sweep.parameters.\"model.hidden\""
        );
        let hidden = toml::toml! { x = [[64], [128, 64]] };
        let Value::Array(choices) = &hidden["x"] else {
            panic!("not an array")
        };
        assert_eq!(
            spec.parameters[1].distribution,
            Distribution::Choice(choices.clone())
        );
    }

    #[test]
    fn probes_are_the_ends_and_middle_of_a_range_or_every_choice() {
        let floats = |values: Vec<Value>| -> Vec<f64> {
            values.iter().filter_map(Value::as_float).collect()
        };
        let uniform = Distribution::Uniform {
            low: -1.0,
            high: 3.0,
        };
        assert_eq!(floats(uniform.probes()), [-1.0, 1.0, 3.0]);
        let log = floats(
            Distribution::LogUniform {
                low: 1e-4,
                high: 1e-2,
            }
            .probes(),
        );
        assert!((log[1] - 1e-3).abs() < 1e-12, "{log:?}");
        let int = Distribution::Int {
            low: i64::MIN,
            high: i64::MAX,
        }
        .probes();
        assert_eq!(
            int,
            [
                Value::Integer(i64::MIN),
                Value::Integer(0),
                Value::Integer(i64::MAX)
            ]
        );
        assert_eq!(
            Distribution::Int { low: 1, high: 2 }.probes(),
            [Value::Integer(1), Value::Integer(2)]
        );
        let choice = Distribution::Choice(vec![Value::from("a"), Value::from(2)]);
        assert_eq!(choice.probes(), [Value::from("a"), Value::from(2)]);
    }

    #[test]
    fn a_parameter_sets_a_field_or_the_table_holding_it() {
        assert!(sets_field(
            "checkpoint.resume_from",
            "checkpoint.resume_from"
        ));
        assert!(sets_field("checkpoint", "checkpoint.resume_from"));
        assert!(!sets_field("checkpoint.resume", "checkpoint.resume_from"));
        assert!(!sets_field(
            "checkpoint.resume_from.x",
            "checkpoint.resume_from"
        ));
    }

    #[test]
    fn every_refusal_names_its_parameter() {
        let cases = [
            (
                "optimizer.momentum = { uniform = [0.5, 0.5] }",
                "sweep.parameters.\"optimizer.momentum\".uniform: [0.5, 0.5] is an empty range",
            ),
            (
                "optimizer.momentum = { uniform = [0.9, 0.1] }",
                "sweep.parameters.\"optimizer.momentum\".uniform: [0.9, 0.1] is reversed",
            ),
            (
                "optimizer.momentum = { uniform = [0, inf] }",
                "sweep.parameters.\"optimizer.momentum\".uniform: [0, inf], expected finite numbers",
            ),
            (
                "optimizer.momentum = { uniform = [nan, 1] }",
                "sweep.parameters.\"optimizer.momentum\".uniform: [NaN, 1], expected finite",
            ),
            (
                "optimizer.lr = { loguniform = [0, 0.1] }",
                "sweep.parameters.\"optimizer.lr\".loguniform: low = 0, expected above 0",
            ),
            (
                "optimizer.lr = { loguniform = [-1, 0.1] }",
                "sweep.parameters.\"optimizer.lr\".loguniform: low = -1, expected above 0",
            ),
            (
                "optimizer.lr = { loguniform = [0.1] }",
                "sweep.parameters.\"optimizer.lr\".loguniform: [0.1], expected [low, high], two numbers",
            ),
            (
                "optimizer.lr = { uniform = [\"a\", 1] }",
                "sweep.parameters.\"optimizer.lr\".uniform: [\"a\", 1], expected [low, high], two numbers",
            ),
            (
                "schedule.batch_size = { int = [1.5, 3] }",
                "sweep.parameters.\"schedule.batch_size\".int: [1.5, 3], expected [low, high], two integers",
            ),
            (
                "schedule.batch_size = { int = [300, 200] }",
                "sweep.parameters.\"schedule.batch_size\".int: [300, 200] is reversed",
            ),
            (
                "schedule.batch_size = { int = [64, 64] }",
                "sweep.parameters.\"schedule.batch_size\".int: [64, 64] is an empty range",
            ),
            (
                "model.hidden = { choice = [] }",
                "sweep.parameters.\"model.hidden\".choice: an empty list",
            ),
            (
                "model.hidden = { choice = 3 }",
                "sweep.parameters.\"model.hidden\".choice: a integer, expected a list",
            ),
            (
                "optimizer.lr = 0.1",
                "sweep.parameters.\"optimizer.lr\": a float (0.1), expected a table with one of",
            ),
            (
                "optimizer.lr = {}",
                "sweep.parameters.\"optimizer.lr\": an empty table",
            ),
            (
                "optimizer.lr = { uniform = [0.1, 0.2], int = [1, 2] }",
                "sweep.parameters.\"optimizer.lr\": keys int, uniform, expected exactly one of",
            ),
            (
                "optimizer.lr = { normal = [0.1, 0.2] }",
                "sweep.parameters.\"optimizer.lr.normal\": a array ([0.1, 0.2]), expected a table",
            ),
            (
                "optimizer.lrr = { uniform = [0.1, 0.2] }",
                "sweep.parameters.\"optimizer.lrr\": not a field of the job: optimizer.lrr: unknown field `lrr`",
            ),
            (
                "model.kind = { uniform = [0.1, 0.2] }",
                "sweep.parameters.\"model.kind\": model.kind is not a number; use choice",
            ),
            (
                "model.hidden = { int = [1, 9] }",
                "sweep.parameters.\"model.hidden\": model.hidden is not a number; use choice",
            ),
            (
                "schedule.batch_size = { uniform = [64, 512] }",
                "sweep.parameters.\"schedule.batch_size\": schedule.batch_size is an integer; use int",
            ),
            (
                "optimizer.lr = { loguniform = [1e-4, 100] }",
                "sweep.parameters.\"optimizer.lr\": with optimizer.lr = 100.0: optimizer.lr: 100, expected above 0",
            ),
            (
                "optimizer.kind = { choice = [\"sgd\", \"nope\"] }",
                "sweep.parameters.\"optimizer.kind\": with optimizer.kind = \"nope\": optimizer.kind: unknown variant `nope`",
            ),
            (
                "optimizer.lr = { uniform = [0.1, 0.2] }\n\"optimizer.lr\" = { uniform = [0.1, 0.3] }",
                "sweep.parameters.\"optimizer.lr\": given twice",
            ),
            (
                "\"optimizer.lr\" = { uniform = [0.1, 0.2] }\noptimizer = { choice = [{ kind = \"sgd\" }] }",
                "sweep.parameters.\"optimizer.lr\": inside sweep.parameters.optimizer, which is a parameter too",
            ),
            (
                "checkpoint.resume_from = { choice = [\"/a\"] }",
                "sweep.parameters.\"checkpoint.resume_from\": sets checkpoint.resume_from, which the sweep sets",
            ),
            (
                "schedule.stop_after_steps = { int = [1, 9] }",
                "sweep.parameters.\"schedule.stop_after_steps\": sets schedule.stop_after_steps",
            ),
            (
                "schedule = { choice = [{ epochs = 2 }] }",
                "sweep.parameters.schedule: sets schedule.stop_after_steps",
            ),
            (
                "name = { choice = [\"a\"] }",
                "sweep.parameters.name: sets name, which the sweep sets",
            ),
            (
                "\"optimizer..lr\" = { uniform = [0.1, 0.2] }",
                "sweep.parameters.\"optimizer..lr\": an empty key",
            ),
            (
                "",
                "sweep.parameters: empty, expected at least one parameter",
            ),
        ];
        for (lines, expected) in cases {
            assert_refused(&parameters(lines), expected);
        }
    }

    #[test]
    fn counts_are_bounded() {
        let many: Vec<String> = (0..=MAX_PARAMETERS)
            .map(|i| format!("model.p{i} = {{ choice = [1] }}"))
            .collect();
        assert_refused(
            &parameters(&many.join("\n")),
            "sweep.parameters: 65 parameters, expected at most 64",
        );
        let values = vec!["0.1"; MAX_CHOICE_VALUES + 1].join(", ");
        assert_refused(
            &parameters(&format!("optimizer.lr = {{ choice = [{values}] }}")),
            "sweep.parameters: 1025 choice values in all, expected at most 1024",
        );
        // A huge key is named by an excerpt, the error bounded.
        let key = "k".repeat(10_000);
        assert_refused(
            &parameters(&format!("{key} = {{ choice = [1] }}")),
            "sweep.parameters.\"kkkk",
        );
    }
}
