//! Compiles proto/*.proto with a vendored protoc, so a fresh machine needs no
//! protobuf-compiler package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Hand protoc to prost-build directly rather than through the PROTOC variable:
    // setting environment variables is `unsafe` in edition 2024.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("admin_descriptor.bin"))
        .compile_with_config(
            config,
            &["../proto/admin.proto", "../proto/stillpoint_admin.proto"],
            &["../proto"],
        )?;
    println!("cargo:rerun-if-changed=../proto");
    Ok(())
}
