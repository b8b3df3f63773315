//! The `crmbridge` binary: parses the command line and hands over to [`crmbridge::cli`].

/// mimalloc instead of glibc's malloc: ingesting a page allocates and frees many small
/// values (maps, strings, B-tree pages) across two threads, where glibc spent a fifth of
/// the CPU time (BENCHMARKS.md, engine benchmark).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
crmbridge::allocator_settings!();

fn main() -> std::process::ExitCode {
    crmbridge::cli::main()
}
