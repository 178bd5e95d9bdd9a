//! What several test suites need and nothing ships: a deterministic random
//! generator (so a failing run can be repeated) and an HTTP/1.1 client small
//! enough to send exactly the bytes a test means (odd paths, ranges, chunked
//! bodies), with no hidden retries or normalization; and small Cloudlet-shaped disk
//! images ([`image`]); a misbehaving file server for update tests ([`mirror`]).

pub mod http;
pub mod image;
pub mod mirror;

/// xorshift64*: small, deterministic, good enough to shake parsers and pick moments.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` random bytes.
    pub fn fill(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max as u64 + 1) as usize;
        self.fill(n)
    }
}
