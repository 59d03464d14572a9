//! Seeded data generators for tests and benchmarks: reproducible, with a controllable mix of
//! compressible (≈2.5:1 with zstd-1), incompressible and all-zero chunks.

/// A small, fast PRNG (xorshift64*), so data is identical on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (any seed, including 0).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Incompressible bytes.
pub fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Bytes that zstd-1 compresses about 2.5:1: random words interleaved with runs drawn from a
/// small vocabulary, like file-system data.
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"the quick brown fox ",
        b"jumps over the lazy dog ",
        b"\x00\x00\x00\x00\x01\x00\x00\x00",
        b"/usr/lib/x86_64-linux-gnu/",
        b"ELF\x02\x01\x01\x00",
        b"<xml version=\"1.0\"> ",
        b"0123456789abcdef",
        b"        ",
    ];
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let r = rng.next_u64();
        if r % 100 < 28 {
            out.extend_from_slice(&rng.next_u64().to_le_bytes());
            out.extend_from_slice(&rng.next_u64().to_le_bytes()[..((r >> 8) % 8) as usize]);
        } else {
            out.extend_from_slice(WORDS[((r >> 16) % 8) as usize]);
        }
    }
    out.truncate(len);
    out
}

/// Content of chunk `index` of a generated disk: one in eight chunks all zeros, the rest
/// compressible, each distinct for distinct (seed, index).
pub fn disk_chunk(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let h = Rng::new(seed ^ index.wrapping_mul(0x1000_0000_01B3)).next_u64();
    if h % 8 == 0 {
        vec![0; len]
    } else {
        compressible(h, len)
    }
}
