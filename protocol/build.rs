//! Compiles `proto/chat.proto` with protox (a pure-Rust protobuf compiler),
//! so building needs cargo alone and no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/chat.proto");
    let descriptors = protox::compile(["proto/chat.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
