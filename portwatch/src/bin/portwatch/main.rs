//! The `portwatch` binary: the command line over the library. Argument
//! parsing ([`args`]), dispatch ([`run`]), the client commands, the terminal
//! UI, man pages and log setup live here; everything that watches or
//! guards lives in the library.

mod args;
mod commands;
mod docs;
mod logging;
mod run;
mod terminal;
mod tui;

fn main() -> std::process::ExitCode {
    run::main()
}
