//! The `portwatch` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    portwatch::cli::main()
}
