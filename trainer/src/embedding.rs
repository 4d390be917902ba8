//! The first stage of the embedding model: every non-background pixel of an image is a token
//! (its position and its intensity level), and the image is the mean of its tokens' rows of an
//! embedding table.
//!
//! A batch touches only a few of the table's rows. The forward pass gathers those rows, sorted
//! and unique (as [`Model::touched_rows`](crate::models::Model::touched_rows) lists them), and
//! averages them with one matrix product by a `[batch, touched rows]` bag matrix, so the
//! table's gradient (from candle's autograd) is zero outside them: the rows the parameter
//! server path sends are exactly these.

use candle_core::{Device, Tensor};

use crate::data::{PIXEL_MEAN, PIXEL_STD};

/// Where an embedding model's table sits among its parameters, and its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingTable {
    /// Index of the table in the model's [`ParameterSet`](crate::parameters::ParameterSet)
    /// (its position in `model.parameters().iter()`).
    pub parameter_index: usize,
    /// Rows of the table: `pixels x (intensity levels - 1)`.
    pub rows: usize,
    /// Width of a row.
    pub width: usize,
}

/// Returns the 8-bit grey value (0 to 255) a normalised pixel was made from, inverting
/// [`Dataset::gather`](crate::data::Dataset::gather)'s normalisation and rounding away its float
/// error; values outside the range (and NaN) are clamped.
fn grey_value(normalised: f32) -> u32 {
    let grey = ((normalised * PIXEL_STD + PIXEL_MEAN) * 255.0).round();
    // `as` saturates and maps NaN to 0.
    (grey as u32).min(255)
}

/// Returns the intensity level (`0` to `levels - 1`) of a normalised pixel: its intensity on the
/// 0 to 1 scale times `levels`, rounded down, the top level also taking intensity 1.
fn intensity_level(normalised: f32, levels: u32) -> u32 {
    // floor(grey / 255 * levels) in exact integer arithmetic.
    let level = u64::from(grey_value(normalised)) * u64::from(levels) / 255;
    level.min(u64::from(levels.saturating_sub(1))) as u32
}

/// Appends the tokens of one image (see [`pixel_tokens`]) to `tokens`.
fn append_pixel_tokens(normalised: &[f32], levels: u32, tokens: &mut Vec<u64>) {
    let levels_per_pixel = u64::from(levels.saturating_sub(1));
    for (pixel, &value) in normalised.iter().enumerate() {
        let level = intensity_level(value, levels);
        if level > 0 {
            tokens.push(pixel as u64 * levels_per_pixel + u64::from(level - 1));
        }
    }
}

/// Fills `tokens` (cleared first) with the tokens of one image given as normalised pixels
/// (`(grey / 255 - PIXEL_MEAN) / PIXEL_STD`, as the data sets produce them), in ascending order.
///
/// A pixel of intensity level `l = min(floor(grey / 255 * levels), levels - 1)` becomes token
/// `pixel * (levels - 1) + (l - 1)`, the row of the embedding table it selects; level 0 is
/// background and gives no token. `levels` is at least 2 for any token to exist.
pub fn pixel_tokens(normalised: &[f32], levels: u32, tokens: &mut Vec<u64>) {
    tokens.clear();
    append_pixel_tokens(normalised, levels, tokens);
}

/// The tokens of a batch of images.
#[derive(Debug, Default)]
struct BatchTokens {
    /// Every image's tokens, image after image, each image's ascending.
    tokens: Vec<u64>,
    /// Where each image's tokens end in `tokens`.
    ends: Vec<usize>,
    /// The rows the batch touches, sorted and unique.
    rows: Vec<u64>,
}

/// The embedding model's first stage: the mean of each image's tokens' rows of the table.
#[derive(Debug, Clone)]
pub(crate) struct EmbeddingBag {
    /// The `[rows, width]` table.
    table: Tensor,
    /// Pixels per image.
    pixels: usize,
    /// Intensity levels a pixel is quantised into.
    levels: u32,
}

impl EmbeddingBag {
    /// Wraps a `[pixels x (levels - 1), width]` table.
    pub(crate) fn new(table: Tensor, pixels: usize, levels: u32) -> Self {
        Self {
            table,
            pixels,
            levels,
        }
    }

    /// Returns the number of rows of the table.
    fn rows(&self) -> usize {
        self.pixels * self.levels.saturating_sub(1) as usize
    }

    /// Tokenises the first `batch` images of `images` (fewer when the slice holds fewer whole
    /// images).
    fn tokenise(&self, images: &[f32], batch: usize, into: &mut BatchTokens) {
        into.tokens.clear();
        into.ends.clear();
        into.rows.clear();
        if self.pixels == 0 {
            return;
        }
        for image in images.chunks_exact(self.pixels).take(batch) {
            append_pixel_tokens(image, self.levels, &mut into.tokens);
            into.ends.push(into.tokens.len());
        }
        // A mark per row rather than a sort: linear in the table's rows, which are fewer than a
        // batch's tokens for the usual batch sizes.
        let mut touched = vec![false; self.rows()];
        for &token in &into.tokens {
            touched[token as usize] = true;
        }
        into.rows.extend(
            touched
                .iter()
                .enumerate()
                .filter(|(_, touched)| **touched)
                .map(|(row, _)| row as u64),
        );
    }

    /// Fills `rows` (cleared first) with the sorted, unique rows of the table the first `batch`
    /// images of `images` (normalised, `pixels` values each) touch.
    pub(crate) fn touched_rows(&self, images: &[f32], batch: usize, rows: &mut Vec<u64>) {
        let mut tokens = BatchTokens {
            rows: std::mem::take(rows),
            ..BatchTokens::default()
        };
        self.tokenise(images, batch, &mut tokens);
        *rows = tokens.rows;
    }

    /// Maps `[batch, pixels]` normalised images to their `[batch, width]` mean token rows (zeros
    /// for an image without tokens), reading only the rows of [`Self::touched_rows`].
    pub(crate) fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, pixels) = images.dims2()?;
        if pixels != self.pixels {
            candle_core::bail!(
                "embedding bag: images of {pixels} pixels, expected {}",
                self.pixels
            );
        }
        let width = self.table.dim(1)?;
        let host = images.flatten_all()?.to_vec1::<f32>()?;
        let mut tokens = BatchTokens::default();
        self.tokenise(&host, batch, &mut tokens);
        let touched = tokens.rows.len();
        if touched == 0 {
            return Tensor::zeros((batch, width), self.table.dtype(), self.table.device());
        }
        let mut bag = vec![0f32; batch * touched];
        let mut start = 0;
        for (image, &end) in tokens.ends.iter().enumerate() {
            let image_tokens = &tokens.tokens[start..end];
            let weight = 1.0 / image_tokens.len() as f32;
            let bag_row = &mut bag[image * touched..(image + 1) * touched];
            // Both lists ascend: one merge walk finds every token's column.
            let mut column = 0;
            for &token in image_tokens {
                while tokens.rows[column] != token {
                    column += 1;
                }
                bag_row[column] = weight;
            }
            start = end;
        }
        let device = self.table.device();
        let bag = Tensor::from_vec(bag, (batch, touched), device)?.to_dtype(self.table.dtype())?;
        let indices = row_indices(&tokens.rows, device)?;
        bag.matmul(&self.table.index_select(&indices, 0)?)
    }
}

/// Returns `rows` as an index tensor for [`Tensor::index_select`].
fn row_indices(rows: &[u64], device: &Device) -> candle_core::Result<Tensor> {
    let indices: Vec<i64> = rows.iter().map(|&row| row as i64).collect();
    Tensor::from_vec(indices, rows.len(), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    /// Normalises grey values as the data sets do.
    fn normalised(greys: &[u8]) -> Vec<f32> {
        let labels = vec![0; 1];
        let dataset = Dataset::new(greys.to_vec(), labels, 1, greys.len(), 1).unwrap();
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        dataset.gather(&[0], &mut images, &mut labels).unwrap();
        images
    }

    fn tokens_of(greys: &[u8], levels: u32) -> Vec<u64> {
        let mut tokens = vec![99];
        pixel_tokens(&normalised(greys), levels, &mut tokens);
        tokens
    }

    #[test]
    fn background_is_skipped_and_the_top_level_clamped() {
        // With 8 levels a level spans 255 / 8 = 31.875 grey values: 31 is background, 32 is
        // level 1, 63 level 1, 64 level 2, 128 level 4, 223 level 6, 224 level 7 and 255 would
        // be level 8 without the clamp.
        let greys = [0, 31, 32, 63, 64, 128, 223, 224, 255];
        let expected = [
            2 * 7,     // 32: level 1
            3 * 7,     // 63: level 1
            4 * 7 + 1, // 64: level 2
            5 * 7 + 3, // 128: level 4
            6 * 7 + 5, // 223: level 6
            7 * 7 + 6, // 224: level 7
            8 * 7 + 6, // 255: level 7, clamped
        ];
        assert_eq!(tokens_of(&greys, 8), expected);
    }

    #[test]
    fn two_levels_split_at_half_intensity() {
        assert_eq!(tokens_of(&[127, 128, 0, 255], 2), [1, 3]);
    }

    #[test]
    fn an_image_without_ink_has_no_token() {
        assert!(tokens_of(&[0; 10], 8).is_empty());
        let mut tokens = vec![1];
        pixel_tokens(&[], 8, &mut tokens);
        assert!(tokens.is_empty());
    }

    #[test]
    fn every_grey_value_gets_the_level_of_exact_arithmetic() {
        let greys: Vec<u8> = (0..=255).collect();
        let images = normalised(&greys);
        for levels in 2..=256u32 {
            let mut tokens = Vec::new();
            pixel_tokens(&images, levels, &mut tokens);
            let expected: Vec<u64> = greys
                .iter()
                .enumerate()
                .filter_map(|(pixel, &grey)| {
                    // Multiplying first keeps it exact: a non-integer quotient is at least 1/255
                    // from an integer, far beyond the rounding of one division.
                    let exact = f64::from(u32::from(grey) * levels) / 255.0;
                    let level = (exact.floor() as u32).min(levels - 1);
                    (level > 0).then(|| pixel as u64 * u64::from(levels - 1) + u64::from(level - 1))
                })
                .collect();
            assert_eq!(tokens, expected, "{levels} levels");
        }
    }

    #[test]
    fn float_error_in_the_normalised_values_changes_no_level() {
        let greys: Vec<u8> = (0..=255).collect();
        let images = normalised(&greys);
        // The other formula of the normalisation, and values nudged by far more than rounding.
        let direct: Vec<f32> = greys
            .iter()
            .map(|&grey| (f32::from(grey) / 255.0 - PIXEL_MEAN) / PIXEL_STD)
            .collect();
        let up: Vec<f32> = images.iter().map(|v| v + 1e-3).collect();
        let down: Vec<f32> = images.iter().map(|v| v - 1e-3).collect();
        let mut expected = Vec::new();
        pixel_tokens(&images, 8, &mut expected);
        for variant in [direct, up, down] {
            let mut tokens = Vec::new();
            pixel_tokens(&variant, 8, &mut tokens);
            assert_eq!(tokens, expected);
        }
    }

    #[test]
    fn values_outside_the_range_are_clamped() {
        let images = [f32::NAN, -100.0, 100.0, f32::INFINITY, f32::NEG_INFINITY];
        let mut tokens = Vec::new();
        pixel_tokens(&images, 4, &mut tokens);
        assert_eq!(tokens, [2 * 3 + 2, 3 * 3 + 2]);
    }

    #[test]
    fn touched_rows_are_the_sorted_union_of_the_images_tokens() {
        let table = Tensor::zeros((4 * 3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let bag = EmbeddingBag::new(table, 4, 4);
        let mut images = normalised(&[0, 255, 64, 0]);
        images.extend(normalised(&[200, 255, 0, 0]));
        images.extend(normalised(&[0, 0, 0, 0]));
        let mut rows = vec![7];
        bag.touched_rows(&images, 3, &mut rows);
        // Image 0: pixel 1 level 3, pixel 2 level 1; image 1: pixel 0 level 3, pixel 1 level 3.
        assert_eq!(rows, [2, 5, 6]);
        // Only the first image.
        bag.touched_rows(&images, 1, &mut rows);
        assert_eq!(rows, [5, 6]);
    }
}
