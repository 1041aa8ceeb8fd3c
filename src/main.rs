//! The `arpcp` command: agent, gateway and client subcommands.
fn main() -> std::process::ExitCode {
    arpcp::cli::main()
}
