//! Counter-based random streams: one independent, reproducible stream per (seed, epoch, item).
//!
//! Each item's augmentation draws from its own stream, so a batch's content depends neither on
//! which worker thread built it nor on what was drawn before; a resumed run reproduces it. The
//! generator is SplitMix64, written out here so that streams stay the same across versions of
//! the `rand` crate.

/// Increment of SplitMix64 (the golden ratio in 64-bit fixed point).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// `index` of the stream that shuffles an epoch's item order.
pub(crate) const ORDER_STREAM: u64 = u64::MAX;

/// `epoch` of the stream that picks stratified subsets and validation splits.
pub(crate) const SUBSET_STREAM: u64 = u64::MAX - 1;

/// SplitMix64's output function: a bijective 64-bit mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic random generator (SplitMix64) keyed by `(seed, epoch, index)`.
///
/// ```
/// use peft_data::image::ItemRng;
/// let a: Vec<u64> = { let mut r = ItemRng::new(7, 0, 3); (0..4).map(|_| r.next_u64()).collect() };
/// let b: Vec<u64> = { let mut r = ItemRng::new(7, 0, 3); (0..4).map(|_| r.next_u64()).collect() };
/// assert_eq!(a, b);
/// assert_ne!(ItemRng::new(7, 0, 3).next_u64(), ItemRng::new(7, 1, 3).next_u64());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRng {
    state: u64,
}

impl ItemRng {
    /// The stream of item `index` in epoch `epoch` of a run seeded with `seed`.
    pub fn new(seed: u64, epoch: u64, index: u64) -> Self {
        let key = mix(seed.wrapping_add(GOLDEN));
        let key = mix(key ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let key = mix(key ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
        Self { state: key }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform float in `[low, high)`, like `torch.empty(1).uniform_(low, high)`.
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.next_f64()
    }

    /// A uniform integer in `[0, n)` (`0` when `n == 0`), like `torch.randint(0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}
