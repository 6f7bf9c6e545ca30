//! Benchmarks of the Detail-Preserving Complexity Estimator (Eq. 7–8) on 1024×1024 images.

use criterion::{Criterion, criterion_group};
use focusdpo::masks::complexity::{ComplexityConfig, complexity_mask, local_entropy_bits};
use std::hint::black_box;

/// A deterministic textured 1024×1024 grey image (smooth gradients plus pseudo-random grain).
fn test_image(side: usize) -> Vec<u8> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..side * side)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (y, x) = (i / side, i % side);
            let base = ((x * 255 / side) + (y * 97 / side)) as u64;
            ((base + (s >> 59)) % 256) as u8
        })
        .collect()
}

fn bench_entropy(c: &mut Criterion) {
    let side = 1024;
    let img = test_image(side);
    let mut group = c.benchmark_group("entropy_1024");
    group.sample_size(10);
    for window in [9usize, 17] {
        group.bench_function(format!("eq7_local_entropy_w{window}"), |b| {
            b.iter(|| local_entropy_bits(black_box(&img), side, side, window))
        });
        let cfg = ComplexityConfig {
            window_px: window,
            ..ComplexityConfig::default()
        };
        group.bench_function(format!("m_d_stride16_w{window}"), |b| {
            b.iter(|| complexity_mask(black_box(&img), side, side, 16, &cfg))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_entropy);

/// `criterion_main!` plus the font registration: criterion draws its report plots with plotters, whose `ab_glyph`
/// text (this crate's plots enable it) panics without a registered font.
fn main() {
    focusdpo::experiment::plot::register_font().expect("the bundled plot font registers");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
