//! What a rank reads before it trains, checked before it joins any communicator: the data set
//! (`data.path`, else `$COHORT_DATA`, else the usual places) and the checkpoint it resumes from
//! (`checkpoint.resume_from`). A process that cannot read one exits at once with one line naming
//! the spec field, the path and the operating system's reason, which its worker reports as the
//! rank's detail:
//! `data.path /nope: cannot read train-images-idx3-ubyte.gz: No such file or directory (os error 2)`.
//! Without the check, a rank 0 that cannot read the checkpoint fails only after the ring has
//! formed, and its peers report a broken broadcast instead.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;

use anyhow::{Result, bail};
use cohort_jobspec::train::{Communication, DataSpec, DatasetKind, ModelKind};
use cohort_proto::launch::Role;
use cohort_trainer::checkpoint::{MODEL_FILE, OPTIMIZER_FILE};
use cohort_trainer::data::{self, DATA_ENVIRONMENT_VARIABLE};
use cohort_trainer::{TrainConfig, text};

/// Checks that this process can read what it will: the data set (a training rank) and the
/// files of the checkpoint being resumed that it loads.
pub fn check(config: &TrainConfig, role: Role, rank: usize) -> Result<()> {
    if role == Role::Rank {
        let cohort_data = std::env::var_os(DATA_ENVIRONMENT_VARIABLE);
        check_data(&config.data, cohort_data.as_deref())?;
    }
    check_resume_from(config, role, rank)
}

/// Checks the files of the checkpoint being resumed, if any, that this process loads.
fn check_resume_from(config: &TrainConfig, role: Role, rank: usize) -> Result<()> {
    let Some(path) = config.resume_path() else {
        return Ok(());
    };
    let files = resume_files(config, role, rank)
        .iter()
        .map(|name| path.join(name));
    check_files("checkpoint.resume_from", &path, files)
}

/// Checks the data set's files where the loaders will read them, given the value of
/// `$COHORT_DATA`. Without `data.path`, no usual place holding the data set is an error that
/// lists every place looked.
fn check_data(spec: &DataSpec, cohort_data: Option<&OsStr>) -> Result<()> {
    let field = if spec.path.is_some() {
        "data.path"
    } else {
        "data set"
    };
    match spec.dataset {
        DatasetKind::FashionMnist => {
            let directory = data::dataset_directory(spec, cohort_data)?;
            check_files(field, &directory, data::dataset_files(&directory))
        }
        DatasetKind::Shakespeare => {
            let file = text::corpus_file(spec, cohort_data)?;
            let base = spec.path.as_deref().map_or(file.as_path(), Path::new);
            check_files(field, base, [file.clone()])
        }
    }
}

/// Returns the files of the checkpoint being resumed that this process loads: rank 0 of an
/// image-model job reads the weights, and with all-reduce the optimizer state, then broadcasts
/// them (with parameter servers, the servers hold the optimizer state); every rank of a
/// transformer mesh reads both for its own slice; a parameter server reads its shard's snapshot
/// when the checkpoint has one and needs the weights file to be there either way.
fn resume_files(config: &TrainConfig, role: Role, rank: usize) -> &'static [&'static str] {
    match role {
        Role::ParameterServer { .. } => &[MODEL_FILE],
        Role::Rank if config.model.kind == ModelKind::Transformer => &[MODEL_FILE, OPTIMIZER_FILE],
        Role::Rank if rank != 0 => &[],
        Role::Rank => match config.parallel.comm {
            Communication::Ps => &[MODEL_FILE],
            Communication::Allreduce => &[MODEL_FILE, OPTIMIZER_FILE],
        },
    }
}

/// Opens each of `files` and reads a byte; the first that fails is an error naming `field`,
/// `base` (the path the spec gave, or where the data set was found) and the file within it.
fn check_files(
    field: &str,
    base: &Path,
    files: impl IntoIterator<Item = impl AsRef<Path>>,
) -> Result<()> {
    for file in files {
        let file = file.as_ref();
        let readable = std::fs::File::open(file).and_then(|mut opened| opened.read(&mut [0; 1]));
        if let Err(error) = readable {
            match file.strip_prefix(base) {
                Ok(name) if !name.as_os_str().is_empty() => bail!(
                    "{field} {}: cannot read {}: {error}",
                    base.display(),
                    name.display()
                ),
                _ => bail!("{field} {}: {error}", file.display()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FASHION_FILES: [&str; 4] = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];

    fn data_spec(dataset: DatasetKind, path: Option<&Path>) -> DataSpec {
        DataSpec {
            dataset,
            path: path.map(|path| path.display().to_string()),
            ..DataSpec::default()
        }
    }

    #[test]
    fn a_missing_data_path_names_the_field_the_path_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let error = check_data(&data_spec(DatasetKind::FashionMnist, Some(&missing)), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!(
                "data.path {}: cannot read train-images-idx3-ubyte.gz: No such file or \
                 directory (os error 2)",
                missing.display()
            )
        );
        let error = check_data(&data_spec(DatasetKind::Shakespeare, Some(&missing)), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!(
                "data.path {}: cannot read shakespeare.txt: No such file or directory (os \
                 error 2)",
                missing.display()
            )
        );
        let plays = dir.path().join("plays.txt");
        let error = check_data(&data_spec(DatasetKind::Shakespeare, Some(&plays)), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!(
                "data.path {}: No such file or directory (os error 2)",
                plays.display()
            )
        );
    }

    #[test]
    fn an_unreadable_data_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for name in FASHION_FILES {
            std::fs::write(dir.path().join(name), b"idx").unwrap();
        }
        let spec = data_spec(DatasetKind::FashionMnist, Some(dir.path()));
        check_data(&spec, None).unwrap();
        // A directory where a file should be opens but cannot be read (as root too, unlike a
        // file without permissions).
        std::fs::remove_file(dir.path().join(FASHION_FILES[2])).unwrap();
        std::fs::create_dir(dir.path().join(format!("{}.gz", FASHION_FILES[2]))).unwrap();
        let error = check_data(&spec, None).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "data.path {}: cannot read t10k-images-idx3-ubyte.gz: Is a directory (os error \
                 21)",
                dir.path().display()
            )
        );
    }

    #[test]
    fn without_a_data_path_the_place_found_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("fashion-mnist");
        std::fs::create_dir(&nested).unwrap();
        for name in FASHION_FILES {
            std::fs::write(nested.join(format!("{name}.gz")), b"gz").unwrap();
        }
        let spec = data_spec(DatasetKind::FashionMnist, None);
        check_data(&spec, Some(dir.path().as_os_str())).unwrap();
        let text = data_spec(DatasetKind::Shakespeare, None);
        std::fs::write(dir.path().join("shakespeare.txt"), b"to be").unwrap();
        check_data(&text, Some(dir.path().as_os_str())).unwrap();
    }

    fn train_config(extra: &str, output: &Path) -> TrainConfig {
        let spec =
            cohort_jobspec::parse(&format!("version = 1\nkind = \"train\"\n{extra}")).unwrap();
        TrainConfig::from_job_spec(&spec, output)
    }

    #[test]
    fn the_processes_that_load_a_checkpoint_check_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("step-00000500");
        let resume = format!("[checkpoint]\nresume_from = \"{}\"\n", checkpoint.display());
        let no_data = dir.path().join("no-data");
        let image = train_config(
            &format!(
                "[parallel]\ndata = 2\n[data]\npath = \"{}\"\n{resume}",
                no_data.display()
            ),
            dir.path(),
        );
        let missing = format!(
            "checkpoint.resume_from {}: cannot read model.safetensors: No such file or directory \
             (os error 2)",
            checkpoint.display()
        );
        let error = check_resume_from(&image, Role::Rank, 0).unwrap_err();
        assert_eq!(error.to_string(), missing);
        // Rank 1 receives the checkpoint by broadcast.
        assert!(resume_files(&image, Role::Rank, 1).is_empty());
        assert_eq!(
            resume_files(&image, Role::Rank, 0),
            [MODEL_FILE, OPTIMIZER_FILE]
        );
        let server = Role::ParameterServer {
            shard: 0,
            shards: 1,
        };
        let error = check(&image, server, 2).unwrap_err();
        assert_eq!(error.to_string(), missing);

        std::fs::create_dir(&checkpoint).unwrap();
        std::fs::write(checkpoint.join(MODEL_FILE), b"weights").unwrap();
        // A parameter server reads no data: only the checkpoint is checked.
        check(&image, server, 2).unwrap();
        let error = check(&image, Role::Rank, 1).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("data.path {}: cannot read", no_data.display())),
            "{error}"
        );
        let error = check_resume_from(&image, Role::Rank, 0).unwrap_err();
        assert!(
            error.to_string().ends_with(
                "cannot read optimizer.safetensors: No such file or directory (os error 2)"
            ),
            "{error}"
        );
        let parameter_server = train_config(
            &format!("[parallel]\ndata = 2\ncomm = \"ps\"\n{resume}"),
            dir.path(),
        );
        assert_eq!(resume_files(&parameter_server, Role::Rank, 0), [MODEL_FILE]);
        let transformer = train_config(
            &format!(
                "[model]\nkind = \"transformer\"\n[data]\ndataset = \"shakespeare\"\n\
                 [parallel]\ndata = 2\n{resume}"
            ),
            dir.path(),
        );
        assert_eq!(
            resume_files(&transformer, Role::Rank, 1),
            [MODEL_FILE, OPTIMIZER_FILE]
        );
        check_resume_from(&transformer, Role::Rank, 1).unwrap_err();
        std::fs::write(checkpoint.join(OPTIMIZER_FILE), b"state").unwrap();
        check_resume_from(&transformer, Role::Rank, 1).unwrap();
        check_resume_from(&image, Role::Rank, 0).unwrap();
    }

    #[test]
    fn a_relative_checkpoint_is_checked_in_the_output_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = train_config(
            "[checkpoint]\nresume_from = \"checkpoints/step-00000010\"\n",
            dir.path(),
        );
        let error = check_resume_from(&config, Role::Rank, 0)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!(
                "checkpoint.resume_from {}: cannot read model.safetensors",
                dir.path().join("checkpoints/step-00000010").display()
            )),
            "{error}"
        );
    }
}
