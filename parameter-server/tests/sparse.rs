//! Row-sparse embedding tables: a push carries only the rows the batch touched (bytes on the
//! wire counted), updates only those rows, and rows route to the shards holding them.

mod common;

use cohort_parameter_server::{
    LearningRateDecay, OptimizerConfig, OptimizerKind, PsMode, RowSelection, ScheduleConfig,
    ServerConfig, SparseGradient, TensorDeclaration,
};
use common::TestShards;

const ROWS: u64 = 10_000;
const WIDTH: u64 = 32;
const DENSE: u64 = 100;

fn tensors() -> Vec<TensorDeclaration> {
    vec![
        TensorDeclaration::embedding_table("embedding", ROWS, WIDTH),
        TensorDeclaration::dense("classifier", DENSE),
    ]
}

fn sgd(ranks: u32) -> ServerConfig {
    ServerConfig {
        ranks,
        mode: PsMode::Sync,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Sgd,
            learning_rate: 0.5,
            momentum: 0.0,
            weight_decay: 0.0,
            ..OptimizerConfig::default()
        },
        schedule: ScheduleConfig {
            warmup_steps: 0,
            decay: LearningRateDecay::Constant,
        },
        ..ServerConfig::default()
    }
}

fn initial_values() -> Vec<f32> {
    (0..ROWS * WIDTH + DENSE)
        .map(|index| (index % 97) as f32 / 97.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_carries_and_changes_only_the_touched_rows() {
    let shards = TestShards::start(&sgd(1), 2).await;
    let tensors = tensors();
    let mut client = shards.client(0, &tensors).await;
    let initial = initial_values();
    client.init(&initial, 10).await.unwrap();
    let mut dense = vec![0.0f32; DENSE as usize];
    client.pull(&mut dense).await.unwrap();

    // A batch touching rows 5, 17 (twice) and 9001, which live on both shards.
    let rows = [5u64, 17, 9001, 17];
    let values: Vec<f32> = (0..rows.len() * WIDTH as usize)
        .map(|i| 1.0 + i as f32 / 64.0)
        .collect();
    let next_batch = [17u64, 4242];
    assert_ne!(
        client.plan().row_owner(0, 5),
        client.plan().row_owner(0, 9001),
        "the batch spans both shards"
    );
    let before = client.traffic();
    let report = client
        .push_pull(
            &vec![0.0; DENSE as usize],
            &[SparseGradient {
                tensor_index: 0,
                rows: &rows,
                values: &values,
            }],
            &mut dense,
            &[RowSelection {
                tensor_index: 0,
                rows: &next_batch,
            }],
        )
        .await
        .unwrap();
    let traffic = client.traffic().since(&before);
    println!(
        "sparse push of 4 rows: {} bytes sent, {} bytes received (table: {} bytes)",
        traffic.bytes_sent,
        traffic.bytes_received,
        ROWS * WIDTH * 4
    );

    // What must travel: 4 rows of 32 f32 out, 2 rows back, the dense part both ways. Allow
    // 1 KiB for headers, row indices and framing of both shards' messages.
    let row_bytes = WIDTH * 4;
    let dense_bytes = DENSE * 4;
    let table_bytes = ROWS * row_bytes;
    assert!(
        traffic.bytes_sent <= 4 * row_bytes + dense_bytes + 1024,
        "push sent {} bytes",
        traffic.bytes_sent
    );
    assert!(
        traffic.bytes_received <= 2 * row_bytes + dense_bytes + 1024,
        "reply carried {} bytes",
        traffic.bytes_received
    );
    assert!(
        traffic.bytes_sent * 100 < table_bytes,
        "far below the table's size"
    );

    let mut parameters = vec![0.0f32; initial.len()];
    client.pull_all(&mut parameters).await.unwrap();
    let width = WIDTH as usize;
    let mut expected = initial.clone();
    for (position, &row) in rows.iter().enumerate() {
        for column in 0..width {
            expected[row as usize * width + column] -= 0.5 * values[position * width + column];
        }
    }
    assert_eq!(
        parameters, expected,
        "only the touched rows moved, row 17 by both gradients"
    );
    // The rows pulled with the push are those after the update.
    let row_17 = &parameters[17 * width..18 * width];
    let row_4242 = &parameters[4242 * width..4243 * width];
    assert_eq!(report.rows, vec![[row_17, row_4242].concat()]);
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sparse_pushes_average_like_dense_gradients() {
    let shards = TestShards::start(&sgd(2), 3).await;
    let tensors = tensors();
    let mut first = shards.client(0, &tensors).await;
    let mut second = shards.client(1, &tensors).await;
    let initial = initial_values();
    first.init(&initial, 10).await.unwrap();
    let mut dense = vec![0.0f32; DENSE as usize];
    first.pull(&mut dense).await.unwrap();
    second.pull(&mut dense).await.unwrap();

    let width = WIDTH as usize;
    let first_values = vec![2.0f32; 2 * width];
    let second_values = vec![4.0f32; 2 * width];
    let task = tokio::spawn(async move {
        let mut dense = vec![0.0f32; DENSE as usize];
        first
            .push_pull(
                &vec![1.0; DENSE as usize],
                &[SparseGradient {
                    tensor_index: 0,
                    rows: &[3, 7000],
                    values: &first_values,
                }],
                &mut dense,
                &[],
            )
            .await
            .unwrap();
        first
    });
    second
        .push_pull(
            &vec![3.0; DENSE as usize],
            &[SparseGradient {
                tensor_index: 0,
                rows: &[7000, 9999],
                values: &second_values,
            }],
            &mut dense,
            &[],
        )
        .await
        .unwrap();
    let mut first = task.await.unwrap();

    // A rank that did not touch a row contributes a zero gradient to the average.
    let mut expected = initial.clone();
    for (row, gradient) in [(3usize, 1.0f32), (7000, 3.0), (9999, 2.0)] {
        for column in 0..width {
            expected[row * width + column] -= 0.5 * gradient;
        }
    }
    let dense_start = (ROWS * WIDTH) as usize;
    for value in &mut expected[dense_start..] {
        *value -= 0.5 * 2.0;
    }
    let mut parameters = vec![0.0f32; initial.len()];
    first.pull_all(&mut parameters).await.unwrap();
    assert_eq!(parameters, expected);
    assert_eq!(dense, expected[dense_start..]);

    let pulled = first
        .pull_rows(&[
            RowSelection {
                tensor_index: 0,
                rows: &[9999, 3, 5000],
            },
            RowSelection {
                tensor_index: 0,
                rows: &[0],
            },
        ])
        .await
        .unwrap();
    let row = |index: usize| expected[index * width..(index + 1) * width].to_vec();
    assert_eq!(
        pulled,
        vec![[row(9999), row(3), row(5000)].concat(), row(0)]
    );
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_refused_before_anything_is_sent() {
    let shards = TestShards::start(&sgd(1), 2).await;
    let tensors = tensors();
    let mut client = shards.client(0, &tensors).await;
    client.init(&initial_values(), 10).await.unwrap();
    let mut dense = vec![0.0f32; DENSE as usize];
    client.pull(&mut dense).await.unwrap();
    let before = client.traffic();
    let out_of_range = client
        .pull_rows(&[RowSelection {
            tensor_index: 0,
            rows: &[ROWS],
        }])
        .await
        .unwrap_err();
    assert!(
        out_of_range.to_string().contains("row 10000 of table 0"),
        "{out_of_range}"
    );
    let dense_table = client
        .pull_rows(&[RowSelection {
            tensor_index: 1,
            rows: &[0],
        }])
        .await
        .unwrap_err();
    assert!(
        dense_table.to_string().contains("sparse embedding table"),
        "{dense_table}"
    );
    let short = client
        .push_pull(
            &vec![0.0; DENSE as usize],
            &[SparseGradient {
                tensor_index: 0,
                rows: &[1, 2],
                values: &[0.0; 32],
            }],
            &mut dense,
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        short
            .to_string()
            .contains("sparse[0].values has 32 elements, expected 64"),
        "{short}"
    );
    assert_eq!(client.traffic(), before);
    shards.stop();
}
