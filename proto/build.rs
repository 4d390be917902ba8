//! Generates the tonic/prost code for `proto/cohort.proto` and `proto/parameter_server.proto`.
//! Needs `protoc` (Debian package `protobuf-compiler`, installed by `scripts/setup.sh`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cohort.proto");
    println!("cargo:rerun-if-changed=proto/parameter_server.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::Codec")
        // Tensor chunks of the parameter server decode without a copy.
        .bytes(".cohort.ps.v1")
        .compile_protos(
            &["proto/cohort.proto", "proto/parameter_server.proto"],
            &["proto"],
        )?;
    Ok(())
}
