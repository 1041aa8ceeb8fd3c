//! `arpcp completions SHELL`: the shell's completion script for every subcommand
//! and flag, generated from the same definitions the parser uses, so it cannot
//! fall behind them.

use clap::CommandFactory;

#[derive(clap::Args)]
pub struct CompletionsCmd {
    /// The shell, e.g. `arpcp completions bash > ~/.local/share/bash-completion/completions/arpcp`.
    #[arg(value_enum)]
    shell: Shell,
}

/// The shells a script is made for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the script on stdout.
pub fn print<C: CommandFactory>(c: CompletionsCmd) {
    let shell = match c.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut cmd = C::command();
    // Into memory first: clap_complete panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "arpcp", &mut script);
    super::output::stdout_write(&script, false);
}
