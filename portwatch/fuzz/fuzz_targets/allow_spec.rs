//! Fuzzes PortRange::parse (`--allow SPEC`); the properties are in `portwatch::fuzzing::allow_spec`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = portwatch::fuzzing::allow_spec(data) {
        panic!("allow_spec: {violation}");
    }
});
