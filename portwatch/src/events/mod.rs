//! Events from the kernel: decoding ring-buffer records and reading them.

pub mod decode;
pub mod reader;
