//! Compiles `proto/yibao/v1/*.proto` into Rust with tonic, and writes the file descriptor set that
//! server reflection serves. `PROTOC` from the environment wins; otherwise the protoc that ships
//! inside the `protoc-bin-vendored` crate is used, so a fresh machine needs no system package.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // Build scripts run single-threaded, so changing the environment here races with nothing.
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        std::env::set_var("PROTOC", protoc);
    }
    let protos = [
        "proto/yibao/v1/common.proto",
        "proto/yibao/v1/settlement.proto",
        "proto/yibao/v1/account.proto",
        "proto/yibao/v1/admin.proto",
        "proto/yibao/v1/reconciliation.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("yibao_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
