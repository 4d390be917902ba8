//! Evaluation of the image models on the test split: each rank a contiguous share, summed over
//! the ranks ([`evaluate`]), or one rank alone (the parameter-server loop's rank 0).

use candle_core::DType;
use candle_nn::Module;
use cohort_collective::{Communicator, ReduceOp};

use crate::data::{BatchBuffers, Dataset};
use crate::error::Result;
use crate::metrics::EvaluationMetrics;
use crate::models::Model;
use crate::sampler::rank_share;

/// Evaluates `model` on `dataset`, each rank taking a contiguous share, and sums the results
/// over all ranks.
pub fn evaluate(
    model: &Model,
    dataset: &Dataset,
    communicator: &mut dyn Communicator,
    batch_size: usize,
    step: u64,
    epoch: u64,
) -> Result<EvaluationMetrics> {
    let mut batch = BatchBuffers::default();
    evaluate_split(
        model,
        dataset,
        communicator,
        batch_size,
        &mut batch,
        (step, epoch),
    )
}

pub(crate) fn evaluate_split(
    model: &Model,
    dataset: &Dataset,
    communicator: &mut dyn Communicator,
    batch_size: usize,
    batch: &mut BatchBuffers,
    (step, epoch): (u64, u64),
) -> Result<EvaluationMetrics> {
    let share = rank_share(
        dataset.len(),
        communicator.world_size(),
        communicator.rank(),
    );
    let mut summed = evaluation_totals(model, dataset, share, batch_size, batch)?;
    if communicator.world_size() > 1 {
        communicator.all_reduce(summed.as_mut_slice().into(), ReduceOp::Sum)?;
    }
    Ok(evaluation_metrics(summed, step, epoch))
}

/// Evaluates `model` on all of `dataset` on this rank alone.
pub(crate) fn evaluate_locally(
    model: &Model,
    dataset: &Dataset,
    batch_size: usize,
    batch: &mut BatchBuffers,
    (step, epoch): (u64, u64),
) -> Result<EvaluationMetrics> {
    let totals = evaluation_totals(model, dataset, 0..dataset.len(), batch_size, batch)?;
    Ok(evaluation_metrics(totals, step, epoch))
}

/// Loss sum, correct predictions and examples of `model` on the examples `share` of `dataset`.
fn evaluation_totals(
    model: &Model,
    dataset: &Dataset,
    share: std::ops::Range<usize>,
    batch_size: usize,
    batch: &mut BatchBuffers,
) -> Result<[f32; 3]> {
    let mut totals = [0.0f64; 3];
    let mut start = share.start;
    while start < share.end {
        let end = (start + batch_size.max(1)).min(share.end);
        let mut indices = std::mem::take(&mut batch.indices);
        indices.clear();
        indices.extend(start..end);
        let (images, labels) = batch.tensors(dataset, &indices, model.parameters().device())?;
        batch.indices = indices;
        // A working copy in bf16 or f16 returns logits in its format.
        let logits = model.forward(&images)?.to_dtype(DType::F32)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        let predictions = logits.argmax(1)?.to_vec1::<u32>()?;
        let correct = predictions
            .iter()
            .zip(&batch.labels)
            .filter(|(prediction, label)| prediction == label)
            .count();
        totals[0] += f64::from(loss) * (end - start) as f64;
        totals[1] += correct as f64;
        totals[2] += (end - start) as f64;
        start = end;
    }
    Ok(totals.map(|value| value as f32))
}

fn evaluation_metrics(summed: [f32; 3], step: u64, epoch: u64) -> EvaluationMetrics {
    let examples = summed[2].max(1.0);
    EvaluationMetrics {
        step,
        epoch,
        loss: summed[0] / examples,
        accuracy: summed[1] / examples,
        examples: summed[2] as usize,
    }
}
