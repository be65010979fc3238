#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    claw_secrets::cli::main()
}
