//! Text for character-level language models: the Shakespeare corpus, its vocabulary (every
//! byte value the text uses), the train/validation split and fixed-length windows.
//!
//! An example is a window of `context + 1` tokens starting at a multiple of `context`: the model
//! reads the first `context` tokens and predicts each next one. Windows do not overlap, so an
//! epoch reads the split once.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use cohort_jobspec::train::DataSpec;

use crate::data::DATA_ENVIRONMENT_VARIABLE;
use crate::error::{Result, TrainerError};

/// File name of the corpus inside its directory.
pub const SHAKESPEARE_FILE: &str = "shakespeare.txt";
/// Fraction of the text (its end) kept for validation.
pub const VALIDATION_FRACTION: f64 = 0.1;
/// Development fallback: the data shared next to the repository checkout.
pub const DEVELOPMENT_TEXT_DIRECTORY: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/shakespeare");
/// Largest corpus read, in bytes.
pub const MAX_CORPUS_BYTES: u64 = 1 << 30;

/// The symbols of a corpus: token `i` is byte `symbols[i]`, in increasing byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocabulary {
    /// Bytes, sorted, unique.
    symbols: Vec<u8>,
    /// Token of each byte value, `u32::MAX` where absent.
    tokens: [u32; 256],
}

impl Vocabulary {
    /// Returns the vocabulary of the bytes `text` uses.
    pub fn of(text: &[u8]) -> Self {
        let mut present = [false; 256];
        for &byte in text {
            present[byte as usize] = true;
        }
        let symbols: Vec<u8> = (0..=255u8).filter(|&b| present[b as usize]).collect();
        Self::from_symbols(symbols)
    }

    fn from_symbols(symbols: Vec<u8>) -> Self {
        let mut tokens = [u32::MAX; 256];
        for (token, &byte) in symbols.iter().enumerate() {
            tokens[byte as usize] = token as u32;
        }
        Self { symbols, tokens }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Encodes `text`; a byte outside the vocabulary is an error naming it.
    pub fn encode(&self, text: &[u8]) -> Result<Vec<u32>> {
        text.iter()
            .map(|&byte| match self.tokens[byte as usize] {
                u32::MAX => Err(TrainerError::Config(format!(
                    "character {:?} is not in the model's vocabulary",
                    byte as char
                ))),
                token => Ok(token),
            })
            .collect()
    }

    /// Decodes tokens (an out-of-range token becomes `?`).
    pub fn decode(&self, tokens: &[u32]) -> String {
        tokens
            .iter()
            .map(|&token| {
                self.symbols
                    .get(token as usize)
                    .map_or('?', |&byte| byte as char)
            })
            .collect()
    }

    /// The vocabulary as text for checkpoint metadata: the symbols' byte values in hex.
    pub fn to_metadata(&self) -> String {
        self.symbols.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads [`Vocabulary::to_metadata`]'s form back.
    pub fn from_metadata(text: &str) -> Result<Self> {
        let bad = || TrainerError::Config(format!("vocabulary metadata {text:?} is not hex bytes"));
        if !text.len().is_multiple_of(2) || text.len() > 512 {
            return Err(bad());
        }
        let symbols = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>>>()?;
        if symbols.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(bad());
        }
        Ok(Self::from_symbols(symbols))
    }
}

/// A tokenised corpus split into training and validation text.
#[derive(Debug, Clone)]
pub struct TextCorpus {
    /// The symbols.
    pub vocabulary: Vocabulary,
    /// The first 90% of the text.
    pub train: Vec<u32>,
    /// The last 10%.
    pub validation: Vec<u32>,
}

impl TextCorpus {
    /// Tokenises `text` and splits it.
    pub fn from_text(text: &[u8]) -> Result<Self> {
        let vocabulary = Vocabulary::of(text);
        let tokens = vocabulary.encode(text)?;
        let split = ((tokens.len() as f64) * (1.0 - VALIDATION_FRACTION)).round() as usize;
        let validation = tokens[split..].to_vec();
        let mut train = tokens;
        train.truncate(split);
        Ok(Self {
            vocabulary,
            train,
            validation,
        })
    }
}

/// Non-overlapping windows of `context + 1` tokens over a token sequence.
#[derive(Debug, Clone, Copy)]
pub struct Windows<'a> {
    /// The text.
    tokens: &'a [u32],
    /// Tokens the model reads per example.
    context: usize,
}

impl<'a> Windows<'a> {
    /// Windows of `context` tokens over `tokens`.
    pub fn new(tokens: &'a [u32], context: usize) -> Self {
        Self {
            tokens,
            context: context.max(1),
        }
    }

    /// Number of complete windows.
    pub fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.context
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the inputs and targets of windows `indices` (each `context` tokens, targets
    /// shifted by one) to the cleared buffers.
    pub fn gather(&self, indices: &[usize], inputs: &mut Vec<u32>, targets: &mut Vec<u32>) {
        inputs.clear();
        targets.clear();
        for &index in indices {
            let start = index * self.context;
            inputs.extend_from_slice(&self.tokens[start..start + self.context]);
            targets.extend_from_slice(&self.tokens[start + 1..start + self.context + 1]);
        }
    }
}

/// Returns where the corpus is looked for: the spec's path alone when given (a directory
/// holding `shakespeare.txt`, or the file); otherwise `$COHORT_DATA/shakespeare`,
/// `$COHORT_DATA`, the per-user cache `scripts/fetch-shakespeare.sh` fills, and the shared data
/// next to the checkout.
pub fn candidate_files(spec: &DataSpec, cohort_data: Option<&OsStr>) -> Vec<PathBuf> {
    let in_directory = |directory: PathBuf| {
        if directory.extension().is_some_and(|e| e == "txt") {
            directory
        } else {
            directory.join(SHAKESPEARE_FILE)
        }
    };
    if let Some(path) = &spec.path {
        return vec![in_directory(PathBuf::from(path))];
    }
    let mut candidates = Vec::new();
    if let Some(directory) = cohort_data.filter(|value| !value.is_empty()) {
        let directory = PathBuf::from(directory);
        candidates.push(directory.join("shakespeare").join(SHAKESPEARE_FILE));
        candidates.push(directory.join(SHAKESPEARE_FILE));
    }
    if let Some(cache) = cache_directory() {
        candidates.push(cache.join(SHAKESPEARE_FILE));
    }
    candidates.push(PathBuf::from(DEVELOPMENT_TEXT_DIRECTORY).join(SHAKESPEARE_FILE));
    candidates
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/cohort/shakespeare`, where the fetch script puts the text.
pub fn cache_directory() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("cohort").join("shakespeare"))
}

/// Finds and loads the corpus of `spec`. A `data.path` is read as is, so that a missing or
/// unreadable file is reported with the operating system's reason.
pub fn load(spec: &DataSpec) -> Result<TextCorpus> {
    let cohort_data = std::env::var_os(DATA_ENVIRONMENT_VARIABLE);
    load_file(&corpus_file(spec, cohort_data.as_deref())?)
}

/// Returns the file [`load`] reads, given the value of `$COHORT_DATA`: the one `data.path`
/// names as is when given, else the first of the usual places ([`candidate_files`]) holding
/// the corpus.
pub fn corpus_file(spec: &DataSpec, cohort_data: Option<&OsStr>) -> Result<PathBuf> {
    let candidates = candidate_files(spec, cohort_data);
    if spec.path.is_some()
        && let [path] = candidates.as_slice()
    {
        return Ok(path.clone());
    }
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| TrainerError::DatasetNotFound {
            dataset: format!(
                "shakespeare (run scripts/fetch-shakespeare.sh, or set ${DATA_ENVIRONMENT_VARIABLE})"
            ),
            looked_in: candidates,
        })
}

/// Loads the corpus from `path`.
pub fn load_file(path: &Path) -> Result<TextCorpus> {
    let read_error = |source| TrainerError::DataRead {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > MAX_CORPUS_BYTES {
        return Err(TrainerError::DataFormat {
            path: path.to_owned(),
            message: format!("{size} bytes, expected at most {MAX_CORPUS_BYTES}"),
        });
    }
    let text = std::fs::read(path).map_err(read_error)?;
    if text.len() < 1024 {
        return Err(TrainerError::DataFormat {
            path: path.to_owned(),
            message: format!("{} bytes, expected a corpus of at least 1024", text.len()),
        });
    }
    tracing::info!(path = %path.display(), bytes = text.len(), "loading text corpus");
    TextCorpus::from_text(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_round_trips_text_and_metadata() {
        let vocabulary = Vocabulary::of(b"to be, or not to be");
        assert_eq!(vocabulary.len(), 8);
        let tokens = vocabulary.encode(b"be or not").unwrap();
        assert_eq!(vocabulary.decode(&tokens), "be or not");
        assert!(vocabulary.encode(b"z").is_err());
        let restored = Vocabulary::from_metadata(&vocabulary.to_metadata()).unwrap();
        assert_eq!(restored, vocabulary);
        assert!(Vocabulary::from_metadata("zz").is_err());
        assert!(Vocabulary::from_metadata("6261").is_err(), "unsorted");
    }

    #[test]
    fn corpus_keeps_the_last_tenth_for_validation() {
        let text: Vec<u8> = (0..1000).map(|i| b'a' + (i % 7) as u8).collect();
        let corpus = TextCorpus::from_text(&text).unwrap();
        assert_eq!(corpus.train.len(), 900);
        assert_eq!(corpus.validation.len(), 100);
        assert_eq!(corpus.vocabulary.decode(&corpus.validation[..3]), "efg");
    }

    #[test]
    fn windows_shift_targets_by_one() {
        let tokens: Vec<u32> = (0..10).collect();
        let windows = Windows::new(&tokens, 3);
        assert_eq!(windows.len(), 3);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        windows.gather(&[2, 0], &mut inputs, &mut targets);
        assert_eq!(inputs, [6, 7, 8, 0, 1, 2]);
        assert_eq!(targets, [7, 8, 9, 1, 2, 3]);
    }

    #[test]
    fn a_given_path_is_the_only_candidate() {
        let spec = DataSpec {
            path: Some("/data/texts".to_owned()),
            ..DataSpec::default()
        };
        assert_eq!(
            candidate_files(&spec, Some(OsStr::new("/ignored"))),
            [PathBuf::from("/data/texts/shakespeare.txt")]
        );
        let spec = DataSpec {
            path: Some("/data/plays.txt".to_owned()),
            ..DataSpec::default()
        };
        assert_eq!(
            candidate_files(&spec, None),
            [PathBuf::from("/data/plays.txt")]
        );
    }

    #[test]
    fn a_missing_given_path_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DataSpec {
            path: Some(dir.path().join("texts").display().to_string()),
            ..DataSpec::default()
        };
        let message = load(&spec).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "data file {}: No such file or directory (os error 2)",
                dir.path().join("texts").join(SHAKESPEARE_FILE).display()
            )
        );
    }

    #[test]
    fn the_shared_corpus_loads_when_present() {
        let path = PathBuf::from(DEVELOPMENT_TEXT_DIRECTORY).join(SHAKESPEARE_FILE);
        if !path.is_file() {
            eprintln!("skipped: {} is not there", path.display());
            return;
        }
        let corpus = load_file(&path).unwrap();
        assert!(corpus.vocabulary.len() > 50 && corpus.vocabulary.len() < 128);
        assert!(corpus.train.len() > 4_000_000);
    }
}
