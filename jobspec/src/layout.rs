//! The rules that tie a training job's sections together: which model trains on which data
//! set, how a transformer's blocks split into pipeline stages and tensor-parallel shards, and
//! what parameter-server jobs may use. Also the pure stage-balancing function the trainer uses.

use crate::job::{DeviceKind, JobSpec, MAX_RANKS};
use crate::problems::Problems;
use crate::train::{
    CollectiveBackend, Communication, DatasetKind, HostTransport, ModelKind, ModelSpec,
    ParallelSpec,
};

/// Default transformer blocks.
pub const DEFAULT_LAYERS: u32 = 4;
/// Default attention heads.
pub const DEFAULT_HEADS: u32 = 4;
/// Default residual-stream width.
pub const DEFAULT_WIDTH: u32 = 128;
/// Default context length in tokens.
pub const DEFAULT_CONTEXT: u32 = 64;
/// Most transformer blocks.
pub const MAX_LAYERS: u32 = 256;
/// Most attention heads.
pub const MAX_HEADS: u32 = 256;
/// Widest residual stream.
pub const MAX_WIDTH: u32 = 16_384;
/// Longest context.
pub const MAX_CONTEXT: u32 = 4096;
/// Vocabulary size assumed when bounding a transformer's size before the data is read (every
/// byte value).
pub const MAX_VOCABULARY: u64 = 256;

/// A transformer's shape with every default applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerShape {
    /// Blocks.
    pub layers: u32,
    /// Attention heads per block.
    pub heads: u32,
    /// Residual-stream width.
    pub width: u32,
    /// Context length in tokens.
    pub context: u32,
    /// Whether the head reuses the token embedding.
    pub tie_embeddings: bool,
}

impl TransformerShape {
    /// Parameters of one block: attention (q, k, v, output projections with biases), the MLP
    /// (width -> 4 width -> width) and two LayerNorms. Saturates instead of overflowing, like
    /// every count here: validation computes them before refusing absurd shapes.
    pub fn block_parameters(&self) -> u64 {
        let width = u64::from(self.width);
        width
            .saturating_mul(width)
            .saturating_mul(12)
            .saturating_add(13 * width)
    }

    /// Parameters outside the blocks on the first stage: token and position embeddings.
    pub fn embedding_parameters(&self, vocabulary: u64) -> u64 {
        vocabulary
            .saturating_add(u64::from(self.context))
            .saturating_mul(u64::from(self.width))
    }

    /// Parameters outside the blocks on the last stage: the final LayerNorm and the head
    /// (only its bias when tied).
    pub fn head_parameters(&self, vocabulary: u64) -> u64 {
        let width = u64::from(self.width);
        let weight = if self.tie_embeddings {
            0
        } else {
            vocabulary.saturating_mul(width)
        };
        (2 * width)
            .saturating_add(weight)
            .saturating_add(vocabulary)
    }

    /// Every parameter of the model for `vocabulary` tokens.
    pub fn parameter_count(&self, vocabulary: u64) -> u64 {
        self.embedding_parameters(vocabulary)
            .saturating_add(
                self.block_parameters()
                    .saturating_mul(u64::from(self.layers)),
            )
            .saturating_add(self.head_parameters(vocabulary))
    }
}

impl ModelSpec {
    /// Returns the transformer's shape (defaults: 4 layers, 4 heads, width 128, context 64,
    /// untied).
    pub fn transformer(&self) -> TransformerShape {
        TransformerShape {
            layers: self.layers.unwrap_or(DEFAULT_LAYERS),
            heads: self.heads.unwrap_or(DEFAULT_HEADS),
            width: self.width.unwrap_or(DEFAULT_WIDTH),
            context: self.context.unwrap_or(DEFAULT_CONTEXT),
            tie_embeddings: self.tie_embeddings.unwrap_or(false),
        }
    }
}

/// Splits `layers` blocks into `stages` consecutive non-empty stages, balancing parameters:
/// each block weighs `block`, the first stage carries `first_extra` more (embeddings) and the
/// last `last_extra` more (the head). Minimises the heaviest stage; ties go to the earliest
/// split. Returns the blocks of each stage; empty when `stages` is 0 or exceeds `layers`.
pub fn balanced_stage_layers(
    layers: u32,
    stages: u32,
    block: u64,
    first_extra: u64,
    last_extra: u64,
) -> Vec<u32> {
    if stages == 0 || stages > layers {
        return Vec::new();
    }
    let weight = |stage: u32, blocks: u32| -> u64 {
        let mut total = u64::from(blocks).saturating_mul(block);
        if stage == 0 {
            total = total.saturating_add(first_extra);
        }
        if stage + 1 == stages {
            total = total.saturating_add(last_extra);
        }
        total
    };
    // Smallest bound for which a greedy left-to-right packing fits: binary search over it.
    let fits = |bound: u64| -> Option<Vec<u32>> {
        let mut split = Vec::with_capacity(stages as usize);
        let mut remaining = layers;
        for stage in 0..stages {
            let stages_after = stages - stage - 1;
            let mut blocks = 1;
            while blocks < remaining - stages_after && weight(stage, blocks + 1) <= bound {
                blocks += 1;
            }
            if stage + 1 == stages {
                blocks = remaining;
            }
            if weight(stage, blocks) > bound {
                return None;
            }
            split.push(blocks);
            remaining -= blocks;
        }
        Some(split)
    };
    let (mut low, mut high) = (
        0u64,
        weight(0, layers).saturating_add(last_extra.saturating_add(first_extra)),
    );
    while low < high {
        let middle = low + (high - low) / 2;
        if fits(middle).is_some() {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    fits(low).unwrap_or_default()
}

/// Records the problems of `spec`'s training sections taken together.
pub fn validate(spec: &JobSpec, parallel: &ParallelSpec, problems: &mut Problems) {
    let model = spec.model.clone().unwrap_or_default();
    let dataset = spec.data.clone().unwrap_or_default().dataset;
    match (model.kind, dataset) {
        (ModelKind::Transformer, DatasetKind::Shakespeare) => {}
        (ModelKind::Transformer, _) => problems.push(
            "data.dataset",
            "fashion-mnist with model.kind = \"transformer\", expected \"shakespeare\"",
        ),
        (_, DatasetKind::Shakespeare) => problems.push(
            "model.kind",
            "an image model with data.dataset = \"shakespeare\", expected \"transformer\"",
        ),
        _ => {}
    }
    validate_transformer_fields(&model, problems);
    if model.kind == ModelKind::Transformer {
        validate_mesh(spec, &model, parallel, problems);
    } else if parallel.splits_the_model() || parallel.stage_layers.is_some() {
        problems.push(
            if parallel.pipeline > 1 {
                "parallel.pipeline"
            } else if parallel.tensor > 1 {
                "parallel.tensor"
            } else {
                "parallel.stage_layers"
            },
            "only allowed with model.kind = \"transformer\"",
        );
    }
    if parallel.micro_batches.is_some() && parallel.pipeline == 1 && !parallel.splits_the_model() {
        // Harmless with one stage, but it means nothing: say so.
        if model.kind != ModelKind::Transformer {
            problems.push(
                "parallel.micro_batches",
                "only allowed with model.kind = \"transformer\"",
            );
        }
    }
    if parallel.comm == Communication::Ps {
        validate_parameter_server(spec, &model, parallel, problems);
    }
    validate_collective(spec, &model, parallel, problems);
}

/// The transport `spec`'s all-reduce runs over, with `"auto"` resolved: NCCL for image models
/// on GPU ranks with more than one replica, the TCP ring otherwise (one replica exchanges
/// nothing; transformer meshes build TCP rings per axis).
pub fn gradient_transport(spec: &JobSpec) -> CollectiveBackend {
    let parallel = spec.parallel.clone().unwrap_or_default();
    let model = spec.model.clone().unwrap_or_default();
    match parallel.collective {
        CollectiveBackend::Auto
            if spec.resources.device == DeviceKind::Gpu
                && parallel.data > 1
                && model.kind != ModelKind::Transformer
                && parallel.comm == Communication::Allreduce =>
        {
            CollectiveBackend::Nccl
        }
        CollectiveBackend::Auto => CollectiveBackend::Tcp,
        explicit => explicit,
    }
}

/// `parallel.collective = "nccl"` needs GPU ranks exchanging by all-reduce outside a mesh.
fn validate_collective(
    spec: &JobSpec,
    model: &ModelSpec,
    parallel: &ParallelSpec,
    problems: &mut Problems,
) {
    if parallel.transport != HostTransport::Auto {
        let reason = if parallel.comm == Communication::Ps {
            Some("with parallel.comm = \"ps\", expected \"auto\" (gradients go to the servers)")
        } else if gradient_transport(spec) == CollectiveBackend::Nccl {
            Some(
                "with NCCL carrying the gradients, expected \"auto\" (set parallel.collective = \"tcp\")",
            )
        } else {
            None
        };
        if let Some(reason) = reason {
            problems.push(
                "parallel.transport",
                format!("\"{}\" {reason}", parallel.transport.name()),
            );
        }
    }
    if parallel.collective != CollectiveBackend::Nccl {
        return;
    }
    let reason = if parallel.comm == Communication::Ps {
        Some("with parallel.comm = \"ps\", expected \"auto\" (gradients go to the servers)")
    } else if spec.resources.device != DeviceKind::Gpu {
        Some(
            "with resources.device = \"cpu\", expected \"auto\" or \"tcp\" (NCCL moves GPU memory)",
        )
    } else if model.kind == ModelKind::Transformer {
        Some(
            "with model.kind = \"transformer\", expected \"auto\" or \"tcp\" (transformer \
             meshes exchange through TCP rings)",
        )
    } else {
        None
    };
    if let Some(reason) = reason {
        problems.push("parallel.collective", format!("\"nccl\" {reason}"));
    }
}

/// The transformer's own fields: present only for a transformer, each in range.
fn validate_transformer_fields(model: &ModelSpec, problems: &mut Problems) {
    let fields = [
        ("layers", model.layers.is_some()),
        ("heads", model.heads.is_some()),
        ("width", model.width.is_some()),
        ("context", model.context.is_some()),
        ("tie_embeddings", model.tie_embeddings.is_some()),
    ];
    if model.kind != ModelKind::Transformer {
        for (field, present) in fields {
            if present {
                problems.push(
                    format!("model.{field}"),
                    "only allowed with kind = \"transformer\"",
                );
            }
        }
        return;
    }
    let shape = model.transformer();
    problems.check_range("model.layers", shape.layers, 1, MAX_LAYERS);
    problems.check_range("model.heads", shape.heads, 1, MAX_HEADS);
    problems.check_range("model.width", shape.width, 8, MAX_WIDTH);
    problems.check_range("model.context", shape.context, 2, MAX_CONTEXT);
    if shape.heads > 0 && !shape.width.is_multiple_of(shape.heads) {
        problems.push(
            "model.heads",
            format!(
                "{}, expected a divisor of model.width = {}",
                shape.heads, shape.width
            ),
        );
    }
    let parameters = shape.parameter_count(MAX_VOCABULARY);
    if parameters > crate::train::MAX_PARAMETERS {
        problems.push(
            "model",
            format!(
                "{parameters} parameters, expected at most {}",
                crate::train::MAX_PARAMETERS
            ),
        );
    }
}

/// A transformer's mesh: stages within the blocks, shards within the heads and widths, the
/// batch within replicas and micro-batches.
fn validate_mesh(
    spec: &JobSpec,
    model: &ModelSpec,
    parallel: &ParallelSpec,
    problems: &mut Problems,
) {
    let shape = model.transformer();
    if parallel.pipeline > shape.layers {
        problems.push(
            "parallel.pipeline",
            format!(
                "{} stages, expected at most model.layers = {} (one block per stage at least)",
                parallel.pipeline, shape.layers
            ),
        );
    }
    if parallel.tensor > 1 {
        for (field, value) in [("heads", shape.heads), ("width", shape.width)] {
            if value % parallel.tensor != 0 {
                problems.push(
                    "parallel.tensor",
                    format!(
                        "{}, expected a divisor of model.{field} = {value}",
                        parallel.tensor
                    ),
                );
            }
        }
    }
    if let Some(stage_layers) = &parallel.stage_layers {
        let total: u64 = stage_layers.iter().map(|&n| u64::from(n)).sum();
        if stage_layers.len() != parallel.pipeline as usize
            || total != u64::from(shape.layers)
            || stage_layers.contains(&0)
        {
            let found = if stage_layers.len() <= 16 {
                format!("{stage_layers:?}")
            } else {
                format!("{} entries summing to {total}", stage_layers.len())
            };
            problems.push(
                "parallel.stage_layers",
                format!(
                    "{found}, expected {} entries of at least 1 summing to model.layers = {}",
                    parallel.pipeline, shape.layers
                ),
            );
        }
    }
    if shape.tie_embeddings && parallel.pipeline > 1 {
        problems.push(
            "model.tie_embeddings",
            "only allowed with parallel.pipeline = 1 (the embedding and the head would live on \
             different stages)",
        );
    }
    let batch = spec.schedule.clone().unwrap_or_default().batch_size;
    let micro_batches = parallel.micro_batches();
    let per_micro_batch = u64::from(parallel.data) * u64::from(micro_batches);
    if per_micro_batch > 0 && u64::from(batch) % per_micro_batch != 0 {
        problems.push(
            "schedule.batch_size",
            format!(
                "{batch}, expected a multiple of parallel.data x micro-batches = \
                 {per_micro_batch} (every replica's micro-batches are the same size)"
            ),
        );
    }
    if spec.resources.device != DeviceKind::Cpu && parallel.splits_the_model() {
        problems.push(
            "resources.device",
            "\"gpu\" with pipeline or tensor parallelism, expected \"cpu\" (model-parallel \
             ranks exchange activations through host memory)",
        );
    }
}

/// The rules that tie `comm = "ps"` to the other sections.
fn validate_parameter_server(
    spec: &JobSpec,
    model: &ModelSpec,
    parallel: &ParallelSpec,
    problems: &mut Problems,
) {
    if spec
        .optimizer
        .as_ref()
        .is_some_and(|optimizer| optimizer.grad_clip_norm.is_some())
    {
        problems.push(
            "optimizer.grad_clip_norm",
            "not supported with parallel.comm = \"ps\" (the servers apply each shard's \
             gradients on their own, so no one sees the global norm)",
        );
    }
    if spec.resources.device != DeviceKind::Cpu {
        problems.push(
            "resources.device",
            "\"gpu\" with parallel.comm = \"ps\", expected \"cpu\" (parameter servers and \
             the ranks they serve share the job's CPU slots)",
        );
    }
    if spec
        .train
        .as_ref()
        .is_some_and(|train| train.precision == crate::precision::Precision::Fp16)
    {
        problems.push(
            "train.precision",
            "\"fp16\" with parallel.comm = \"ps\", expected \"fp32\" or \"bf16\" (fp16 loss \
             scaling needs every rank to agree on skipped steps, which parameter servers do not \
             coordinate)",
        );
    }
    if model.kind == ModelKind::Transformer {
        problems.push(
            "parallel.comm",
            "\"ps\" with model.kind = \"transformer\", expected \"allreduce\" (parameter \
             servers train the image models)",
        );
    }
    let processes = u64::from(parallel.world_size()) + u64::from(parallel.server_count());
    if processes > u64::from(MAX_RANKS) {
        problems.push(
            "parallel.ps_shards",
            format!(
                "{} servers and {} ranks make {processes} processes, expected at most {MAX_RANKS}",
                parallel.server_count(),
                parallel.world_size()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::problems::problem_strings;

    fn transformer_job(parallel: &str) -> String {
        format!(
            "version = 1\nkind = \"train\"\n[model]\nkind = \"transformer\"\nlayers = 4\n\
             heads = 4\nwidth = 64\n[data]\ndataset = \"shakespeare\"\n[schedule]\n\
             batch_size = 16\n[parallel]\n{parallel}\n"
        )
    }

    #[test]
    fn a_hybrid_mesh_counts_data_times_pipeline_times_tensor_ranks() {
        let spec = parse(&transformer_job(
            "data = 2\npipeline = 2\ntensor = 2\nmicro_batches = 4\npipeline_schedule = \"gpipe\"",
        ))
        .unwrap();
        assert_eq!(spec.ranks(), 8);
        let parallel = spec.parallel.unwrap();
        assert_eq!(parallel.micro_batches(), 4);
        assert_eq!(parallel.pipeline_schedule.name(), "gpipe");
    }

    #[test]
    fn invalid_meshes_name_their_field() {
        let cases = [
            ("pipeline = 5", "parallel.pipeline"),
            ("tensor = 3", "parallel.tensor"),
            (
                "pipeline = 2\nstage_layers = [1, 2]",
                "parallel.stage_layers",
            ),
            (
                "pipeline = 2\nstage_layers = [4, 0]",
                "parallel.stage_layers",
            ),
            ("data = 3", "schedule.batch_size"),
            ("pipeline = 2\nmicro_batches = 3", "schedule.batch_size"),
            ("tensor = 0", "parallel.tensor"),
        ];
        for (parallel, field) in cases {
            let problems = problem_strings(&transformer_job(parallel));
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{parallel}: {problems:?}"
            );
        }
        // resources.ranks must agree with the mesh.
        let text = transformer_job("data = 2\npipeline = 2")
            .replace("[parallel]", "[resources]\nranks = 2\n[parallel]");
        let problems = problem_strings(&text);
        assert!(
            problems.iter().any(|p| p.starts_with("resources.ranks")),
            "{problems:?}"
        );
    }

    #[test]
    fn the_gradient_transport_is_nccl_only_for_replicated_image_models_on_gpus() {
        let job = |resources: &str, parallel: &str| {
            format!(
                "version = 1\nkind = \"train\"\n[resources]\n{resources}\n[parallel]\n{parallel}\n"
            )
        };
        let transport = |text: &str| gradient_transport(&parse(text).unwrap());
        let gpu = "device = \"gpu\"";
        assert_eq!(transport(&job(gpu, "data = 2")), CollectiveBackend::Nccl);
        assert_eq!(transport(&job(gpu, "data = 1")), CollectiveBackend::Tcp);
        assert_eq!(transport(&job("", "data = 2")), CollectiveBackend::Tcp);
        assert_eq!(
            transport(&job(gpu, "data = 2\ncollective = \"tcp\"")),
            CollectiveBackend::Tcp
        );
        assert_eq!(
            transport(&job(gpu, "data = 1\ncollective = \"nccl\"")),
            CollectiveBackend::Nccl
        );
        let gpu_transformer = transformer_job("data = 2")
            .replace("[parallel]", "[resources]\ndevice = \"gpu\"\n[parallel]");
        assert_eq!(transport(&gpu_transformer), CollectiveBackend::Tcp);

        for (text, expected) in [
            (
                job("", "data = 2\ncollective = \"nccl\""),
                "resources.device = \"cpu\"",
            ),
            (
                job(gpu, "data = 2\ncomm = \"ps\"\ncollective = \"nccl\""),
                "parallel.comm = \"ps\"",
            ),
            (
                gpu_transformer.replace("data = 2", "data = 2\ncollective = \"nccl\""),
                "model.kind = \"transformer\"",
            ),
        ] {
            let problems = problem_strings(&text);
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with("parallel.collective") && p.contains(expected)),
                "{text}: {problems:?}"
            );
        }
        assert!(parse(&job(gpu, "data = 2\ncollective = \"nccl\"")).is_ok());
    }

    #[test]
    fn a_host_transport_is_refused_where_no_host_collective_carries_the_gradients() {
        let job = |resources: &str, parallel: &str| {
            format!(
                "version = 1\nkind = \"train\"\n[resources]\n{resources}\n[parallel]\n{parallel}\n"
            )
        };
        let gpu = "device = \"gpu\"";
        for text in [
            job("", "data = 2\ntransport = \"shm\""),
            job("", "data = 2\ntransport = \"tcp\""),
            job(gpu, "data = 2\ncollective = \"tcp\"\ntransport = \"shm\""),
            transformer_job("data = 2\ntransport = \"shm\""),
        ] {
            assert!(parse(&text).is_ok(), "{text}: {:?}", problem_strings(&text));
        }
        for (text, expected) in [
            (
                job("", "data = 2\ncomm = \"ps\"\ntransport = \"shm\""),
                "parallel.transport: \"shm\" with parallel.comm = \"ps\"",
            ),
            (
                job(gpu, "data = 2\ntransport = \"tcp\""),
                "parallel.transport: \"tcp\" with NCCL carrying the gradients",
            ),
        ] {
            let problems = problem_strings(&text);
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{text}: {problems:?}"
            );
        }
        let problems = problem_strings(&job("", "data = 2\ntransport = \"udp\""));
        assert!(
            problems.iter().any(|p| p.contains("transport")),
            "{problems:?}"
        );
    }

    #[test]
    fn model_parallelism_needs_the_transformer_and_the_transformer_its_text() {
        let problems = problem_strings("version = 1\nkind = \"train\"\n[parallel]\npipeline = 2\n");
        assert!(
            problems.iter().any(|p| p.starts_with("parallel.pipeline")),
            "{problems:?}"
        );
        let problems =
            problem_strings("version = 1\nkind = \"train\"\n[model]\nkind = \"transformer\"\n");
        assert!(
            problems.iter().any(|p| p.starts_with("data.dataset")),
            "{problems:?}"
        );
        let problems = problem_strings("version = 1\nkind = \"train\"\n[model]\nlayers = 2\n");
        assert!(
            problems.iter().any(|p| p.starts_with("model.layers")),
            "{problems:?}"
        );
        let problems =
            problem_strings(&transformer_job("data = 1").replace("width = 64", "width = 66"));
        assert!(
            problems.iter().any(|p| p.starts_with("model.heads")),
            "{problems:?}"
        );
    }

    #[test]
    fn stages_balance_blocks_and_the_extras_at_the_ends() {
        // Equal blocks, no extras: as even as possible.
        assert_eq!(balanced_stage_layers(8, 4, 10, 0, 0), vec![2, 2, 2, 2]);
        assert_eq!(balanced_stage_layers(5, 2, 10, 0, 0), vec![3, 2]);
        // A heavy head pushes blocks to the front.
        assert_eq!(balanced_stage_layers(4, 2, 10, 0, 20), vec![3, 1]);
        // A heavy embedding pushes them to the back.
        assert_eq!(balanced_stage_layers(4, 2, 10, 20, 0), vec![1, 3]);
        assert_eq!(balanced_stage_layers(3, 3, 10, 100, 100), vec![1, 1, 1]);
        assert!(balanced_stage_layers(2, 3, 10, 0, 0).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn balanced_stages_cover_every_block_and_no_split_is_lighter(
            layers in 1u32..24,
            stages in 1u32..8,
            block in 1u64..100,
            first in 0u64..300,
            last in 0u64..300,
        ) {
            let split = balanced_stage_layers(layers, stages, block, first, last);
            if stages > layers {
                proptest::prop_assert!(split.is_empty());
                return Ok(());
            }
            proptest::prop_assert_eq!(split.len(), stages as usize);
            proptest::prop_assert_eq!(split.iter().sum::<u32>(), layers);
            proptest::prop_assert!(split.iter().all(|&n| n >= 1));
            let heaviest = |split: &[u32]| -> u64 {
                split.iter().enumerate().map(|(stage, &n)| {
                    u64::from(n) * block
                        + if stage == 0 { first } else { 0 }
                        + if stage + 1 == split.len() { last } else { 0 }
                }).max().unwrap()
            };
            // Brute force over every split of up to 3 stages.
            if stages <= 3 && layers <= 12 {
                let mut best = u64::MAX;
                let mut stack = vec![(Vec::<u32>::new(), layers)];
                while let Some((prefix, remaining)) = stack.pop() {
                    if prefix.len() + 1 == stages as usize {
                        if remaining >= 1 {
                            let mut full = prefix.clone();
                            full.push(remaining);
                            best = best.min(heaviest(&full));
                        }
                        continue;
                    }
                    for n in 1..remaining {
                        let mut next = prefix.clone();
                        next.push(n);
                        stack.push((next, remaining - n));
                    }
                }
                proptest::prop_assert_eq!(heaviest(&split), best);
            }
        }
    }
}
