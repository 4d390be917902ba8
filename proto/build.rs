//! Generates the tonic/prost code for `proto/cohort.proto`. Needs `protoc` (Debian package
//! `protobuf-compiler`, installed by `scripts/setup.sh`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cohort.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/cohort.proto"], &["proto"])?;
    Ok(())
}
