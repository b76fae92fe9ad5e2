use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build cache shared by clones in different places reuses the
    // compiled build script.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["entities", "handler", "peer", "admin"]
        .map(|name| root.join(format!("leasehold/v1/{name}.proto")));
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("leasehold_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .bytes(".")
        .compile_protos(&files, &[root])?;
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    Ok(())
}
