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

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    focusdpo::alloc::tune_for_tensors();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
