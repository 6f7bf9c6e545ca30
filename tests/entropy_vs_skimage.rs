//! Eq. 7 agrees with `skimage.filters.rank.entropy` (square footprint, uint8, border pixels clipped) on the
//! fixtures made by `scripts/skimage_entropy_fixture.py`.

use focusdpo::masks::complexity::local_entropy_bits;
use serde_json::Value;

#[test]
fn local_entropy_matches_skimage() {
    let text = include_str!("data/skimage_entropy.json");
    let fixture: Value = serde_json::from_str(text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let n = |k: &str| case[k].as_u64().unwrap() as usize;
        let (h, w, win) = (n("height"), n("width"), n("window"));
        let pixels: Vec<u8> = case["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        let want: Vec<f64> = case["entropy_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = local_entropy_bits(&pixels, w, h, win).unwrap();
        for (i, (g, s)) in got.as_slice().iter().zip(&want).enumerate() {
            assert!(
                (f64::from(*g) - s).abs() < 1e-5,
                "{h}×{w} window {win}, pixel {i}: ours {g}, skimage {s}"
            );
        }
    }
}
