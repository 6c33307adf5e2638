//! Fuzzes Policy::parse (the policy file), and to_toml back; the properties are in `portwatch::fuzzing::policy_file`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = portwatch::fuzzing::policy_file(data) {
        panic!("policy_file: {violation}");
    }
});
