//! portwatch's kernel programs, as a library of program bodies and maps.
//! The two objects built from it declare the entry points: `main.rs` the
//! shipped one (monitor and guard), `bench_main.rs` the benchmark
//! baselines. One probe family per module: [`listen`] (the monitor),
//! [`guard`] (the guard's verdicts, in XDP or at tc ingress), [`flows`]
//! (its tc egress side), all parsing frames with the one walk in
//! [`headers`] through [`packet`], and [`bind`] (owned ports at bind
//! time).
#![no_std]

pub mod aligned;
pub mod bench;
pub mod bind;
pub mod clock;
pub mod flows;
pub mod guard;
pub mod headers;
pub mod listen;
pub mod maps;
pub mod packet;
