//! Writes a FLUX.1-dev folder of tiny random weights (BFL naming without metadata, a real-format autoencoder, T5
//! and CLIP folders with tokenizers) plus UNO's LoRA in x-flux naming and a backbone profile, to try every FLUX
//! code path without downloads:
//!
//! ```sh
//! cargo run --release --example tiny_flux -- out/tiny-flux
//! cargo run --release -- masks --backbone out/tiny-flux/uno.toml --item synth-0001 --out out/m.safetensors
//! ```
//!
//! The Studio opens `out/tiny-flux/uno.toml` with "Open backbone…" (or by dropping it on the window).

use std::path::PathBuf;

use focusdpo::model::testing::{tiny_flux_config, write_tiny_flux_folder, write_tiny_uno_lora};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "out/tiny-flux".into()));
    write_tiny_flux_folder(&dir.join("FLUX.1-dev"), 1)?;
    write_tiny_uno_lora(&dir.join("dit_lora.safetensors"), &tiny_flux_config(), 4, 2)?;
    std::fs::write(
        dir.join("uno.toml"),
        "# A tiny FLUX.1-dev + UNO LoRA backbone (random weights) for trying the FLUX code paths.\n\
         transformer = \"FLUX.1-dev/flux1-dev.safetensors\"\n\
         base_loras = [{ path = \"dit_lora.safetensors\", scale = 1.0 }]\n\
         autoencoder = \"FLUX.1-dev/ae.safetensors\"\n\
         t5 = \"FLUX.1-dev/text_encoder_2\"\n\
         t5_tokenizer = \"FLUX.1-dev/tokenizer_2/tokenizer.json\"\n\
         t5_max_tokens = 8\n\
         clip = \"FLUX.1-dev/text_encoder\"\n\
         clip_tokenizer = \"FLUX.1-dev/tokenizer/tokenizer.json\"\n\
         reference_px = 32\n",
    )?;
    println!("wrote {} (FLUX.1-dev/, dit_lora.safetensors, uno.toml)", dir.display());
    Ok(())
}
