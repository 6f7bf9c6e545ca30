//! Seeded randomness shared by the generator, the model initialisers and training: every random choice derives
//! from a user seed through [`stream_rng`], so the same seed gives the same run on the same machine.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A generator for `(seed, stream, index)`: independent streams for independent purposes (item order, noise,
/// timesteps) and one index per step, so a resumed run draws exactly what an uninterrupted one would.
pub fn stream_rng(seed: u64, stream: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    // 2^32 words per index is far more than one step draws.
    rng.set_word_pos(u128::from(index) << 32);
    rng
}

/// A standard normal sample by Box–Muller (rand 0.10 has no normal distribution without `rand_distr`).
pub fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: keeps ln finite
    let u2 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// `n` standard normal samples.
pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| standard_normal(rng)).collect()
}

/// A uniformly random permutation of `0..n` (Fisher–Yates).
pub fn permutation(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_and_indices_are_independent_and_reproducible() {
        let a: Vec<f32> = normal_vec(&mut stream_rng(1, 2, 3), 4);
        assert_eq!(a, normal_vec(&mut stream_rng(1, 2, 3), 4));
        assert_ne!(a, normal_vec(&mut stream_rng(1, 2, 4), 4));
        assert_ne!(a, normal_vec(&mut stream_rng(1, 3, 3), 4));
        assert_ne!(a, normal_vec(&mut stream_rng(2, 2, 3), 4));
        let mut p = permutation(&mut stream_rng(0, 0, 0), 10);
        p.sort_unstable();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn normal_samples_have_unit_moments() {
        let v = normal_vec(&mut stream_rng(5, 0, 0), 20_000);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{mean} {var}");
    }
}
