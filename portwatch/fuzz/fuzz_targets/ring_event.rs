//! Fuzzes events::decode::{decode_listen, decode_drop}; the properties are in `portwatch::fuzzing::ring_event`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = portwatch::fuzzing::ring_event(data) {
        panic!("ring_event: {violation}");
    }
});
