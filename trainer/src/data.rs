//! Data sets held in memory: Fashion-MNIST found on disk, or a synthetic stand-in for tests and
//! benchmarks.
//!
//! Images stay as bytes (47 MB for the Fashion-MNIST training split rather than 188 MB as f32)
//! and are normalised into a reused f32 buffer one batch at a time.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use cohort_jobspec::train::{DataSpec, DatasetKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainerError};
use crate::idx::read_idx_file;

/// Mean pixel intensity of the Fashion-MNIST training split, on a 0 to 1 scale.
pub const PIXEL_MEAN: f32 = 0.2860;
/// Standard deviation of the Fashion-MNIST training pixels, on a 0 to 1 scale.
pub const PIXEL_STD: f32 = 0.3530;
/// Environment variable naming a data directory (holding the files or a `fashion-mnist/`
/// subdirectory).
pub const DATA_ENVIRONMENT_VARIABLE: &str = "COHORT_DATA";
/// Where the Debian package `dataset-fashion-mnist` installs the files.
pub const SYSTEM_DATA_DIRECTORY: &str = "/usr/share/datasets/fashion-mnist";
/// Development fallback: the data shared next to the repository checkout.
pub const DEVELOPMENT_DATA_DIRECTORY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/data/fashion-mnist"
);

/// Base names of the four Fashion-MNIST files (each may be gzipped with a `.gz` suffix).
const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// Labelled square grey-scale images with bytes as pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Pixels of all images, image after image, row-major.
    images: Vec<u8>,
    /// One class index per image.
    labels: Vec<u8>,
    /// Height of an image in pixels.
    rows: usize,
    /// Width of an image in pixels.
    columns: usize,
    /// Number of classes; every label is below it.
    classes: usize,
}

impl Dataset {
    /// Builds a data set, checking that the sizes agree and every label is below `classes`.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u8>,
        rows: usize,
        columns: usize,
        classes: usize,
    ) -> Result<Self> {
        let features = rows.saturating_mul(columns);
        if features == 0 || classes == 0 || classes > 256 {
            return Err(TrainerError::Config(format!(
                "data set of {rows} x {columns} images and {classes} classes, expected non-empty \
                 images and 1 to 256 classes"
            )));
        }
        if images.len() != labels.len().saturating_mul(features) {
            return Err(TrainerError::Config(format!(
                "{} image bytes for {} labels of {rows} x {columns} images, expected {}",
                images.len(),
                labels.len(),
                labels.len().saturating_mul(features)
            )));
        }
        if let Some(position) = labels
            .iter()
            .position(|&label| usize::from(label) >= classes)
        {
            return Err(TrainerError::Config(format!(
                "label {} of example {position}, expected below {classes}",
                labels[position]
            )));
        }
        Ok(Self {
            images,
            labels,
            rows,
            columns,
            classes,
        })
    }

    /// Returns the number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Returns whether the data set has no example.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Returns the side lengths `(rows, columns)` of an image.
    pub fn image_shape(&self) -> (usize, usize) {
        (self.rows, self.columns)
    }

    /// Returns the pixels per image.
    pub fn features(&self) -> usize {
        self.rows * self.columns
    }

    /// Returns the number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Returns the class of example `index`.
    pub fn label(&self, index: usize) -> Option<u8> {
        self.labels.get(index).copied()
    }

    /// Fills `images` with the normalised pixels (`(x / 255 - mean) / std`) of the examples at
    /// `indices`, one row of [`Self::features`] values each, and `labels` with their classes.
    /// Both buffers are cleared first and reuse their capacity.
    pub fn gather(
        &self,
        indices: &[usize],
        images: &mut Vec<f32>,
        labels: &mut Vec<u32>,
    ) -> Result<()> {
        let features = self.features();
        images.clear();
        labels.clear();
        images.reserve(indices.len() * features);
        labels.reserve(indices.len());
        let scale = 1.0 / (255.0 * PIXEL_STD);
        let shift = PIXEL_MEAN / PIXEL_STD;
        for &index in indices {
            let Some(&label) = self.labels.get(index) else {
                return Err(TrainerError::Config(format!(
                    "example {index} requested from a data set of {}",
                    self.len()
                )));
            };
            let pixels = &self.images[index * features..(index + 1) * features];
            images.extend(pixels.iter().map(|&p| f32::from(p) * scale - shift));
            labels.push(u32::from(label));
        }
        Ok(())
    }
}

/// The two splits of Fashion-MNIST.
#[derive(Debug, Clone)]
pub struct TrainTestSplits {
    /// Examples the optimizer sees.
    pub train: Dataset,
    /// Held-out examples evaluated at the end of every epoch.
    pub test: Dataset,
}

/// Returns the directories searched for `spec`'s data set, in order: the spec's path alone when
/// it is given; otherwise `$COHORT_DATA` (the directory itself and its `fashion-mnist/`
/// subdirectory), the Debian package's directory and the development fallback.
pub fn candidate_directories(spec: &DataSpec, cohort_data: Option<&OsStr>) -> Vec<PathBuf> {
    if let Some(path) = &spec.path {
        return vec![PathBuf::from(path)];
    }
    let mut candidates = Vec::new();
    if let Some(directory) = cohort_data.filter(|value| !value.is_empty()) {
        let directory = PathBuf::from(directory);
        candidates.push(directory.join(dataset_directory_name(spec.dataset)));
        candidates.push(directory);
    }
    candidates.push(PathBuf::from(SYSTEM_DATA_DIRECTORY));
    candidates.push(PathBuf::from(DEVELOPMENT_DATA_DIRECTORY));
    candidates
}

fn dataset_directory_name(dataset: DatasetKind) -> &'static str {
    match dataset {
        DatasetKind::FashionMnist => "fashion-mnist",
        DatasetKind::Shakespeare => "shakespeare",
    }
}

/// Returns the file of `base_name` in `directory`, gzipped or plain, if present.
fn find_file(directory: &Path, base_name: &str) -> Option<PathBuf> {
    [format!("{base_name}.gz"), base_name.to_owned()]
        .into_iter()
        .map(|name| directory.join(name))
        .find(|path| path.is_file())
}

/// Returns the first of `candidates` holding all four data files.
pub fn find_dataset_directory(dataset: DatasetKind, candidates: &[PathBuf]) -> Result<PathBuf> {
    candidates
        .iter()
        .find(|directory| {
            [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
                .iter()
                .all(|name| find_file(directory, name).is_some())
        })
        .cloned()
        .ok_or_else(|| TrainerError::DatasetNotFound {
            dataset: dataset_directory_name(dataset).to_owned(),
            looked_in: candidates.to_vec(),
        })
}

/// Finds `spec`'s data set (see [`candidate_directories`], using `$COHORT_DATA`) and loads both
/// splits. A `data.path` is read as is, so that a missing or unreadable file is reported with
/// the operating system's reason rather than as a fruitless search.
pub fn load(spec: &DataSpec) -> Result<TrainTestSplits> {
    let cohort_data = std::env::var_os(DATA_ENVIRONMENT_VARIABLE);
    let directory = dataset_directory(spec, cohort_data.as_deref())?;
    tracing::info!(directory = %directory.display(), "loading data set");
    load_directory(&directory)
}

/// Returns the directory [`load`] reads `spec`'s data set from, given the value of
/// `$COHORT_DATA`: `data.path` as is when given, else the first of the usual places
/// ([`candidate_directories`]) holding the four files.
pub fn dataset_directory(spec: &DataSpec, cohort_data: Option<&OsStr>) -> Result<PathBuf> {
    match &spec.path {
        Some(path) => Ok(PathBuf::from(path)),
        None => find_dataset_directory(spec.dataset, &candidate_directories(spec, cohort_data)),
    }
}

/// Returns the files of Fashion-MNIST in `directory` that [`load_directory`] reads: training
/// images and labels, then test images and labels. Each is the gzipped file when present, else
/// the plain one when present, else the gzipped name (absent, so that opening it says why).
pub fn dataset_files(directory: &Path) -> [PathBuf; 4] {
    [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS].map(|name| {
        find_file(directory, name).unwrap_or_else(|| directory.join(format!("{name}.gz")))
    })
}

/// Loads the four Fashion-MNIST files from `directory`.
pub fn load_directory(directory: &Path) -> Result<TrainTestSplits> {
    let [train_images, train_labels, test_images, test_labels] = dataset_files(directory);
    Ok(TrainTestSplits {
        train: load_split(&train_images, &train_labels)?,
        test: load_split(&test_images, &test_labels)?,
    })
}

fn load_split(images_path: &Path, labels_path: &Path) -> Result<Dataset> {
    let images = read_idx_file(images_path, 3)?;
    let labels = read_idx_file(labels_path, 1)?;
    let (count, rows, columns) = (
        images.dimensions[0],
        images.dimensions[1],
        images.dimensions[2],
    );
    if labels.dimensions[0] != count {
        return Err(TrainerError::DataFormat {
            path: labels_path.to_owned(),
            message: format!(
                "{} labels, expected {count} to match {}",
                labels.dimensions[0],
                images_path.display()
            ),
        });
    }
    Dataset::new(images.data, labels.data, rows, columns, 10).map_err(|error| {
        TrainerError::DataFormat {
            path: labels_path.to_owned(),
            message: error.to_string(),
        }
    })
}

/// Generates a learnable stand-in for Fashion-MNIST: each class has a random prototype image and
/// every example, in either split, is its class's prototype plus uniform noise. The same
/// arguments give the same data.
pub fn synthetic_splits(
    train_examples: usize,
    test_examples: usize,
    side: usize,
    classes: usize,
    seed: u64,
) -> Result<TrainTestSplits> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let features = side * side;
    let prototypes: Vec<u8> = (0..classes * features)
        .map(|_| rng.random_range(0..=200u8))
        .collect();
    let mut split = |examples: usize| {
        let mut images = Vec::with_capacity(examples * features);
        let mut labels = Vec::with_capacity(examples);
        for _ in 0..examples {
            let label = rng.random_range(0..classes);
            let prototype = &prototypes[label * features..(label + 1) * features];
            images.extend(
                prototype
                    .iter()
                    .map(|&p| p.saturating_add(rng.random_range(0..=55u8))),
            );
            labels.push(label as u8);
        }
        Dataset::new(images, labels, side, side, classes)
    };
    Ok(TrainTestSplits {
        train: split(train_examples)?,
        test: split(test_examples)?,
    })
}

/// Reused host buffers of one batch.
#[derive(Debug, Default)]
pub(crate) struct BatchBuffers {
    /// Normalised pixels.
    pub(crate) images: Vec<f32>,
    /// Classes.
    pub(crate) labels: Vec<u32>,
    /// Example indices of an evaluation batch.
    pub(crate) indices: Vec<usize>,
}

impl BatchBuffers {
    /// Gathers `indices` of `dataset` and returns `(images, labels)` tensors.
    pub(crate) fn tensors(
        &mut self,
        dataset: &Dataset,
        indices: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        dataset.gather(indices, &mut self.images, &mut self.labels)?;
        let images = Tensor::from_slice(&self.images, (indices.len(), dataset.features()), device)?;
        let labels = Tensor::from_slice(&self.labels, indices.len(), device)?;
        Ok((images, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::encode_idx;

    fn write_fake_dataset(directory: &Path, train: u32, test: u32) {
        for (images, labels, count) in [
            (TRAIN_IMAGES, TRAIN_LABELS, train),
            (TEST_IMAGES, TEST_LABELS, test),
        ] {
            let pixels: Vec<u8> = (0..count * 4).map(|i| i as u8).collect();
            let classes: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
            std::fs::write(directory.join(images), encode_idx(&[count, 2, 2], &pixels)).unwrap();
            std::fs::write(directory.join(labels), encode_idx(&[count], &classes)).unwrap();
        }
    }

    #[test]
    fn spec_path_is_the_only_candidate() {
        let spec = DataSpec {
            path: Some("/my/data".into()),
            ..DataSpec::default()
        };
        let candidates = candidate_directories(&spec, Some(OsStr::new("/env")));
        assert_eq!(candidates, vec![PathBuf::from("/my/data")]);
    }

    #[test]
    fn search_order_is_environment_then_system_then_development() {
        let candidates = candidate_directories(&DataSpec::default(), Some(OsStr::new("/env")));
        assert_eq!(
            candidates,
            vec![
                PathBuf::from("/env/fashion-mnist"),
                PathBuf::from("/env"),
                PathBuf::from(SYSTEM_DATA_DIRECTORY),
                PathBuf::from(DEVELOPMENT_DATA_DIRECTORY),
            ]
        );
    }

    #[test]
    fn not_found_lists_every_place_looked() {
        let dir = tempfile::tempdir().unwrap();
        let candidates = vec![dir.path().join("a"), dir.path().join("b")];
        let error = find_dataset_directory(DatasetKind::FashionMnist, &candidates).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("fashion-mnist not found"), "{message}");
        for candidate in &candidates {
            assert!(
                message.contains(&candidate.display().to_string()),
                "{message}"
            );
        }
    }

    #[test]
    fn finds_and_loads_a_directory_of_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("fashion-mnist");
        std::fs::create_dir(&nested).unwrap();
        write_fake_dataset(&nested, 30, 12);
        let candidates = candidate_directories(&DataSpec::default(), Some(dir.path().as_os_str()));
        let found = find_dataset_directory(DatasetKind::FashionMnist, &candidates).unwrap();
        assert_eq!(found, nested);
        let splits = load_directory(&found).unwrap();
        assert_eq!(splits.train.len(), 30);
        assert_eq!(splits.test.len(), 12);
        assert_eq!(splits.train.image_shape(), (2, 2));
        assert_eq!(splits.test.label(11), Some(1));
    }

    #[test]
    fn a_given_path_is_read_as_is_and_a_missing_file_says_why() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_dataset(dir.path(), 3, 2);
        std::fs::rename(
            dir.path().join(TRAIN_IMAGES),
            dir.path().join(format!("{TRAIN_IMAGES}.gz")),
        )
        .unwrap();
        assert_eq!(
            dataset_files(dir.path()),
            [
                dir.path().join(format!("{TRAIN_IMAGES}.gz")),
                dir.path().join(TRAIN_LABELS),
                dir.path().join(TEST_IMAGES),
                dir.path().join(TEST_LABELS),
            ]
        );
        let missing = dir.path().join("missing");
        let spec = DataSpec {
            path: Some(missing.display().to_string()),
            ..DataSpec::default()
        };
        let message = load(&spec).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "data file {}: No such file or directory (os error 2)",
                missing.join("train-images-idx3-ubyte.gz").display()
            )
        );
    }

    #[test]
    fn label_count_mismatch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_dataset(dir.path(), 30, 12);
        std::fs::write(dir.path().join(TEST_LABELS), encode_idx(&[11], &[0; 11])).unwrap();
        let message = load_directory(dir.path()).unwrap_err().to_string();
        assert!(message.contains("11 labels, expected 12"), "{message}");
    }

    #[test]
    fn out_of_range_label_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_dataset(dir.path(), 3, 2);
        std::fs::write(dir.path().join(TEST_LABELS), encode_idx(&[2], &[0, 10])).unwrap();
        let message = load_directory(dir.path()).unwrap_err().to_string();
        assert!(message.contains("label 10 of example 1"), "{message}");
    }

    #[test]
    fn gather_normalises_and_reuses_buffers() {
        let dataset = Dataset::new(vec![0, 255, 51, 102], vec![1, 0], 1, 2, 2).unwrap();
        let (mut images, mut labels) = (vec![9.0; 7], vec![7]);
        dataset.gather(&[1, 0], &mut images, &mut labels).unwrap();
        let normalise = |p: f32| (p / 255.0 - PIXEL_MEAN) / PIXEL_STD;
        let expected = [
            normalise(51.0),
            normalise(102.0),
            normalise(0.0),
            normalise(255.0),
        ];
        assert_eq!(images.len(), 4);
        for (got, want) in images.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(labels, vec![0, 1]);
        assert!(dataset.gather(&[2], &mut images, &mut labels).is_err());
    }

    #[test]
    fn synthetic_data_is_deterministic() {
        let a = synthetic_splits(50, 20, 4, 3, 9).unwrap();
        let b = synthetic_splits(50, 20, 4, 3, 9).unwrap();
        assert_eq!((&a.train, &a.test), (&b.train, &b.test));
        assert_ne!(a.train, synthetic_splits(50, 20, 4, 3, 10).unwrap().train);
        assert_eq!(
            (a.train.len(), a.test.len(), a.train.features()),
            (50, 20, 16)
        );
    }

    #[test]
    #[ignore = "reads the real Fashion-MNIST files when installed"]
    fn real_fashion_mnist_loads_when_installed() {
        let splits = load(&DataSpec::default()).unwrap();
        assert_eq!(splits.train.len(), 60_000);
        assert_eq!(splits.test.len(), 10_000);
        assert_eq!(splits.train.image_shape(), (28, 28));
    }
}
