//! chatbus-ws's inter-instance payload decoder (`payload::decode`), fed arbitrary bytes.
//!
//! The round trip (decode, re-encode, decode equal) is checked inside chatbus-ws
//! (`__fuzz::decode_payload`), where the encoders are visible; a broken one panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chatbus_ws::__fuzz::decode_payload(data);
});
