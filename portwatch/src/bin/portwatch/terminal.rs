//! What the binary asks of the terminal (or pipe) it writes to.

use std::{
    fs::File,
    io::{self, IsTerminal as _},
    os::fd::AsFd as _,
};

/// Whether people get colour: a terminal, and NO_COLOR unset or empty.
pub fn colour_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Bytes a stream gathers before a write: a burst of events then costs
/// one write(2) per 64 KiB (one wake-up of whoever reads the pipe), not one
/// per 8 KiB. The stream flushes after every batch it takes, so a quiet
/// stream's lines are out at once all the same.
const STREAM_BUFFER: usize = 64 * 1024;

/// stdout for a stream of events, written through its own buffer only:
/// `io::Stdout` is line-buffered as well, and split each buffer's write in
/// two (the whole lines, then the part line left over).
pub fn stream_stdout() -> io::BufWriter<Box<dyn io::Write + Send>> {
    let out: Box<dyn io::Write + Send> = match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(File::from(fd)),
        // No fd to spare: the line-buffered handle still works.
        Err(_) => Box::new(io::stdout()),
    };
    io::BufWriter::with_capacity(STREAM_BUFFER, out)
}
