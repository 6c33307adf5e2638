//! Fuzzes control::protocol::decode_request and Request::to_line; the properties are in `portwatch::fuzzing::control_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = portwatch::fuzzing::control_request(data) {
        panic!("control_request: {violation}");
    }
});
