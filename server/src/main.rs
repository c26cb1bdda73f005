//! The `chat-server` binary; everything lives in the library's `cli`.

fn main() -> std::process::ExitCode {
    chat_server::cli::main()
}
