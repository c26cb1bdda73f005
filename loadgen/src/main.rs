//! The `chat-loadgen` binary: parses flags, installs logging, builds the
//! runtime with the requested worker threads, and prints the report. All
//! the work is in the library, so tests run exactly the same code.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = chat_loadgen::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chat-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(chat_loadgen::run(args)) {
        Ok(report) => {
            print!("{}", report.table());
            // Acked but never delivered, shown twice, or shown to the wrong
            // user breaks the service's core promise: make it visible to
            // scripts.
            let broken = [
                (report.lost, "acked messages were never delivered"),
                (report.duplicates, "deliveries were duplicates"),
                (report.misrouted, "copies reached a user they were not for"),
            ];
            let mut code = ExitCode::SUCCESS;
            for (count, what) in broken {
                if count > 0 {
                    eprintln!("chat-loadgen: {count} {what}");
                    code = ExitCode::from(1);
                }
            }
            code
        }
        Err(e) => {
            eprintln!("chat-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}
