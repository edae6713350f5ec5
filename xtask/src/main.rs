//! Ember's task runner: `cargo xtask <command>`.
//!
//! - `probe`: build the probe guest (`target/probe/probe.elf`).
//! - `guest`: prepare the Linux guest (minimal kernel + busybox initramfs) in `.cache/guest`.
//! - `demo`: boot the Linux guest with the reference VMM.
//! - `test [--linux]`: build the probe and run the test suite (and the Linux tier).

mod guest;
mod probe;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: cargo xtask <probe|guest|demo|test> [args]");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "probe" => probe::run(rest),
        "guest" => guest::run(rest),
        other => Err(format!("unknown xtask command `{other}`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: error: {e}");
            ExitCode::FAILURE
        }
    }
}
