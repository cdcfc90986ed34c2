//! Generates the gRPC code from `proto/` with a vendored `protoc` unless `PROTOC` is set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // Edition 2024 makes `set_var` unsafe, so the path goes through the builder.
        return build(Some(protoc_bin_vendored::protoc_bin_path()?));
    }
    build(None)
}

fn build(protoc: Option<std::path::PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "control.proto",
        "config.proto",
        "events.proto",
        "users.proto",
        "access.proto",
        "queue.proto",
        "filter.proto",
        "quarantine.proto",
        "policy.proto",
        "cluster.proto",
        "greylist.proto",
        "recipients.proto",
        "backup.proto",
        "web.proto",
        "dkim.proto",
        "digest.proto",
        "stats.proto",
    ]
    .map(|f| root.join("mailborder/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut config = tonic_prost_build::Config::new();
    if let Some(protoc) = protoc {
        config.protoc_executable(protoc);
    }
    tonic_prost_build::configure().compile_with_config(config, &files, &[root])?;
    Ok(())
}
