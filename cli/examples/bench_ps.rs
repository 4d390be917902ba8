//! Quick stand-alone run of the parameter-server benchmark, next to loopback TCP measured in the
//! same run (what `cohort bench ps` prints, without the CLI).
//!
//! `cargo run --release -p cohort-cli --example bench_ps -- SHARDS RANKS BYTES [ITERATIONS] [f32|bf16|f16] [CHUNK_BYTES]`

use cohort_parameter_server::DType;
use cohort_parameter_server::bench::{BenchConfig, run};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let number = |index: usize, default: u64| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(match arguments.get(index) {
            Some(text) => text.parse()?,
            None => default,
        })
    };
    let gradient_dtype = match arguments.get(4).map(String::as_str) {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::Bf16,
        Some("f16") => DType::F16,
        Some(other) => return Err(format!("dtype {other:?}, expected f32, bf16 or f16").into()),
    };
    let config = BenchConfig {
        shards: number(0, 2)? as u32,
        ranks: number(1, 2)? as u32,
        bytes: number(2, 64 << 20)?,
        iterations: number(3, 5)? as u32,
        gradient_dtype,
        max_chunk_bytes: number(5, 4 << 20)?,
        ..BenchConfig::default()
    };
    let loopback =
        cohort_collective::bench::loopback_tcp_throughput(config.bytes.max(1 << 20) * 4)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run(&config))?;
    println!(
        "{{\"bench\":\"ps\",\"shards\":{},\"ranks\":{},\"loopback_gbps\":{:.3},\"results\":[{{\"bytes\":{},\"per_rank_gbps\":{:.3},\"aggregate_gbps\":{:.3},\"ratio_to_loopback\":{:.3}}}]}}",
        config.shards,
        config.ranks,
        loopback / 1e9,
        result.bytes,
        result.per_rank_bytes_per_second / 1e9,
        result.aggregate_bytes_per_second / 1e9,
        result.aggregate_bytes_per_second / loopback,
    );
    Ok(())
}
