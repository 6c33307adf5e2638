//! What the binary asks of the terminal it runs in.

use std::io::IsTerminal as _;

/// Whether people get colour: a terminal, and NO_COLOR unset or empty.
pub fn colour_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
