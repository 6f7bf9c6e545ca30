//! Times the attention implementations, forward and backward, at the tiny default's training shapes (batch 8,
//! 4 heads, 424 tokens = 256 target + 2 × 64 reference + 40 text, head width 64), or at `B H L D` given:
//! `cargo run --release --example attention_time [-- B H L D]`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use focusdpo::model::attention::{AttentionImpl, attention_with};

fn main() -> anyhow::Result<()> {
    focusdpo::alloc::tune_for_tensors();
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (b, h, l, d) = match args.as_slice() {
        [b, h, l, d] => (*b, *h, *l, *d),
        _ => (8, 4, 424, 64),
    };
    let dev = Device::Cpu;
    let var = |seed: u64| -> anyhow::Result<Var> {
        let mut rng = focusdpo::rng::stream_rng(seed, 0, 0);
        let t = Tensor::from_vec(focusdpo::rng::normal_vec(&mut rng, b * h * l * d), (b, h, l, d), &dev)?;
        Ok(Var::from_tensor(&t)?)
    };
    let (q, k, v) = (var(1)?, var(2)?, var(3)?);
    let g = var(4)?.as_tensor().detach();
    let scale = 1.0 / (d as f64).sqrt();
    for (name, imp) in [
        ("explicit", AttentionImpl::Explicit),
        ("fused", AttentionImpl::Fused),
        ("chunked 128", AttentionImpl::Chunked(128)),
    ] {
        let mut fwd = Vec::new();
        let mut both = Vec::new();
        for i in 0..10 {
            let start = Instant::now();
            let o = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, imp)?;
            let f = start.elapsed().as_secs_f64() * 1e3;
            (o * &g)?.sum_all()?.backward()?;
            if i >= 2 {
                fwd.push(f);
                both.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        fwd.sort_by(f64::total_cmp);
        both.sort_by(f64::total_cmp);
        println!(
            "{name:12} [{b}, {h}, {l}, {d}]  forward {:7.2} ms   forward+backward {:7.2} ms (medians of 8)",
            fwd[4], both[4]
        );
    }
    Ok(())
}
