//! The `chat-server` entry point, built inside the test package so that
//! end-to-end tests can run it as a real child process (and kill it with
//! SIGKILL) through `CARGO_BIN_EXE_chat-e2e-server`.

fn main() -> std::process::ExitCode {
    chat_server::cli::main()
}
