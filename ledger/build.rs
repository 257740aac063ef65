//! Compiles `proto/ledger.proto` with a vendored protoc, like the workspace root's
//! build script, so a fresh machine needs no protobuf-compiler package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Hand protoc to prost-build directly rather than through the PROTOC variable:
    // setting environment variables is `unsafe` in edition 2024.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["../proto/ledger.proto"],
        &["../proto"],
    )?;
    println!("cargo:rerun-if-changed=../proto/ledger.proto");
    Ok(())
}
