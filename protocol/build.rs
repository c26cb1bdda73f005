//! Compiles `proto/chat.proto` with protox (a pure-Rust protobuf compiler),
//! so building needs cargo alone and no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/chat.proto");
    let descriptors = protox::compile(["proto/chat.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        // Boxed: most messages carry no photo, and a message is held in
        // caches, queues and long-lived tasks; inline, the field would
        // double the size of every one.
        .boxed(".chat.v1.Message.photo")
        // Boxed, as the photo is: only a CALL message has one.
        .boxed(".chat.v1.Message.call")
        // Boxed: a conversation is the largest body, and every `Frame` is
        // the size of the largest; a frame is held in every stream task of
        // every connection (idle memory, ARCHITECTURE.md).
        .boxed(".chat.v1.ConversationInfo.last_message")
        // Boxed for the same reason: inline, a message made Deliver the
        // largest body (a frame of 128 bytes once replies named a seq).
        // One allocation per message pushed, where its text is one too.
        .boxed(".chat.v1.Deliver.message")
        // Boxed for the same reason: with its preview's handle, a photo
        // inline made MediaHeader the largest body (a frame of 128 bytes).
        .boxed(".chat.v1.MediaHeader.photo")
        // Boxed for the same reason: the announcement of the unsend window
        // made AuthOk the largest body (a frame of 120 bytes). Once per
        // connection.
        .boxed(".chat.v1.Frame.body.auth_ok")
        .compile_fds(descriptors)?;
    Ok(())
}
