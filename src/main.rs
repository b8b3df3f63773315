//! The `crmbridge` binary: parses the command line and hands over to [`crmbridge::cli`].

fn main() -> std::process::ExitCode {
    crmbridge::cli::main()
}
