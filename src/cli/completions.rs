//! `claw-secrets completions <shell>`: a shell completion script on stdout.

use clap::{Args, CommandFactory};
use clap_complete::Shell;
use std::io::Write;
use std::process::ExitCode;

const BIN_NAME: &str = "claw-secrets";

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate the script for.
    #[arg(value_enum)]
    shell: Shell,
}

pub fn run(args: CompletionsArgs) -> ExitCode {
    let script = script(args.shell);
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(script.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        // `claw-secrets completions bash | head` is not worth an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the completion script: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The completion script for `shell`. Generated into memory: `generate` panics when it cannot
/// write, and a closed pipe is not worth a panic message.
fn script(shell: Shell) -> String {
    let mut command = super::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, BIN_NAME, &mut out);
    let script = String::from_utf8(out).expect("clap_complete writes UTF-8");
    match shell {
        Shell::Bash => fix_bash_hyphenated_bin_name(script),
        _ => script,
    }
}

/// clap_complete's bash script (4.6.11 and earlier) names the state of a subcommand one way
/// where it walks the command line (`claw__secrets__subcmd__agent`) and another way in the
/// `case` arms that complete it (`claw__subcmd__secrets__subcmd__agent`) when the binary name
/// has a hyphen, so nothing after a subcommand ever completes (clap-rs/clap#6421). Spelling
/// the arms the way the walk does fixes it; once upstream is fixed this replaces nothing.
fn fix_bash_hyphenated_bin_name(script: String) -> String {
    script.replace("claw__subcmd__secrets__subcmd__", "claw__secrets__subcmd__")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_case_arms_match_the_states_the_walk_produces() {
        let script = script(Shell::Bash);
        assert!(!script.contains("claw__subcmd__secrets"), "{script}");
        for sub in ["agent", "operator", "dev", "invoke", "completions"] {
            let state = format!("claw__secrets__subcmd__{sub}");
            assert!(
                script.contains(&format!("cmd=\"{state}\"")),
                "walk sets {state}"
            );
            assert!(
                script.contains(&format!("{state})")),
                "a case arm completes {state}"
            );
        }
    }
}
