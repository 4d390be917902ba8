//! Field-path errors collected by validation.

use std::fmt;

/// One thing wrong with a spec: which field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, e.g. `resources.ranks` (empty for the document itself).
    pub path: String,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
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

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            problem.fmt(f)?;
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
    /// Returns every problem, for callers that print one per line.
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
    crate::job::parse(text)
        .unwrap_err()
        .problems()
        .into_iter()
        .map(|p| p.to_string())
        .collect()
}
