//! Compiles `proto/herald/v1/*.proto` with protox, a pure-Rust protobuf compiler, so building herald needs no
//! system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "herald/v1/publisher.proto",
        "herald/v1/raft.proto",
        "herald/v1/registry.proto",
        "herald/v1/peer.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        // A forwarded message's body is shared (`Bytes`) rather than copied once per peer on the way out, and
        // sliced out of the received buffer rather than copied on the way in.
        .bytes(".herald.v1.ForwardedPublish.data_json")
        .compile_fds(descriptors)?;
    Ok(())
}
