//! Parsing a job file: from text to a validated [`JobSpec`], with toml's and serde's errors
//! turned into one bounded problem that names the field.
//!
//! toml's own rendering of an error quotes the source line (60 KB of it for a long value) and
//! serde echoes keys and values whole. Here a shape error (unknown field, wrong type, missing
//! field) becomes its field path, each key of it bare or as a short excerpt
//! (`command.args[0]: invalid type: sequence, expected a string`), and a syntax error
//! `line L, column C: what`, at the key its line assigns when it starts with one. Either goes
//! through [`Problem::new`], which shortens long quoted text and bounds the whole.
//!
//! Deep nesting cannot overflow the stack: toml 0.9 stops at 80 levels of arrays and inline
//! tables, and at 80 parts of a dotted key, with an error (the tests hold it to that with 5,000
//! levels), so whatever reaches serde is at most a few hundred levels deep.

use std::fmt::Write as _;

use cohort_proto::text::floor_char_boundary;
use serde_path_to_error::Segment;

use crate::job::{JobSpec, MAX_SPEC_BYTES};
use crate::problems::{MAX_PATH_BYTES, Problem, SpecError, field_key};

/// Parses a job file and validates it, reporting every problem with its field path.
pub fn parse(text: &str) -> Result<JobSpec, SpecError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(SpecError::Parse(Problem::new(
            "",
            format!("{} bytes, expected at most {MAX_SPEC_BYTES}", text.len()),
        )));
    }
    let spec: JobSpec = deserialize(text)?;
    spec.validate()?;
    Ok(spec)
}

/// Reads `text` as a `T` (a job file, a sweep file): a syntax error is one problem naming its
/// line, column and key, a shape error (unknown field, wrong type, missing field) one naming its
/// field path.
pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|error| SpecError::Parse(syntax_problem(text, &error)))?;
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        SpecError::Parse(Problem::new(
            field_path(error.path()),
            error.inner().message(),
        ))
    })
}

/// Returns the job file `text` with the field at dotted `path` set to `value` (tables created
/// as needed), as a job file of its own, validated: how the coordinator points a job at a
/// resolved checkpoint (`checkpoint.resume_from`) and builds a sweep's trials. Comments and
/// layout of the original are not kept; its values are.
pub fn with_field(text: &str, path: &str, value: toml::Value) -> Result<String, SpecError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(SpecError::Parse(Problem::new(
            "",
            format!("{} bytes, expected at most {MAX_SPEC_BYTES}", text.len()),
        )));
    }
    let mut document: toml::Table = text
        .parse()
        .map_err(|error| SpecError::Parse(syntax_problem(text, &error)))?;
    set_field(&mut document, path, value).map_err(SpecError::Parse)?;
    let edited = toml::to_string(&document)
        .map_err(|error| SpecError::Parse(Problem::new(path, error.to_string())))?;
    parse(&edited)?;
    Ok(edited)
}

/// Sets the field at dotted `path` of `document` to `value`, creating tables on the way; a
/// non-table in the way is a problem at its path.
pub fn set_field(
    document: &mut toml::Table,
    path: &str,
    value: toml::Value,
) -> Result<(), Problem> {
    let mut keys = path.split('.').peekable();
    let mut table = document;
    let mut walked = String::new();
    while let Some(key) = keys.next() {
        if key.is_empty() {
            return Err(Problem::new(
                path,
                "an empty key, expected a dotted field path",
            ));
        }
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(key);
        if keys.peek().is_none() {
            table.insert(key.to_owned(), value);
            return Ok(());
        }
        let next = table
            .entry(key.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match next {
            toml::Value::Table(inner) => inner,
            other => {
                return Err(Problem::new(
                    walked,
                    format!("a {}, expected a table", other.type_str()),
                ));
            }
        };
    }
    Err(Problem::new(path, "empty, expected a dotted field path"))
}

/// The problem of a toml syntax error: where it is, and toml's message (not its rendering,
/// which quotes the source line).
fn syntax_problem(text: &str, error: &toml::de::Error) -> Problem {
    let message = match error.message() {
        "recursion limit" => "a key of too many dotted parts (toml's recursion limit)",
        "cannot recurse further; max recursion depth met" => {
            "arrays or inline tables nested too deeply (toml's recursion limit)"
        }
        other => other,
    };
    match error.span() {
        Some(span) => {
            let offset = floor_char_boundary(text, span.start);
            let (line, column) = line_and_column(text, offset);
            Problem::new(
                statement_path(text, offset),
                format!("line {line}, column {column}: {message}"),
            )
        }
        None => Problem::new("", message),
    }
}

/// Writes serde's path of a shape error as a field path: `command.env."A B"`, `model.hidden[2]`;
/// empty for the document itself.
fn field_path(path: &serde_path_to_error::Path) -> String {
    if path
        .iter()
        .all(|segment| matches!(segment, Segment::Unknown))
    {
        return String::new();
    }
    let mut text = String::new();
    for segment in path {
        if text.len() > MAX_PATH_BYTES {
            // `Problem::new` cuts it with a marker; the rest would not be shown.
            break;
        }
        match segment {
            Segment::Seq { index } => {
                let _ = write!(text, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(&field_key(key));
            }
            Segment::Unknown => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push('?');
            }
        }
    }
    text
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// Returns the path of the key that the line holding byte `offset` assigns, when the line
/// starts with one (`args = [[[...`), under the nearest table header above it; empty when the
/// line does not start with a plain key (a continuation of a multi-line value, a quoted key).
fn statement_path(text: &str, offset: usize) -> String {
    let line_start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
    let line = text[line_start..].lines().next().unwrap_or_default();
    let Some(key) = line
        .split_once('=')
        .and_then(|(key, _)| dotted_bare_key(key))
    else {
        return String::new();
    };
    let header = text[..line_start].lines().rev().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default().trim();
        let name = line
            .strip_prefix("[[")
            .and_then(|rest| rest.strip_suffix("]]"))
            .or_else(|| line.strip_prefix('[')?.strip_suffix(']'))?;
        dotted_bare_key(name)
    });
    match header {
        Some(header) => format!("{header}.{key}"),
        None => key,
    }
}

/// `text` as a dotted key when every part is a short bare key (`a.b`, `a . b`).
fn dotted_bare_key(text: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in text.split('.').map(str::trim) {
        let bare = field_key(part);
        if bare != part {
            return None;
        }
        parts.push(bare);
    }
    Some(parts.join("."))
}

#[cfg(test)]
mod tests {
    use cohort_proto::text::MAX_ERROR_BYTES;
    use proptest::prelude::*;

    use super::*;

    const COMMAND_HEAD: &str = "version = 1\nkind = \"command\"\n[command]\nprogram = \"sh\"\n";

    #[test]
    fn a_field_is_set_in_a_copy_that_still_parses() {
        let text = "version = 1\nkind = \"train\"\n# a comment\n[optimizer]\nlr = 0.1\n";
        let edited = with_field(
            text,
            "checkpoint.resume_from",
            "/runs/a/step-00000020".into(),
        )
        .unwrap();
        let spec = parse(&edited).unwrap();
        assert_eq!(
            spec.checkpoint.unwrap().resume_from.as_deref(),
            Some("/runs/a/step-00000020")
        );
        assert_eq!(spec.optimizer.unwrap().lr, Some(0.1));
        let replaced = with_field(&edited, "optimizer.lr", 0.5.into()).unwrap();
        assert_eq!(parse(&replaced).unwrap().optimizer.unwrap().lr, Some(0.5));
        // The result is validated like any job file, and a scalar in the way is named.
        let error = with_field(text, "optimizer.nonsense", 1.into()).unwrap_err();
        assert!(error.to_string().contains("optimizer"), "{error}");
        let error = with_field(text, "kind.x", 1.into()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("kind: a string, expected a table"),
            "{error}"
        );
        assert!(with_field(text, "a..b", 1.into()).is_err());
    }

    /// Parses `text`, which must be refused, and checks the error is short and on one line;
    /// returns it.
    fn bounded_error(text: &str) -> String {
        let error = parse(text)
            .expect_err("a hostile spec was accepted")
            .to_string();
        assert!(
            error.len() <= MAX_ERROR_BYTES,
            "{} bytes: {}",
            error.len(),
            truncate_for_assert(&error)
        );
        assert!(!error.contains('\n'), "{error}");
        error
    }

    fn truncate_for_assert(text: &str) -> &str {
        &text[..floor_char_boundary(text, 400)]
    }

    fn deep(open: &str, middle: &str, close: &str, levels: usize) -> String {
        format!("{}{middle}{}", open.repeat(levels), close.repeat(levels))
    }

    #[test]
    fn huge_keys_are_quoted_as_excerpts() {
        let key = "k".repeat(60_000);
        let error = bounded_error(&format!("version = 1\nkind = \"command\"\n{key} = 1\n"));
        assert!(
            error.starts_with("job spec: \"kkkk") && error.contains("(60000 bytes)"),
            "{error}"
        );
        let error = bounded_error(&format!(
            "version = 1\nkind = \"command\"\n[resources]\n{key} = 1\n"
        ));
        assert!(error.starts_with("job spec: resources.\"kkk"), "{error}");
        assert!(error.contains("unknown field"), "{error}");
        // 100,000 bytes is over the size limit: refused before toml reads it.
        let error = bounded_error(&format!("{} = 1\n", "k".repeat(100_000)));
        assert!(error.contains("expected at most 65536"), "{error}");
        // A huge key repeated is a syntax error whose message quotes nothing.
        let key = "d".repeat(30_000);
        let error = bounded_error(&format!("{key} = 1\n{key} = 2\n"));
        assert!(error.contains("line 2, column 1"), "{error}");
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_naming_the_field() {
        let levels = 5_000;
        let error = bounded_error(&format!(
            "version = 1\nkind = \"command\"\n{} = 1\n",
            vec!["a"; levels].join(".")
        ));
        assert!(error.contains("too many dotted parts"), "{error}");
        let error = bounded_error(&format!("[{}]\nx = 1\n", vec!["a"; levels].join(".")));
        assert!(error.contains("too many dotted parts"), "{error}");
        let error = bounded_error(&format!(
            "{COMMAND_HEAD}args = {}\n",
            deep("[", "1", "]", levels)
        ));
        assert!(
            error.starts_with("job spec: command.args: line 5, column ")
                && error.contains("nested too deeply"),
            "{error}"
        );
        let error = bounded_error(&format!("x = {}\n", deep("[", "1", "]", levels)));
        assert!(error.starts_with("job spec: x: line 1, column "), "{error}");
        let error = bounded_error(&format!(
            "{COMMAND_HEAD}env = {}\n",
            deep("{ a = ", "1", " }", levels)
        ));
        assert!(
            error.starts_with("job spec: command.env: line 5"),
            "{error}"
        );
        // The deepest value toml accepts reaches serde, which names where it went wrong.
        let error = bounded_error(&format!(
            "{COMMAND_HEAD}args = {}\n",
            deep("[", "\"x\"", "]", 79)
        ));
        assert_eq!(
            error,
            "job spec: command.args[0]: invalid type: sequence, expected a string"
        );
    }

    #[test]
    fn huge_values_of_the_wrong_type_are_quoted_as_excerpts() {
        let value = "v".repeat(60_000);
        let error = bounded_error(&format!(
            "version = 1\nkind = \"command\"\npriority = \"{value}\"\n"
        ));
        assert!(
            error.starts_with("job spec: priority: invalid type: string \"vvvv")
                && error.contains("(60000 bytes)"),
            "{error}"
        );
        let error = bounded_error(&format!("{COMMAND_HEAD}args = \"{value}\"\n"));
        assert!(
            error.starts_with("job spec: command.args: invalid type: string"),
            "{error}"
        );
        let error = bounded_error(&format!("{COMMAND_HEAD}args = [[\"{value}\"]]\n"));
        assert!(error.starts_with("job spec: command.args[0]: "), "{error}");
        let error = bounded_error(&format!(
            "version = 1\nkind = \"train\"\n[data]\ndataset = \"{value}\"\n"
        ));
        assert!(
            error.starts_with("job spec: data.dataset: unknown variant"),
            "{error}"
        );
        // A syntax error on a 60 KB line: its position, not the line.
        let error = bounded_error(&format!(
            "version = 1\nkind = \"command\"\nname = \"{value}\" x\n"
        ));
        assert!(
            error.starts_with("job spec: name: line 3, column 60011: "),
            "{error}"
        );
    }

    #[test]
    fn thousands_of_problems_are_listed_briefly() {
        let arguments = vec!["\"a\\u0000\""; 5_000].join(", ");
        let error = bounded_error(&format!("{COMMAND_HEAD}args = [{arguments}]\n"));
        assert!(
            error.contains("command.args[0]: contains a NUL byte"),
            "{error}"
        );
        assert!(error.ends_with("; and 4991 more"), "{error}");
    }

    #[test]
    fn syntax_errors_name_the_key_their_line_assigns() {
        let error = parse("[command]\nprogram = = 1\n").unwrap_err().to_string();
        assert!(
            error.starts_with("job spec: command.program: line 2, column 11: "),
            "{error}"
        );
        // A continuation line names no key.
        let error = parse("x = [\n  1,\n  =\n]\n").unwrap_err().to_string();
        assert!(error.starts_with("job spec: line 3"), "{error}");
    }

    /// Pieces of job files, valid and not, that a generated spec is assembled from.
    const FRAGMENTS: &[&str] = &[
        "version = 1\n",
        "kind = \"train\"\n",
        "kind = \"command\"\n",
        "[command]\n",
        "[resources]\n",
        "[[x]]\n",
        "[model]\n",
        "[parallel]\n",
        "program = \"sh\"\n",
        "args = [",
        "]",
        "[",
        "{",
        "}",
        "\"",
        "'''",
        "\"\"\"",
        "=",
        ".",
        ",",
        "#",
        "\n",
        " ",
        "\\",
        "\\u0000",
        "ranks = ",
        "data = ",
        "stage_layers = [1, 2]\n",
        "1",
        "-1",
        "1e400",
        "nan",
        "4294967296",
        "é",
        "\u{0}",
        "env = { RANK = \"0\" }\n",
        "directory = \"/x\"\n",
        "[checkpoint]\n",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cohort_proto::fuzz_cases()))]

        #[test]
        fn parse_never_panics_and_its_errors_stay_short(
            pieces in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40),
            noise in "[ -~\n]{0,64}",
        ) {
            let text = format!("{}{noise}", pieces.concat());
            if let Err(error) = parse(&text) {
                let error = error.to_string();
                prop_assert!(error.len() <= MAX_ERROR_BYTES, "{}", error);
                prop_assert!(!error.contains('\n'), "{}", error);
            }
        }
    }

    /// Numbers at the edges of the fields' types, where arithmetic overflows.
    const EXTREMES: &[&str] = &[
        "0",
        "1",
        "2",
        "3",
        "8",
        "255",
        "256",
        "4096",
        "65536",
        "2147483647",
        "4294967295",
        "9223372036854775807",
        "-1",
        "1e300",
        "inf",
        "nan",
    ];

    /// Numeric fields of a training job, by section.
    const NUMERIC_FIELDS: &[(&str, &str)] = &[
        ("resources", "ranks"),
        ("resources", "devices_per_rank"),
        ("model", "layers"),
        ("model", "heads"),
        ("model", "width"),
        ("model", "context"),
        ("model", "embedding_width"),
        ("model", "intensity_levels"),
        ("model", "seed"),
        ("parallel", "data"),
        ("parallel", "pipeline"),
        ("parallel", "tensor"),
        ("parallel", "micro_batches"),
        ("parallel", "ps_shards"),
        ("parallel", "staleness"),
        ("parallel", "gradient_bucket_bytes"),
        ("schedule", "epochs"),
        ("schedule", "batch_size"),
        ("schedule", "warmup_steps"),
        ("schedule", "max_steps"),
        ("schedule", "eval_every_steps"),
        ("optimizer", "lr"),
        ("optimizer", "grad_clip_norm"),
        ("checkpoint", "every_steps"),
        ("train", "initial_loss_scale"),
        ("train", "loss_scale_growth_interval"),
    ];

    /// A training job of `model` exchanging by `comm`, with `assignments` (the first of each
    /// field wins) and `list` as its hidden widths and stage layers.
    fn train_spec(
        model: &str,
        comm: &str,
        assignments: &[((&str, &str), &str)],
        list: &str,
    ) -> String {
        let dataset = if model == "transformer" {
            "shakespeare"
        } else {
            "fashion-mnist"
        };
        let mut sections = std::collections::BTreeMap::<&str, Vec<String>>::new();
        sections
            .entry("model")
            .or_default()
            .extend([format!("kind = \"{model}\""), format!("hidden = {list}")]);
        sections.entry("parallel").or_default().extend([
            format!("comm = \"{comm}\""),
            format!("stage_layers = {list}"),
        ]);
        sections
            .entry("data")
            .or_default()
            .push(format!("dataset = \"{dataset}\""));
        for &((section, field), value) in assignments {
            let lines = sections.entry(section).or_default();
            if !lines
                .iter()
                .any(|line| line.starts_with(&format!("{field} =")))
            {
                lines.push(format!("{field} = {value}"));
            }
        }
        let mut text = "version = 1\nkind = \"train\"\n".to_owned();
        for (section, lines) in sections {
            text.push_str(&format!("[{section}]\n{}\n", lines.join("\n")));
        }
        text
    }

    const MODELS: &[&str] = &["mlp", "cnn", "embedding", "transformer"];

    #[test]
    fn every_field_at_every_extreme_is_refused_or_accepted_without_panicking() {
        for model in MODELS {
            for comm in ["allreduce", "ps"] {
                for &field in NUMERIC_FIELDS {
                    for value in EXTREMES {
                        let text =
                            train_spec(model, comm, &[(field, value)], &format!("[{value}]"));
                        if let Err(error) = parse(&text) {
                            assert!(error.to_string().len() <= MAX_ERROR_BYTES);
                        }
                    }
                }
                let largest = "4294967295";
                let mesh = [
                    (("parallel", "data"), largest),
                    (("parallel", "pipeline"), largest),
                    (("parallel", "tensor"), largest),
                    (("parallel", "ps_shards"), largest),
                    (("model", "width"), largest),
                    (("model", "layers"), largest),
                    (("model", "context"), largest),
                    (("model", "embedding_width"), largest),
                ];
                let error = parse(&train_spec(model, comm, &mesh, "[4294967295, 4294967295]"))
                    .unwrap_err()
                    .to_string();
                assert!(error.len() <= MAX_ERROR_BYTES, "{error}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cohort_proto::fuzz_cases()))]

        #[test]
        fn extreme_numbers_together_never_panic_validation(
            model in prop::sample::select(MODELS),
            comm in prop::sample::select(&["allreduce", "ps"][..]),
            assignments in prop::collection::vec(
                (prop::sample::select(NUMERIC_FIELDS), prop::sample::select(EXTREMES)),
                0..12,
            ),
            list in prop::collection::vec(prop::sample::select(EXTREMES), 0..6),
        ) {
            let text = train_spec(model, comm, &assignments, &format!("[{}]", list.join(", ")));
            if let Err(error) = parse(&text) {
                prop_assert!(error.to_string().len() <= MAX_ERROR_BYTES);
            }
        }
    }
}
