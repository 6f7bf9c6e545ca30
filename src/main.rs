//! `focusdpo`: the FocusDPO Studio command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Restores the default SIGPIPE action, so `focusdpo … | head` ends quietly when the reader closes the pipe
/// instead of panicking in `println!` (Rust ignores SIGPIPE by default). The GUI writes nothing to stdout.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error and its causes on one line, like anyhow's `{:#}`, but without a cause whose text the message already
/// holds (our errors name their file and include the OS error, which is also their `source`).
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    focusdpo::alloc::tune_for_tensors();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}
