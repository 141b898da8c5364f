//! chatbus-core's envelope decoder (`chatbus_core::backend::codec::decode`), fed arbitrary bytes.
//!
//! Properties: decoding never panics; an envelope that decodes re-encodes to the very same bytes
//! (the layout has exactly one encoding per envelope: unknown flags and trailing bytes are
//! rejected), and those bytes decode to the same envelope.
#![no_main]

use bytes::Bytes;
use chatbus_core::backend::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let Ok(env) = codec::decode(&input) else {
        return;
    };
    let again = codec::encode(&env).expect("a decoded envelope fits its length prefixes");
    assert_eq!(again.len(), codec::encoded_len(&env));
    assert_eq!(again, input, "the encoding is not canonical");
    let env2 = codec::decode(&again).expect("a re-encoded envelope decodes");
    assert_eq!(env2, env, "round trip changed the envelope");
});
