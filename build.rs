//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/banditflow/v1/events.proto",
        "proto/banditflow/v1/snapshot.proto",
        "proto/banditflow/v1/checkpoint.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
