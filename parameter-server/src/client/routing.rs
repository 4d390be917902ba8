//! Routing a rank's rows and dense slices to the shards that hold them, and putting the
//! shards' replies back in the caller's order.

use cohort_proto::ps_v1;

use super::connection::{ShardConnection, ShardReply};
use super::{RowSelection, SparseGradient};
use crate::error::{Error, Result};
use crate::sharding::ShardPlan;

/// Sparse gradients of one table routed to one shard.
#[derive(Debug, Clone)]
pub(crate) struct RoutedRows {
    /// The table.
    pub(crate) tensor_index: usize,
    /// Its rows held by the shard, in the caller's order.
    pub(crate) rows: Vec<u64>,
    /// Their gradients, row by row.
    pub(crate) values: Vec<f32>,
}

/// Part of a row selection routed to one shard.
#[derive(Debug, Clone)]
pub(crate) struct RoutedSelection {
    /// Index of the selection in the caller's list.
    selection: usize,
    /// The table.
    tensor_index: u32,
    /// Positions of the routed rows in the selection.
    positions: Vec<usize>,
    /// The routed rows.
    rows: Vec<u64>,
}

/// Returns the row width of sparse table `tensor_index`, or an error naming `what`.
fn table_width(plan: &ShardPlan, tensor_index: usize, what: &str) -> Result<u64> {
    match plan.tensors().get(tensor_index) {
        Some(tensor) if tensor.sparse => Ok(tensor.row_elements),
        _ => Err(Error::invalid(format!(
            "{what}.tensor_index = {tensor_index}, expected the index of a sparse embedding table"
        ))),
    }
}

/// Returns the shard holding a row, or an error naming `what`.
fn row_owner(plan: &ShardPlan, tensor_index: usize, row: u64, what: &str) -> Result<usize> {
    plan.row_owner(tensor_index, row)
        .map(|shard| shard as usize)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what}: row {row} of table {tensor_index}, which has {} rows",
                plan.tensors()[tensor_index].row_count()
            ))
        })
}

/// Checks sparse gradients and groups them by shard and table.
pub(crate) fn route_gradients(
    plan: &ShardPlan,
    sparse: &[SparseGradient<'_>],
) -> Result<Vec<Vec<RoutedRows>>> {
    let mut routes: Vec<Vec<RoutedRows>> = vec![Vec::new(); plan.shards().len()];
    for (index, gradient) in sparse.iter().enumerate() {
        let what = format!("sparse[{index}]");
        let width = table_width(plan, gradient.tensor_index, &what)?;
        check_length(
            &format!("{what}.values"),
            gradient.values.len(),
            gradient.rows.len() as u64 * width,
        )?;
        let width = width as usize;
        for (position, &row) in gradient.rows.iter().enumerate() {
            let shard = row_owner(plan, gradient.tensor_index, row, &what)?;
            let entry = match routes[shard]
                .iter()
                .position(|routed| routed.tensor_index == gradient.tensor_index)
            {
                Some(entry) => entry,
                None => {
                    routes[shard].push(RoutedRows {
                        tensor_index: gradient.tensor_index,
                        rows: Vec::new(),
                        values: Vec::new(),
                    });
                    routes[shard].len() - 1
                }
            };
            let routed = &mut routes[shard][entry];
            routed.rows.push(row);
            routed
                .values
                .extend_from_slice(&gradient.values[position * width..(position + 1) * width]);
        }
    }
    Ok(routes)
}

/// Checks row selections and groups them by shard, remembering where each row goes back.
pub(crate) fn route_selections(
    plan: &ShardPlan,
    selections: &[RowSelection<'_>],
) -> Result<Vec<Vec<RoutedSelection>>> {
    let mut routes: Vec<Vec<RoutedSelection>> = vec![Vec::new(); plan.shards().len()];
    for (index, selection) in selections.iter().enumerate() {
        let what = format!("selections[{index}]");
        table_width(plan, selection.tensor_index, &what)?;
        for (position, &row) in selection.rows.iter().enumerate() {
            let shard = row_owner(plan, selection.tensor_index, row, &what)?;
            match routes[shard].last_mut() {
                Some(routed) if routed.selection == index => {
                    routed.positions.push(position);
                    routed.rows.push(row);
                }
                _ => routes[shard].push(RoutedSelection {
                    selection: index,
                    tensor_index: selection.tensor_index as u32,
                    positions: vec![position],
                    rows: vec![row],
                }),
            }
        }
    }
    Ok(routes)
}

/// Returns zeroed outputs for the selections' rows.
pub(crate) fn row_outputs(plan: &ShardPlan, selections: &[RowSelection<'_>]) -> Vec<Vec<f32>> {
    selections
        .iter()
        .map(|selection| {
            let width = plan.tensors()[selection.tensor_index].row_elements as usize;
            vec![0.0; selection.rows.len() * width]
        })
        .collect()
}

/// Returns the selections routed to one shard as the protocol's messages.
pub(crate) fn wire_selections(routes: &[RoutedSelection]) -> Vec<ps_v1::RowSelection> {
    routes
        .iter()
        .map(|routed| ps_v1::RowSelection {
            tensor_index: routed.tensor_index,
            rows: routed.rows.clone(),
        })
        .collect()
}

/// Writes a shard's returned rows into the selections' outputs, checking they are the rows
/// asked for, in order.
pub(crate) fn scatter_rows(
    connection: &ShardConnection,
    routes: &[RoutedSelection],
    reply: &ShardReply,
    outputs: &mut [Vec<f32>],
) -> Result<()> {
    let mut received = reply.rows.iter().flat_map(|(table, rows, values)| {
        let width = values.len() / rows.len().max(1);
        rows.iter()
            .enumerate()
            .map(move |(index, row)| (*table, *row, &values[index * width..(index + 1) * width]))
    });
    for routed in routes {
        for (&position, &row) in routed.positions.iter().zip(&routed.rows) {
            match received.next() {
                Some((table, received_row, values))
                    if table == routed.tensor_index && received_row == row =>
                {
                    let output = &mut outputs[routed.selection];
                    let width = values.len();
                    if output.len() < (position + 1) * width {
                        return Err(connection.protocol(format!(
                            "row {row} of table {table} has {width} elements, more than its table's"
                        )));
                    }
                    output[position * width..(position + 1) * width].copy_from_slice(values);
                }
                other => {
                    return Err(connection.protocol(format!(
                        "expected row {row} of table {}, received {:?}",
                        routed.tensor_index,
                        other.map(|(table, row, _)| (table, row))
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Checks that a caller's buffer has the expected number of elements.
pub(crate) fn check_length(what: &str, found: usize, expected: u64) -> Result<()> {
    if found as u64 != expected {
        return Err(Error::invalid(format!(
            "{what} has {found} elements, expected {expected}"
        )));
    }
    Ok(())
}

/// Splits the dense vector into the shards' disjoint slices.
pub(crate) fn split_dense<'a>(plan: &ShardPlan, mut dense: &'a mut [f32]) -> Vec<&'a mut [f32]> {
    plan.shards()
        .iter()
        .map(|layout| {
            let (head, rest) =
                std::mem::take(&mut dense).split_at_mut(layout.dense_element_count() as usize);
            dense = rest;
            head
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharding::{TensorDeclaration, plan_shards};

    fn plan() -> ShardPlan {
        let tensors = vec![
            TensorDeclaration::dense("w", 10),
            TensorDeclaration::embedding_table("e", 20, 2),
        ];
        plan_shards(&tensors, 2).unwrap()
    }

    #[test]
    fn gradients_route_to_the_owning_shard_in_order() {
        let plan = plan();
        // 50 elements, ideal cut at 25 rounded to a row boundary: shard 0 holds w and rows
        // 0..8, shard 1 rows 8..20.
        assert_eq!(plan.shard(0).unwrap().flat_range, 0..26);
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let routes = route_gradients(
            &plan,
            &[SparseGradient {
                tensor_index: 1,
                rows: &[19, 0, 7, 6],
                values: &values,
            }],
        )
        .unwrap();
        assert_eq!(routes[0][0].rows, vec![0, 7, 6]);
        assert_eq!(routes[0][0].values, vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(routes[1][0].rows, vec![19]);
        assert_eq!(routes[1][0].values, vec![0.0, 1.0]);
        let error = route_gradients(
            &plan,
            &[SparseGradient {
                tensor_index: 0,
                rows: &[0],
                values: &[0.0],
            }],
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("sparse[0].tensor_index = 0"),
            "{error}"
        );
    }

    #[test]
    fn dense_slices_follow_the_shards() {
        let plan = plan();
        let mut dense: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let slices = split_dense(&plan, &mut dense);
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[0].len() + slices[1].len(), 10);
        assert!(check_length("dense", 9, 10).is_err());
    }
}
