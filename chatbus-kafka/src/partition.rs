//! Which partition a room lives in.
//!
//! The broker chooses the partition itself, instead of leaving it to librdkafka's partitioner,
//! because replay and history must know which single partition to read for a room. The hash is
//! Kafka's murmur2, as the Java client's default partitioner and librdkafka's `murmur2_random`
//! use it for keyed records, so other Kafka clients that produce with key = room agree with it.

/// The partition of `key` among `partitions` (which must be at least 1).
pub(crate) fn partition_for(key: &[u8], partitions: u32) -> u32 {
    // Java's `Utils.toPositive(murmur2(key)) % numPartitions`.
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's murmur2 (seed 0x9747b28c), bit for bit as `org.apache.kafka.common.utils.Utils`.
pub(crate) fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java uses the length as a (wrapping) int.
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        h ^= u32::from(first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_java_client() {
        // Vectors from Kafka's UtilsTest.testMurmur2 (Java ints).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected as u32, "{key:?}");
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for n in 1..20 {
            for room in ["general", "a", "team-1.dev:ops_2"] {
                let p = partition_for(room.as_bytes(), n);
                assert!(p < n);
                assert_eq!(p, partition_for(room.as_bytes(), n));
            }
        }
        assert_eq!(partition_for(b"x", 0), 0);
    }
}
