//! The bundled dataset `assets/dip-default` is valid and is exactly what the generator produces for its
//! documented settings (`--items 48 --subjects mixed --size 64 --seed 0 --negatives perturbed`), so the generator
//! cannot drift silently and the assets cannot be hand-edited by accident.

use focusdpo::dip::synth::{NegativeSource, SubjectCount, SynthConfig, synthesize};
use focusdpo::dip::{DipDataset, bundled_dataset_dir, check_dataset};

fn bundled_config() -> SynthConfig {
    SynthConfig {
        items: 48,
        subjects: SubjectCount::Mixed,
        size_px: 64,
        seed: 0,
        negatives: NegativeSource::Perturbed,
    }
}

#[test]
fn bundled_dataset_is_valid() {
    let report = check_dataset(bundled_dataset_dir()).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.valid_items, 48);
    assert!(report.single_subject > 0 && report.multi_subject > 0);
}

#[test]
fn bundled_dataset_matches_the_generator() {
    let dataset = DipDataset::open(bundled_dataset_dir()).unwrap();
    let fresh = synthesize(&bundled_config()).unwrap();
    assert_eq!(dataset.len(), fresh.len());
    for (index, want) in fresh.iter().enumerate() {
        let got = dataset.load_item(index).unwrap();
        let id = &want.record.id;
        assert_eq!(got.record, want.record, "{id}: manifest record");
        assert_eq!(got.winner, want.winner, "{id}: winner pixels");
        assert_eq!(got.loser, want.loser, "{id}: loser pixels");
        assert_eq!(got.references, want.references, "{id}: reference pixels");
        assert_eq!(got.masks, want.masks, "{id}: mask pixels");
    }
}
