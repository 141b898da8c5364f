//! chatbus-ws's client frame parser (`protocol::parse`), fed arbitrary bytes as a text frame.
//!
//! The invariants are checked inside chatbus-ws (`__fuzz::parse_client_frame`), where the
//! request types are visible; a broken one panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chatbus_ws::__fuzz::parse_client_frame(data);
});
