//! The `arpcp` command: agent, gateway and client subcommands.

/// The daemons allocate many small, short-lived objects (JSON, task records)
/// across threads; mimalloc handles that better than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> std::process::ExitCode {
    arpcp::cli::main()
}
