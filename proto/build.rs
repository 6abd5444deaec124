//! Compiles the local control API with the protoc that `protoc-bin-vendored` ships, so the
//! build needs no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_with_config(
            config,
            &["proto/detour/control/v1/control.proto"],
            &["proto"],
        )?;
    Ok(())
}
