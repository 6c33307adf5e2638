//! portwatch's kernel programs, as a library of program bodies and maps.
//! The two objects built from it declare the entry points: `main.rs` the
//! shipped one (monitor and guard), `bench_main.rs` the benchmark
//! baselines. One probe family per module: [`listen`] (the monitor),
//! [`xdp`] (the guard's verdicts), [`flows`] (its tc egress side), all
//! parsing frames with the one walk in [`headers`], and [`bind`] (owned
//! ports at bind time).
#![no_std]

pub mod aligned;
pub mod bench;
pub mod bind;
pub mod flows;
pub mod headers;
pub mod listen;
pub mod maps;
pub mod packet;
pub mod xdp;
