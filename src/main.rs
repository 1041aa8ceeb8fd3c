//! The `arpcp` command: agent, gateway and client subcommands.

/// The daemons allocate many small, short-lived objects (JSON, task records)
/// across threads; mimalloc handles that better than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 2's `mi_option_purge_delay` (its position in `mi_option_t`; the crate
/// does not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Freed memory goes back to the system at once instead of 100 ms later (10 ms
    // times the arena multiplier): under load that delay kept a third of an agent's
    // and a fifth of the gateway's resident memory (bench: agents 28 -> 23 MiB,
    // gateway 53 -> 43 MiB), at no cost in throughput the bench could see.
    // MIMALLOC_PURGE_DELAY in the environment still wins (a default, not a setting).
    // SAFETY: mimalloc's options are set before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 0) };
    arpcp::cli::main()
}
