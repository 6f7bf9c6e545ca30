use std::collections::HashSet;

use image::{GrayImage, RgbImage};
use serde_json::Value;

use super::*;
use crate::dip::Category;
use crate::dip::manifest::parse_manifest;

fn cfg(items: usize, subjects: SubjectCount, negatives: NegativeSource) -> SynthConfig {
    SynthConfig {
        items,
        subjects,
        negatives,
        ..SynthConfig::default()
    }
}

fn same_item(a: &SynthItem, b: &SynthItem) -> bool {
    a.record == b.record
        && a.references == b.references
        && a.winner == b.winner
        && a.loser == b.loser
        && a.masks == b.masks
}

/// Union of the item's masks, row-major.
fn union(masks: &[GrayImage]) -> Vec<bool> {
    let n = masks.first().map_or(0, |m| m.as_raw().len());
    (0..n).map(|i| masks.iter().any(|m| m.as_raw()[i] != 0)).collect()
}

fn pixels(image: &RgbImage) -> impl Iterator<Item = [u8; 3]> + '_ {
    image.pixels().map(|p| p.0)
}

#[test]
fn default_config_is_the_documented_one() {
    let d = SynthConfig::default();
    assert_eq!(
        d,
        SynthConfig {
            items: 48,
            subjects: SubjectCount::Mixed,
            size_px: 64,
            seed: 0,
            negatives: NegativeSource::Perturbed
        }
    );
    assert!(d.validate().is_ok());
}

#[test]
fn same_seed_same_bytes_and_different_seed_different_items() {
    for negatives in [
        NegativeSource::Perturbed,
        NegativeSource::OtherSubject,
        NegativeSource::Augmented,
    ] {
        let c = cfg(12, SubjectCount::Mixed, negatives);
        let (a, b) = (synthesize(&c).unwrap(), synthesize(&c).unwrap());
        assert_eq!(a.len(), 12);
        assert!(a.iter().zip(&b).all(|(x, y)| same_item(x, y)), "{negatives:?}");
        let other = synthesize(&SynthConfig { seed: 1, ..c.clone() }).unwrap();
        let differing = a.iter().zip(&other).filter(|(x, y)| x.winner != y.winner).count();
        assert!(differing >= 11, "{negatives:?}: only {differing} winners differ");
    }
}

#[test]
fn item_k_does_not_depend_on_the_number_of_items() {
    let small = synthesize(&cfg(3, SubjectCount::Mixed, NegativeSource::Perturbed)).unwrap();
    let large = synthesize(&cfg(9, SubjectCount::Mixed, NegativeSource::Perturbed)).unwrap();
    assert!(small.iter().zip(&large).all(|(a, b)| same_item(a, b)));
}

#[test]
fn masks_are_binary_non_empty_and_one_per_subject() {
    for (subjects, expected) in [
        (SubjectCount::One, vec![1]),
        (SubjectCount::Two, vec![2]),
        (SubjectCount::Three, vec![3]),
        (SubjectCount::Mixed, vec![1, 2, 3]),
    ] {
        for size_px in [32, 64, 128] {
            let c = SynthConfig {
                size_px,
                ..cfg(24, subjects, NegativeSource::Perturbed)
            };
            let items = synthesize(&c).unwrap();
            let mut seen = HashSet::new();
            for item in &items {
                let n = item.masks.len();
                seen.insert(n);
                assert!(expected.contains(&n), "{subjects:?}: {n} subjects");
                assert_eq!(item.references.len(), n);
                assert_eq!(item.record.references.len(), n);
                assert_eq!(item.record.masks.len(), n);
                assert_eq!(item.winner.dimensions(), (size_px, size_px));
                assert_eq!(item.loser.dimensions(), (size_px, size_px));
                for r in &item.references {
                    assert_eq!(r.dimensions(), (size_px, size_px));
                }
                let mut owned = vec![0u8; (size_px * size_px) as usize];
                for m in &item.masks {
                    assert_eq!(m.dimensions(), (size_px, size_px));
                    assert!(m.as_raw().iter().all(|&v| v == 0 || v == 255), "{}", item.record.id);
                    let area = m.as_raw().iter().filter(|&&v| v == 255).count();
                    assert!(area >= 8, "{}: mask of {area} px", item.record.id);
                    for (o, &v) in owned.iter_mut().zip(m.as_raw()) {
                        *o += u8::from(v != 0);
                    }
                }
                assert!(owned.iter().all(|&o| o <= 1), "{}: masks overlap", item.record.id);
            }
            if subjects == SubjectCount::Mixed {
                assert_eq!(seen.len(), 3, "mixed items should cover 1, 2 and 3 subjects");
            }
        }
    }
}

#[test]
fn localized_negatives_change_only_pixels_inside_the_masks() {
    for negatives in [NegativeSource::Perturbed, NegativeSource::OtherSubject] {
        for subjects in [SubjectCount::One, SubjectCount::Two, SubjectCount::Three] {
            for item in synthesize(&cfg(16, subjects, negatives)).unwrap() {
                let inside = union(&item.masks);
                let mut changed_inside = 0;
                for ((w, l), &m) in pixels(&item.winner).zip(pixels(&item.loser)).zip(&inside) {
                    if m {
                        changed_inside += usize::from(w != l);
                    } else {
                        assert_eq!(w, l, "{negatives:?} {}: change outside the masks", item.record.id);
                    }
                }
                assert!(
                    changed_inside > 0,
                    "{negatives:?} {}: loser equals winner",
                    item.record.id
                );
                let negative = &item.record.meta["negative"];
                assert_eq!(negative["source"], negatives.key());
                let edits = negative["edits"].as_array().unwrap();
                assert!(!edits.is_empty());
                for e in edits {
                    let k = e["subject"].as_u64().unwrap() as usize;
                    assert!(k < item.masks.len());
                    assert!(e["changed_pixels"].as_u64().unwrap() > 0);
                }
            }
        }
    }
}

#[test]
fn perturbed_regions_cover_a_meaningful_part_of_the_subject() {
    let items = synthesize(&cfg(40, SubjectCount::Mixed, NegativeSource::Perturbed)).unwrap();
    let mut fractions = Vec::new();
    for item in &items {
        for e in item.record.meta["negative"]["edits"].as_array().unwrap() {
            let region = e["region_pixels"].as_f64().unwrap();
            let mask = e["mask_pixels"].as_f64().unwrap();
            fractions.push(region / mask);
            if e["region"]["kind"] == "disc" {
                assert!(["palette", "pattern"].contains(&e["attribute"].as_str().unwrap()));
                assert_ne!(e["from"], e["to"]);
            }
        }
    }
    assert!(fractions.iter().all(|&f| (0.3..=1.0).contains(&f)), "{fractions:?}");
}

#[test]
fn other_subject_replacements_keep_the_category_and_change_the_identity() {
    for item in synthesize(&cfg(20, SubjectCount::Mixed, NegativeSource::OtherSubject)).unwrap() {
        for e in item.record.meta["negative"]["edits"].as_array().unwrap() {
            if e["attribute"] == "identity" {
                assert_eq!(e["from_identity"]["category"], e["to_identity"]["category"]);
                assert_ne!(e["from_identity"]["shape"], e["to_identity"]["shape"]);
                assert_ne!(e["from_identity"]["identity"], e["to_identity"]["identity"]);
            }
        }
    }
}

#[test]
fn augmented_negatives_are_global_and_recorded() {
    for item in synthesize(&cfg(8, SubjectCount::Mixed, NegativeSource::Augmented)).unwrap() {
        assert_ne!(item.winner, item.loser);
        let outside = union(&item.masks);
        let changed_outside = pixels(&item.winner)
            .zip(pixels(&item.loser))
            .zip(&outside)
            .filter(|((w, l), m)| !**m && w != l)
            .count();
        assert!(changed_outside > 0, "augmentation should not be localized");
        let aug = &item.record.meta["negative"]["augmentation"];
        assert!(aug["brightness"].is_number() && aug["shift_px"].is_array(), "{aug}");
    }
}

#[test]
fn subjects_within_an_item_are_distinct_and_category_is_shared_or_none() {
    for item in synthesize(&cfg(40, SubjectCount::Mixed, NegativeSource::Perturbed)).unwrap() {
        let subjects = item.record.meta["subjects"].as_array().unwrap();
        let ids: HashSet<u64> = subjects.iter().map(|s| s["identity"].as_u64().unwrap()).collect();
        let shapes: HashSet<&str> = subjects.iter().map(|s| s["shape"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), subjects.len());
        assert_eq!(shapes.len(), subjects.len());
        assert_ne!(item.references.first(), item.references.get(1));
        let categories: HashSet<&str> = subjects.iter().map(|s| s["category"].as_str().unwrap()).collect();
        match item.record.category {
            Some(c) => assert_eq!(categories, HashSet::from([c.as_str()])),
            None => assert!(categories.len() > 1),
        }
        for s in subjects {
            assert!(
                item.record.prompt.contains(s["description"].as_str().unwrap()),
                "{}",
                item.record.prompt
            );
        }
    }
}

#[test]
fn the_stored_scene_re_renders_the_winner_exactly() {
    for negatives in [NegativeSource::Perturbed, NegativeSource::Augmented] {
        for item in synthesize(&cfg(12, SubjectCount::Mixed, negatives)).unwrap() {
            let scene = Scene::from_meta(&item.record.meta).expect("scene in meta");
            let (image, masks) = render_scene(&scene, 64);
            assert_eq!(image, item.winner, "{}", item.record.id);
            assert_eq!(masks, item.masks, "{}", item.record.id);
            assert_eq!(scene.prompt(), item.record.prompt);
            for (s, r) in scene.subjects.iter().zip(&item.references) {
                assert_eq!(&render_reference(&s.identity, 64), r);
            }
        }
    }
}

#[test]
fn references_are_centred_on_the_neutral_background() {
    for identity in Identity::all().into_iter().step_by(7) {
        let r = render_reference(&identity, 64);
        for (x, y) in [(0, 0), (63, 0), (0, 63), (63, 63), (32, 1)] {
            assert_eq!(
                r.get_pixel(x, y).0,
                REFERENCE_BACKGROUND,
                "{} at ({x}, {y})",
                identity.key()
            );
        }
        let (_, masks) = render_scene(&reference_scene(&identity), 64);
        assert!(masks[0].get_pixel(32, 32).0[0] == 255 || identity.shape == Shape::Ring);
    }
}

#[test]
fn identity_descriptions_are_unique() {
    let descriptions: HashSet<String> = Identity::all().into_iter().map(Identity::describe).collect();
    assert_eq!(descriptions.len(), Identity::COUNT);
    const { assert!(Identity::COUNT >= 6 * 8 * 5) };
}

#[test]
fn rendering_odd_scenes_does_not_panic() {
    let identity = Identity::from_id(0).unwrap();
    let subject = |centre: [f64; 2], scale: f64| PlacedSubject {
        identity,
        centre,
        scale,
        mirror: true,
    };
    let scene = Scene {
        background: Background::Stripes {
            a: [0, 0, 0],
            b: [255, 255, 255],
            angle_deg: f64::NAN,
            period: 0.0,
        },
        lighting: Lighting {
            brightness: f64::INFINITY,
            tint: [f64::NAN, -1.0, 1e30],
        },
        subjects: vec![
            subject([f64::NAN, 0.5], 0.3),
            subject([0.5, 0.5], f64::INFINITY),
            subject([-3.0, 7.0], 0.5),
            subject([0.0, 1.0], 5.0),
            subject([0.5, 0.5], 0.0),
            subject([0.5, 0.5], -1.0),
        ],
    };
    for size in [0, 1, 2, 17, 64] {
        let (image, masks) = render_scene(&scene, size);
        assert_eq!(image.dimensions(), (size, size));
        assert_eq!(masks.len(), 6);
    }
    for bg in [
        Background::Noise {
            base: [1, 2, 3],
            accent: [4, 5, 6],
            cell: 0.0,
            seed: 7,
        },
        Background::Tiles {
            a: [1, 2, 3],
            b: [4, 5, 6],
            cell: -1.0,
        },
        Background::Radial {
            inner: [1, 2, 3],
            outer: [4, 5, 6],
            centre: [f64::NAN; 2],
            radius: 0.0,
        },
        Background::Horizon {
            sky: [1, 2, 3],
            ground: [4, 5, 6],
            horizon: 1.0,
        },
    ] {
        let scene = Scene {
            background: bg,
            lighting: Lighting::NEUTRAL,
            subjects: vec![],
        };
        assert_eq!(render_scene(&scene, 16).0.dimensions(), (16, 16));
    }
}

#[test]
fn bad_configs_are_rejected() {
    let base = SynthConfig::default();
    for (c, field) in [
        (
            SynthConfig {
                items: 0,
                ..base.clone()
            },
            "items",
        ),
        (
            SynthConfig {
                items: MAX_ITEMS + 1,
                ..base.clone()
            },
            "items",
        ),
        (
            SynthConfig {
                size_px: 0,
                ..base.clone()
            },
            "size_px",
        ),
        (
            SynthConfig {
                size_px: 16,
                ..base.clone()
            },
            "size_px",
        ),
        (
            SynthConfig {
                size_px: 40,
                ..base.clone()
            },
            "size_px",
        ),
        (
            SynthConfig {
                size_px: 1040,
                ..base.clone()
            },
            "size_px",
        ),
        (
            SynthConfig {
                size_px: u32::MAX,
                ..base.clone()
            },
            "size_px",
        ),
    ] {
        match synthesize(&c) {
            Err(DipError::BadSynthConfig { field: f, .. }) => assert_eq!(f, field, "{c:?}"),
            other => panic!("{c:?}: {:?}", other.map(|v| v.len())),
        }
    }
    for size_px in [32, 48, 1024] {
        assert!(
            SynthConfig {
                size_px,
                ..base.clone()
            }
            .validate()
            .is_ok()
        );
    }
    assert!(
        SynthConfig {
            items: MAX_ITEMS,
            ..base
        }
        .validate()
        .is_ok()
    );
}

#[test]
fn write_dataset_round_trips_through_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("notes.txt"), "keep me").unwrap();
    let items = synthesize(&cfg(6, SubjectCount::Mixed, NegativeSource::OtherSubject)).unwrap();
    write_dataset(&root, &items).unwrap();
    // Writing again overwrites in place.
    write_dataset(&root, &items).unwrap();

    assert_eq!(std::fs::read_to_string(root.join("notes.txt")).unwrap(), "keep me");
    let manifest = root.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest).unwrap();
    let parsed = parse_manifest(&manifest, &text);
    assert!(parsed.line_errors.is_empty(), "{:?}", parsed.line_errors);
    let records: Vec<_> = parsed.entries.into_iter().map(|e| e.record).collect();
    let expected: Vec<_> = items.iter().map(|i| i.record.clone()).collect();
    assert_eq!(records, expected);

    for item in &items {
        let r = &item.record;
        let winner = image::open(root.join(&r.winner)).unwrap().to_rgb8();
        assert_eq!(winner, item.winner);
        let loser = image::open(root.join(&r.loser)).unwrap().to_rgb8();
        assert_eq!(loser, item.loser);
        for (path, reference) in r.references.iter().zip(&item.references) {
            assert_eq!(&image::open(root.join(path)).unwrap().to_rgb8(), reference);
        }
        for (path, mask) in r.masks.iter().zip(&item.masks) {
            let decoded = image::open(root.join(path)).unwrap();
            assert_eq!(decoded.color(), image::ColorType::L8);
            assert_eq!(&decoded.to_luma8(), mask);
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn write_dataset_refuses_paths_outside_the_folder_and_inconsistent_items() {
    let dir = tempfile::tempdir().unwrap();
    let mut items = synthesize(&cfg(1, SubjectCount::One, NegativeSource::Perturbed)).unwrap();
    items[0].record.winner = "../escape.png".into();
    assert!(matches!(write_dataset(dir.path(), &items), Err(DipError::Io { .. })));
    assert!(!dir.path().join(MANIFEST_FILE).exists());
    items[0].record.winner = "winner/ok.png".into();
    items[0].masks.clear();
    assert!(matches!(write_dataset(dir.path(), &items), Err(DipError::Io { .. })));
    assert!(!dir.path().join(MANIFEST_FILE).exists());
}

#[test]
fn meta_records_the_ground_truth() {
    let item = &synthesize(&cfg(1, SubjectCount::Two, NegativeSource::Perturbed)).unwrap()[0];
    let meta = &item.record.meta;
    assert_eq!(meta["generator"], GENERATOR);
    assert_eq!(meta["version"], GENERATOR_VERSION);
    assert_eq!(meta["seed"], 0);
    assert_eq!(meta["index"], 0);
    assert_eq!(item.record.id, "synth-0000");
    for (s, mask) in meta["subjects"].as_array().unwrap().iter().zip(&item.masks) {
        let identity = Identity::from_id(s["identity"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(s["key"], Value::from(identity.key()));
        let area = mask.as_raw().iter().filter(|&&v| v != 0).count();
        assert_eq!(s["mask_pixels"].as_u64().unwrap() as usize, area);
        let category: Category = serde_json::from_value(s["category"].clone()).unwrap();
        assert_eq!(category, identity.category());
    }
    assert!(meta["background"].is_string());
    assert!(meta["lighting"]["brightness"].is_number());
}

#[test]
fn written_datasets_pass_the_checker_without_problems() {
    for negatives in [
        NegativeSource::Perturbed,
        NegativeSource::OtherSubject,
        NegativeSource::Augmented,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let items = synthesize(&cfg(10, SubjectCount::Mixed, negatives)).unwrap();
        write_dataset(dir.path(), &items).unwrap();
        let report = crate::dip::check::check_dataset(dir.path()).unwrap();
        assert!(report.problems.is_empty(), "{negatives:?}: {:?}", report.problems);
        assert_eq!(report.valid_items, 10);
    }
}
