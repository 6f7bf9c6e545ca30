//! Parity with the reference implementations, on tiny random weights: fixtures written by the committed scripts in
//! `scripts/parity/` (torch + diffusers/transformers), read here. Regenerate with the commands in each script.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use focusdpo::model::lora::{LoraConfig, LoraFormat, LoraSet};
use focusdpo::model::xflux_lora::read_xflux_lora;
use focusdpo::model::{
    Config, ForwardOptions, Mmdit, MmditInput, Reference, ids_tensor, reference_ids, target_ids, text_ids,
    uno_reference_offsets,
};

fn fixture(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/parity")
        .join(name);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("the fixture reads");
    let bytes = std::fs::read(&path).expect("fixture");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let meta = meta.metadata().clone().unwrap_or_default();
    (tensors, meta)
}

/// The fixture's tensors whose names start with `prefix`, without it.
fn prefixed(t: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    t.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
        .collect()
}

fn max_rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    let diff = (ours - reference)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0));
    let scale = reference.abs().and_then(|d| d.flatten_all()).and_then(|d| d.max(0));
    diff.and_then(|d| d.to_scalar::<f32>()).expect("diff") / scale.and_then(|s| s.to_scalar::<f32>()).expect("scale")
}

/// Our MMDiT against diffusers' `FluxTransformer2DModel` (BFL weights converted from it), with 0, 1 and 2 UNO
/// references (UnoPE ids) and guidance: every prediction within 1e-4 relative (f32).
#[test]
fn the_mmdit_equals_diffusers_flux_transformer_with_uno_references() {
    let (t, meta) = fixture("flux_transformer.safetensors");
    let cfg: Config = serde_json::from_str(&meta["config"]).expect("config");
    let grid: usize = meta["grid"].parse().expect("grid");
    let ref_grids: Vec<(usize, usize)> = serde_json::from_str(&meta["ref_grids"]).expect("ref grids");
    let weights: HashMap<String, Tensor> = prefixed(&t, "weights.");
    let model = Mmdit::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).expect("model");
    let dev = Device::Cpu;
    let batch = t["input.img"].dim(0).expect("batch");
    let text_tokens = t["input.txt"].dim(1).expect("text");
    let offsets = uno_reference_offsets((grid, grid), &ref_grids);
    let img_ids = ids_tensor(&target_ids(grid, grid), batch, &dev).expect("ids");
    let txt_ids = text_ids(text_tokens, batch, &dev).expect("txt ids");
    let ref_ids: Vec<Tensor> = ref_grids
        .iter()
        .zip(&offsets)
        .map(|(&(h, w), &off)| ids_tensor(&reference_ids(h, w, off), batch, &dev).expect("ref ids"))
        .collect();
    for n_refs in 0..=ref_grids.len() {
        // Our UnoPE ids are UNO's (the script builds them as `prepare_multi_ip` does).
        let mut ours = vec![img_ids.get(0).expect("row")];
        ours.extend(ref_ids[..n_refs].iter().map(|r| r.get(0).expect("row")));
        let ours = Tensor::cat(&ours, 0).expect("cat");
        assert_eq!(
            max_rel_err(&ours, &t[&format!("input.ids.refs{n_refs}")]),
            0.0,
            "UnoPE ids, {n_refs} refs"
        );
        let refs: Vec<Reference> = (0..n_refs)
            .map(|k| Reference {
                tokens: &t[&format!("input.ref{k}")],
                ids: &ref_ids[k],
            })
            .collect();
        let input = MmditInput {
            img: &t["input.img"],
            img_ids: &img_ids,
            txt: &t["input.txt"],
            txt_ids: &txt_ids,
            timesteps: &t["input.t"],
            y: &t["input.y"],
            guidance: Some(&t["input.guidance"]),
            references: &refs,
            self_condition: None,
        };
        let pred = model
            .forward_with(&input, ForwardOptions::default())
            .expect("forward")
            .prediction;
        let err = max_rel_err(&pred, &t[&format!("output.refs{n_refs}")]);
        assert!(err <= 1e-4, "{n_refs} references: max relative error {err:e}");
        eprintln!("MMDiT vs diffusers, {n_refs} references: max relative error {err:e}");
        if n_refs != 1 {
            continue;
        }
        // UNO's LoRA in x-flux naming, merged into our base, against diffusers' own x-flux converter + peft.
        let lora: HashMap<String, Tensor> = prefixed(&t, "lora.");
        let pieces = read_xflux_lora(&lora, &cfg).expect("x-flux LoRA");
        let mut merged = model.clone();
        merged.merge_base_lora(&pieces, 1.0).expect("merge");
        let pred = merged
            .forward_with(&input, ForwardOptions::default())
            .expect("forward")
            .prediction;
        let err = max_rel_err(&pred, &t["output.lora.refs1"]);
        assert!(err <= 1e-4, "UNO LoRA: max relative error {err:e}");
        assert!(
            max_rel_err(&pred, &t["output.refs1"]) > 1e-3,
            "the LoRA changes the output"
        );
        eprintln!("UNO LoRA merged vs diffusers + peft, 1 reference: max relative error {err:e}");

        // Our trainable LoRA, read from PEFT naming (and re-read from our kohya writing of the same adapters),
        // attached unmerged, against peft applying the same LoRA to diffusers' split layers.
        let rank: usize = meta["peft_rank"].parse().expect("rank");
        let alpha: f32 = meta["peft_alpha"].parse().expect("alpha");
        let lora_cfg = LoraConfig {
            rank,
            alpha,
            ..LoraConfig::default()
        };
        let peft = LoraSet::for_model(lora_cfg, &cfg, &dev).expect("lora");
        peft.load_tensors(&prefixed(&t, "peft.")).expect("PEFT naming loads");
        let kohya = LoraSet::for_model(lora_cfg, &cfg, &dev).expect("lora");
        kohya
            .load_tensors(&peft.to_tensors(LoraFormat::Kohya).expect("kohya"))
            .expect("kohya naming loads");
        for (naming, set) in [("PEFT", &peft), ("kohya", &kohya)] {
            let mut adapted = model.clone();
            adapted.attach_lora(set).expect("attach");
            let pred = adapted
                .forward_with(&input, ForwardOptions::default())
                .expect("forward")
                .prediction;
            let err = max_rel_err(&pred, &t["output.peft.refs1"]);
            assert!(err <= 1e-4, "{naming} LoRA: max relative error {err:e}");
            eprintln!("our LoRA in {naming} naming vs peft on diffusers, 1 reference: max relative error {err:e}");
        }
    }
}

/// FLUX's text encoders against transformers: T5 `last_hidden_state` (fixed-length padding, no mask) and the CLIP
/// text tower's `pooler_output`, read from `save_pretrained` folders (FLUX.1-dev's layout) with their tokenizers.
#[test]
fn the_text_encoders_equal_transformers_t5_and_clip() {
    use focusdpo::model::flux_text::{ClipTextEncoder, T5TextEncoder};
    let (t, meta) = fixture("text_encoders.safetensors");
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).expect("prompts");
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let t5_tokens: usize = meta["t5_tokens"].parse().expect("t5 tokens");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parity");
    let t5 = T5TextEncoder::load(&dir.join("t5"), &dir.join("t5/tokenizer.json"), t5_tokens, &Device::Cpu)
        .expect("T5 loads");
    let states = t5.encode(&prompts).expect("T5 encodes");
    let err = max_rel_err(&states, &t["t5.last_hidden_state"]);
    eprintln!("T5 vs transformers: max relative error {err:e}");
    assert!(err <= 1e-4, "T5: {err:e}");
    let clip =
        ClipTextEncoder::load(&dir.join("clip"), &dir.join("clip/tokenizer.json"), &Device::Cpu).expect("CLIP loads");
    let pooled = clip.encode(&prompts).expect("CLIP encodes");
    let err = max_rel_err(&pooled, &t["clip.pooler_output"]);
    eprintln!("CLIP text vs transformers: max relative error {err:e}");
    assert!(err <= 1e-4, "CLIP: {err:e}");
}

/// The FLUX autoencoder against diffusers' `AutoencoderKL` (FLUX layout, weights converted to BFL naming and read
/// back with the config from their shapes): the normalised posterior mean and the decoder output.
#[test]
fn the_autoencoder_equals_diffusers_autoencoder_kl() {
    use focusdpo::model::codec::FluxAutoencoder;
    let (t, _) = fixture("autoencoder.safetensors");
    let weights: HashMap<String, Tensor> = prefixed(&t, "weights.");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ae.safetensors");
    candle_core::safetensors::save(&weights, &path).expect("save");
    let ae = FluxAutoencoder::load(&path, &Device::Cpu).expect("the autoencoder loads");
    let latents = ae.encode(&t["input.image"]).expect("encode");
    let err = max_rel_err(&latents, &t["output.latents"]);
    eprintln!("autoencoder encode vs diffusers: max relative error {err:e}");
    assert!(err <= 1e-4, "encode: {err:e}");
    let decoded = ae.decode(&t["input.latents"]).expect("decode");
    let err = max_rel_err(&decoded, &t["output.decoded"]);
    eprintln!("autoencoder decode vs diffusers: max relative error {err:e}");
    assert!(err <= 1e-4, "decode: {err:e}");
}

/// The metric embedders against transformers: DINOv2's final-normed CLS token (`Dinov2Model.pooler_output`, Meta
/// naming, position embeddings interpolated bicubically from the 37 × 37 grid) and CLIP's projected image features
/// and unit text features (`CLIPModel.get_image_features` / `get_text_features`).
#[test]
fn the_metric_towers_equal_transformers_dinov2_and_clip() {
    use focusdpo::eval::TextEmbedder;
    use focusdpo::eval::pretrained::{ClipEmbedder, ClipModelConfig, DinoV2Config, DinoV2Embedder};
    let (t, meta) = fixture("metric_towers.safetensors");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parity");
    let tmp = tempfile::tempdir().expect("tmp");
    let dino_path = tmp.path().join("dinov2.safetensors");
    let dino_weights: HashMap<String, Tensor> = prefixed(&t, "dino.weights.");
    candle_core::safetensors::save(&dino_weights, &dino_path).expect("save");
    let cfg = DinoV2Config {
        name: "dinov2-tiny".into(),
        depth: 2,
        embed_dim: 16,
        num_heads: 2,
        image_px: meta["dino_px"].parse().expect("px"),
    };
    let dino = DinoV2Embedder::load(&dino_path, &cfg, &Device::Cpu).expect("DINOv2 loads");
    let pixels = &t["dino.pixels"];
    let cls: Vec<Tensor> = (0..pixels.dim(0).expect("batch"))
        .map(|i| {
            dino.cls_embedding(&pixels.narrow(0, i, 1).expect("image"))
                .expect("embeds")
        })
        .collect();
    let cls = Tensor::cat(&cls, 0).expect("cat");
    let err = max_rel_err(&cls, &t["dino.cls"]);
    eprintln!("DINOv2 CLS vs transformers: max relative error {err:e}");
    assert!(err <= 1e-4, "DINOv2: {err:e}");

    let clip_dir = dir.join("clip_model");
    let clip = ClipEmbedder::load(
        &clip_dir,
        &clip_dir.join("tokenizer.json"),
        &ClipModelConfig::vit_base_patch32(),
        &Device::Cpu,
    )
    .expect("CLIP loads");
    let image = clip.image_features(&t["clip.pixels"]).expect("image features");
    let err = max_rel_err(&image, &t["clip.image_features"]);
    eprintln!("CLIP image features vs transformers: max relative error {err:e}");
    assert!(err <= 1e-4, "CLIP-I: {err:e}");
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).expect("prompts");
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let text = clip.embed_texts(&prompts).expect("text features");
    let text = Tensor::new(text, &Device::Cpu).expect("tensor");
    let err = max_rel_err(&text, &t["clip.text_features_unit"]);
    eprintln!("CLIP text features vs transformers: max relative error {err:e}");
    assert!(err <= 1e-4, "CLIP-T: {err:e}");
}

/// CLIP's tokenizer built from `vocab.json` + `merges.txt` (FLUX.1-dev's `tokenizer/` folder) against transformers'
/// `CLIPTokenizer` from the same files: the exact ids, bare and padded/truncated to 77 as FLUX's `HFEmbedder` asks.
#[test]
fn clip_bpe_from_vocab_and_merges_equals_transformers_clip_tokenizer() {
    use focusdpo::model::flux_text::{CLIP_EOT, CLIP_TOKENS, fixed_length};
    use focusdpo::model::hf::load_clip_tokenizer;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parity/clip_bpe");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ids.json")).expect("ids.json")).expect("json");
    let prompts: Vec<String> = serde_json::from_value(fixture["prompts"].clone()).expect("prompts");
    let bare: Vec<Vec<u32>> = serde_json::from_value(fixture["ids"].clone()).expect("ids");
    let padded: Vec<Vec<u32>> = serde_json::from_value(fixture["ids_77"].clone()).expect("ids_77");
    // The folder, as FLUX.1-dev ships it (no tokenizer.json), and its vocab.json named directly.
    for path in [dir.clone(), dir.join("vocab.json")] {
        let tok = load_clip_tokenizer(&path).expect("vocab.json + merges.txt load");
        for (prompt, want) in prompts.iter().zip(&bare) {
            let got = tok.encode(prompt.as_str(), true).expect("encodes");
            assert_eq!(got.get_ids(), want.as_slice(), "{prompt:?}");
        }
        let fixed = fixed_length(tok, CLIP_TOKENS, CLIP_EOT, &path).expect("fixed length");
        for (prompt, want) in prompts.iter().zip(&padded) {
            let got = fixed.encode(prompt.as_str(), true).expect("encodes");
            assert_eq!(got.get_ids(), want.as_slice(), "{prompt:?} padded to 77");
        }
    }
    eprintln!(
        "CLIP BPE from vocab.json + merges.txt: {} prompts, ids equal",
        prompts.len()
    );
    let missing = tempfile::tempdir().expect("tmp");
    std::fs::copy(dir.join("vocab.json"), missing.path().join("vocab.json")).expect("copy");
    let e = load_clip_tokenizer(missing.path()).expect_err("no merges").to_string();
    assert!(e.contains("merges.txt"), "{e}");
}
