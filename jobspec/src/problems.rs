//! Field-path errors collected by validation, bounded.
//!
//! A spec is user input of up to 64 KiB, and its errors travel back in a gRPC status, which
//! common clients refuse above a few KiB. So no problem quotes more than a short excerpt of the
//! input: every [`Problem`] is one line with its path cut at [`MAX_PATH_BYTES`] and its message
//! at [`MAX_MESSAGE_BYTES`], long quoted text inside a message (a key or value that toml or serde
//! echoed) shortened to an excerpt, and a list of problems shows at most
//! [`MAX_LISTED_PROBLEMS`] of them, within [`MAX_LISTED_BYTES`], then how many more there are.

use std::fmt;

use cohort_proto::text::{EXCERPT_CHARS, excerpt, truncate};

/// Longest field path of a problem, in bytes.
pub const MAX_PATH_BYTES: usize = 160;
/// Longest message of a problem, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 384;
/// Most problems a [`Problems`] lists in its text; the rest are counted.
pub const MAX_LISTED_PROBLEMS: usize = 10;
/// Most bytes the listed problems take in a [`Problems`]' text (with the count of the rest and
/// the `job spec: ` prefix it stays well under [`cohort_proto::text::MAX_ERROR_BYTES`]).
pub const MAX_LISTED_BYTES: usize = 1536;

/// One thing wrong with a spec: which field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, e.g. `resources.ranks` (empty for the document itself).
    pub path: String,
    /// What was expected and what was found.
    pub message: String,
}

impl Problem {
    /// Creates a problem at `path`, bounded: both on one line, long quoted text in the message
    /// shortened to an excerpt, the path cut at [`MAX_PATH_BYTES`] and the message at
    /// [`MAX_MESSAGE_BYTES`].
    pub fn new(path: impl Into<String>, message: impl AsRef<str>) -> Self {
        let path = path.into();
        let path = if path.len() <= MAX_PATH_BYTES && !path.contains(char::is_control) {
            path
        } else {
            truncate(&one_line(&path), MAX_PATH_BYTES).into_owned()
        };
        let message = shorten_quoted(&one_line(message.as_ref()));
        Self {
            path,
            message: truncate(&message, MAX_MESSAGE_BYTES).into_owned(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The fields are public: bound them here too, for problems built without `new`.
        let message = truncate(&self.message, MAX_MESSAGE_BYTES);
        if self.path.is_empty() {
            f.write_str(&message)
        } else {
            write!(f, "{}: {message}", truncate(&self.path, MAX_PATH_BYTES))
        }
    }
}

/// Longest key written bare in a field path; longer ones are quoted as an excerpt.
const MAX_BARE_KEY_BYTES: usize = 64;

/// Returns `key` as a segment of a field path: as is when it is a short TOML bare key
/// (`A-Za-z0-9_-`), else quoted as a short excerpt (`"a b"`, `"kkkk…" (60000 bytes)`).
pub(crate) fn field_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key.len() <= MAX_BARE_KEY_BYTES
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if bare { key.to_owned() } else { excerpt(key) }
}

/// Replaces every line break, tab and other control character with a space, so that a problem
/// stays on one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Shortens every quoted run of `message` (between backticks, as serde quotes keys, or double
/// quotes, as it quotes values, honouring backslash escapes) longer than
/// [`EXCERPT_CHARS`] characters to its first characters, an ellipsis and its length, in the
/// form of [`cohort_proto::text::excerpt`]: `"vvvv…" (60000 bytes)`. An unclosed quote runs to
/// the end of the message.
fn shorten_quoted(message: &str) -> String {
    let mut shortened = String::new();
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest.as_bytes()[open];
        shortened.push_str(&rest[..=open]);
        let inner = &rest[open + 1..];
        let close = closing_quote(inner, quote);
        let quoted = &inner[..close.unwrap_or(inner.len())];
        let cut = quoted.char_indices().nth(EXCERPT_CHARS).map(|(end, _)| end);
        match cut {
            None => shortened.push_str(quoted),
            Some(end) => {
                shortened.push_str(&quoted[..end]);
                shortened.push('…');
            }
        }
        if close.is_some() {
            shortened.push(char::from(quote));
        }
        if cut.is_some() {
            shortened.push_str(&format!(" ({} bytes)", quoted.len()));
        }
        match close {
            Some(close) => rest = &inner[close + 1..],
            None => return shortened,
        }
    }
    shortened.push_str(rest);
    shortened
}

/// Returns the byte index in `text` of the quote closing a run opened by `quote`, skipping
/// backslash escapes inside double quotes.
fn closing_quote(text: &str, quote: u8) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'\\' if quote == b'"' => index += 2,
            byte if byte == quote => return Some(index),
            _ => index += 1,
        }
    }
    None
}

/// Every problem found in one spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records a problem at `path` (bounded, see [`Problem::new`]).
    pub fn push(&mut self, path: impl Into<String>, message: impl AsRef<str>) {
        self.0.push(Problem::new(path, message));
    }

    /// Checks that `value` lies in `min..=max`, recording a problem at `path` otherwise.
    pub fn check_range<T>(&mut self, path: &str, value: T, min: T, max: T)
    where
        T: PartialOrd + fmt::Display + Copy,
    {
        if value < min || value > max {
            self.push(path, format!("{value}, expected {min} to {max}"));
        }
    }

    /// Returns `Ok(())` when no problem was recorded, the list otherwise.
    pub fn into_result(self) -> Result<(), SpecError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid(self))
        }
    }
}

/// Lists the first problems (at most [`MAX_LISTED_PROBLEMS`], within [`MAX_LISTED_BYTES`]; the
/// first always) separated by `; `, then `; and N more`.
impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut listed = 0;
        let mut bytes = 0;
        for problem in self.0.iter().take(MAX_LISTED_PROBLEMS) {
            let text = problem.to_string();
            if listed > 0 && bytes + text.len() + 2 > MAX_LISTED_BYTES {
                break;
            }
            if listed > 0 {
                f.write_str("; ")?;
                bytes += 2;
            }
            f.write_str(&text)?;
            bytes += text.len();
            listed += 1;
        }
        let more = self.0.len() - listed;
        if more > 0 {
            write!(f, "; and {more} more")?;
        }
        Ok(())
    }
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text is not TOML of the expected shape (syntax error, unknown field, wrong type).
    #[error("job spec: {0}")]
    Parse(Problem),
    /// The spec parsed but breaks one or more rules.
    #[error("job spec: {0}")]
    Invalid(Problems),
}

impl SpecError {
    /// Returns every problem (each bounded, but all of them, where the error's text lists at
    /// most [`MAX_LISTED_PROBLEMS`]), for callers that print one per line.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            SpecError::Parse(problem) => vec![problem.clone()],
            SpecError::Invalid(problems) => problems.0.clone(),
        }
    }
}

/// Test support: parses `text`, which must be invalid, and returns every problem as text
/// (`path: message`).
#[cfg(test)]
pub(crate) fn problem_strings(text: &str) -> Vec<String> {
    crate::parse::parse(text)
        .unwrap_err()
        .problems()
        .into_iter()
        .map(|p| p.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use cohort_proto::text::MAX_ERROR_BYTES;

    use super::*;

    #[test]
    fn short_quotes_are_kept_and_long_ones_shortened_with_their_length() {
        assert_eq!(
            shorten_quoted("unknown field `rankz`, expected `ranks`"),
            "unknown field `rankz`, expected `ranks`"
        );
        let key = "k".repeat(1000);
        assert_eq!(
            shorten_quoted(&format!("unknown field `{key}`, expected `ranks`")),
            format!(
                "unknown field `{}…` (1000 bytes), expected `ranks`",
                "k".repeat(EXCERPT_CHARS)
            )
        );
        // An escaped quote does not end a double-quoted value.
        let value = format!("{}\\\"{}", "a".repeat(10), "b".repeat(100));
        let shortened = shorten_quoted(&format!("invalid type: string \"{value}\", expected u32"));
        assert!(
            shortened.ends_with(&format!("…\" ({} bytes), expected u32", value.len())),
            "{shortened}"
        );
        // An unclosed quote runs to the end; multi-byte text is cut at a character boundary.
        let shortened = shorten_quoted(&format!("found \"{}", "é".repeat(500)));
        assert_eq!(
            shortened,
            format!("found \"{}… (1000 bytes)", "é".repeat(EXCERPT_CHARS))
        );
        assert_eq!(shorten_quoted(""), "");
        assert_eq!(shorten_quoted("``"), "``");
    }

    #[test]
    fn a_problem_is_one_bounded_line() {
        let problem = Problem::new(
            format!("a\nb{}", "p".repeat(10_000)),
            format!("line one\nline two {}", "m".repeat(10_000)),
        );
        assert!(problem.path.len() <= MAX_PATH_BYTES, "{}", problem.path);
        assert!(problem.message.len() <= MAX_MESSAGE_BYTES);
        let text = problem.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("a b"), "{text}");
        assert!(text.contains("bytes cut]"), "{text}");
        // Built by hand, it is still bounded when shown.
        let by_hand = Problem {
            path: "p".repeat(10_000),
            message: "m".repeat(10_000),
        };
        assert!(by_hand.to_string().len() <= MAX_PATH_BYTES + 2 + MAX_MESSAGE_BYTES);
    }

    #[test]
    fn a_long_list_shows_its_first_problems_and_counts_the_rest() {
        let mut problems = Problems::default();
        for i in 0..25 {
            problems.push(format!("command.args[{i}]"), "contains a NUL byte");
        }
        let text = SpecError::Invalid(problems.clone()).to_string();
        assert!(text.starts_with("job spec: command.args[0]: "), "{text}");
        assert!(text.contains("command.args[9]: "), "{text}");
        assert!(!text.contains("command.args[10]"), "{text}");
        assert!(text.ends_with("; and 15 more"), "{text}");
        assert_eq!(SpecError::Invalid(problems).problems().len(), 25);

        let mut long = Problems::default();
        for i in 0..10 {
            long.push(format!("p{i}.{}", "x".repeat(1000)), "y".repeat(1000));
        }
        let text = SpecError::Invalid(long).to_string();
        assert!(text.len() < MAX_ERROR_BYTES, "{} bytes", text.len());
        assert!(text.starts_with("job spec: p0."), "{text}");
        assert!(text.contains("more"), "{text}");
    }

    #[test]
    fn keys_in_paths_are_bare_or_short_excerpts() {
        assert_eq!(field_key("CUDA_VISIBLE_DEVICES"), "CUDA_VISIBLE_DEVICES");
        assert_eq!(field_key("a b"), "\"a b\"");
        assert_eq!(field_key(""), "\"\"");
        let long = field_key(&"K".repeat(5_000));
        assert!(long.len() < 80 && long.ends_with("(5000 bytes)"), "{long}");
    }
}
