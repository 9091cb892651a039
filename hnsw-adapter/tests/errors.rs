//! Refusals: backpressure instead of unaccounted inserts, NoRoom instead of over-budget
//! loads, Corrupt instead of a panic on damaged dumps, typed errors on bad input.

mod common;

use common::{DIM, governor, params, populate, seg, vectors};
use governor_core::{EngineId, mib};
use hnsw_adapter::{GovernedHnsw, HnswCache, HnswError, HnswParams, SegmentId};

#[test]
fn insert_without_room_is_backpressure_and_allocates_nothing() {
    let limit = mib(1);
    let gov = governor(limit, mib(64));
    let index = GovernedHnsw::create(&gov, seg(0), params(100)).unwrap();
    let data = vectors(2_000, 1);
    let mut refused = None;
    for (i, v) in data.iter().enumerate() {
        match index.insert(i, v) {
            Ok(()) => assert!(gov.reserved(EngineId::Vector) <= limit),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, err) = refused.expect("a 1 MiB budget cannot hold 2000 points");
    assert!(matches!(err, HnswError::Backpressure { .. }), "{err}");
    assert!(err.is_backpressure());
    assert_eq!(index.len(), at, "the refused point was not inserted");
    assert_eq!(gov.reserved(EngineId::Vector), index.charged_bytes());
    // Searching what is there still works.
    assert_eq!(index.search(&data[0], 1, 16).unwrap()[0].id, 0);
    drop(index);
    assert_eq!(gov.reserved(EngineId::Vector), 0);
}

#[test]
fn cache_insert_evicts_cold_segments_before_refusing() {
    let dir = tempfile::tempdir().unwrap();
    let gov = governor(mib(8), mib(64));
    let cache = HnswCache::builder(gov.clone(), dir.path())
        .params(params(500))
        .build()
        .unwrap();
    populate(&cache, 3, 500);
    let resident_before = cache.stats().resident_segments;
    assert_eq!(resident_before, 3);
    let hot = SegmentId::new("hot", 0).unwrap();
    cache.create_segment(&hot).unwrap();
    let mut inserted = 0;
    let err = loop {
        let v = &vectors(1, 10_000 + inserted as u64)[0];
        match cache.insert(&hot, inserted, v) {
            Ok(()) => inserted += 1,
            Err(e) => break e,
        }
        assert!(gov.reserved(EngineId::Vector) <= mib(8));
    };
    assert!(matches!(err, HnswError::Backpressure { .. }), "{err}");
    let stats = cache.stats();
    assert!(
        stats.evictions >= 3,
        "cold segments were evicted first: {stats:?}"
    );
    assert_eq!(stats.resident_segments, 1);
    assert!(stats.denials >= 1);
    // The evicted segments were persisted and still answer.
    let q = &vectors(1, 1000)[0];
    assert!(
        !cache
            .search(&seg(0), q, 3, 16)
            .is_err_and(|e| !e.is_backpressure())
    );
}

#[test]
fn load_that_cannot_fit_is_no_room_and_pinned_are_not_evicted_for_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov, dir.path())
            .params(params(800))
            .build()
            .unwrap();
        populate(&cache, 3, 800);
    }
    // Room for about one and a half loaded segments.
    let one = {
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov, dir.path()).build().unwrap();
        cache.search(&seg(0), &vectors(1, 2)[0], 1, 8).unwrap();
        cache.stats().resident_bytes
    };
    let limit = one * 3 / 2 + one / 2;
    let gov = governor(limit, mib(128));
    let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
    cache.pin(&seg(0)).unwrap();
    let q = &vectors(1, 3)[0];
    let err = cache.search(&seg(1), q, 5, 16).unwrap_err();
    match &err {
        HnswError::NoRoom { needed, pinned, .. } => {
            assert!(*needed > limit - pinned);
            assert_eq!(*pinned, one);
        }
        other => panic!("expected NoRoom, got {other}"),
    }
    assert!(
        cache.is_resident(&seg(0)),
        "the pinned segment was not sacrificed"
    );
    assert_eq!(gov.reserved(EngineId::Vector), one);
    // Unpinning makes room: the load evicts it and succeeds.
    cache.unpin(&seg(0)).unwrap();
    assert!(!cache.search(&seg(1), q, 5, 16).unwrap().is_empty());
    assert!(!cache.is_resident(&seg(0)));
    assert!(gov.reserved(EngineId::Vector) <= limit);
}

#[test]
fn damaged_dump_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov, dir.path())
            .params(params(300))
            .build()
            .unwrap();
        populate(&cache, 1, 300);
    }
    let graph = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".hnsw.graph"))
        .unwrap();
    let mut bytes = std::fs::read(&graph).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&graph, bytes).unwrap();
    let gov = governor(mib(64), mib(128));
    let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
    let err = cache.search(&seg(0), &vectors(1, 1)[0], 3, 16).unwrap_err();
    assert!(matches!(err, HnswError::Corrupt { .. }), "{err}");
    assert_eq!(
        gov.reserved(EngineId::Vector),
        0,
        "the load's reservation was returned"
    );

    // A manifest that is not even JSON: the segment is listed as damaged, not loaded.
    std::fs::write(dir.path().join("docs.0.manifest.json"), b"{ not json").unwrap();
    // With settings for new segments given, the cache can also create segments.
    let cache = HnswCache::builder(gov, dir.path())
        .params(params(300))
        .build()
        .unwrap();
    let err = cache.search(&seg(0), &vectors(1, 1)[0], 3, 16).unwrap_err();
    assert!(
        matches!(&err, HnswError::Corrupt { segment, .. } if *segment == seg(0)),
        "{err}"
    );
    assert_eq!(cache.damaged().len(), 1);
}

/// A directory whose only manifest is damaged is not an empty directory: without `params`
/// it still builds, lists the damage and refuses only what needs the settings (creating a
/// segment), with an error that says the only manifests are damaged and names them. A
/// directory that also holds a sound manifest takes the settings from it and serves it.
#[test]
fn a_directory_whose_only_manifests_are_damaged_builds_without_params() {
    let dir = tempfile::tempdir().unwrap();
    {
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov, dir.path())
            .params(params(300))
            .build()
            .unwrap();
        populate(&cache, 2, 300);
    }
    let sound = std::fs::read(dir.path().join("docs.1.manifest.json")).unwrap();
    std::fs::remove_file(dir.path().join("docs.1.manifest.json")).unwrap();
    let damaged = dir.path().join("docs.0.manifest.json");
    std::fs::write(&damaged, b"{ not json").unwrap();

    let gov = governor(mib(64), mib(128));
    let cache = HnswCache::builder(gov.clone(), dir.path())
        .build()
        .expect("a damaged manifest does not fail the build");
    let listed = cache.damaged();
    assert!(
        matches!(listed.as_slice(), [HnswError::Corrupt { segment, path, .. }]
            if *segment == seg(0) && *path == damaged),
        "{listed:?}"
    );
    assert!(
        cache.params().is_none(),
        "no sound manifest to take them from"
    );
    let q = vectors(1, 1).pop().unwrap();
    assert!(matches!(
        cache.search(&seg(0), &q, 3, 16),
        Err(HnswError::Corrupt { .. })
    ));
    let err = cache.create_segment(&seg(7)).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            HnswError::InvalidConfig {
                field: "params",
                ..
            }
        ),
        "{err}"
    );
    assert!(message.contains("only manifests"), "{message}");
    assert!(message.contains("damaged"), "{message}");
    assert!(
        message.contains(&damaged.display().to_string()),
        "{message}"
    );
    assert!(!message.contains("empty"), "{message}");
    assert_eq!(gov.reserved(EngineId::Vector), 0, "nothing booked");
    drop(cache);
    assert_eq!(
        std::fs::read(&damaged).unwrap(),
        b"{ not json",
        "evidence kept"
    );

    // With a sound manifest beside the damaged one: its settings, its segment served.
    std::fs::write(dir.path().join("docs.1.manifest.json"), sound).unwrap();
    let cache = HnswCache::builder(gov, dir.path()).build().unwrap();
    assert_eq!(cache.damaged().len(), 1);
    assert_eq!(cache.params(), Some(&params(300)));
    assert!(!cache.search(&seg(1), &q, 3, 16).unwrap().is_empty());
    cache.create_segment(&seg(7)).unwrap();

    // A directory with no manifest at all still needs the settings, and says so.
    let empty = tempfile::tempdir().unwrap();
    let err = HnswCache::builder(governor(mib(64), mib(128)), empty.path())
        .build()
        .err()
        .expect("an empty directory needs params");
    assert!(err.to_string().contains("empty"), "{err}");
}

/// Sets a manifest field wherever the format keeps it (the old format at the top level,
/// the checksummed one under `manifest`).
fn set_field(v: &mut serde_json::Value, key: &str, value: serde_json::Value) {
    match v.get_mut("manifest") {
        Some(body) => body[key] = value,
        None => v[key] = value,
    }
}

/// The manifest as the old, unchecksummed format 1 wrote it: the fields at the top level.
fn old_format(current: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(current).unwrap();
    let mut body = v.get("manifest").cloned().unwrap_or(v);
    body["format"] = 1.into();
    body
}

/// A manifest's figures decide what a load reserves and books, so they are checked, never
/// trusted: a damaged or lying one is a typed error naming the file (never a panic, never a
/// segment booked at a byte), and every other segment is still served. An old,
/// unchecksummed manifest still loads, booked at what the graph measures.
#[test]
fn damaged_or_lying_manifests_are_corrupt_and_lose_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    {
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov, dir.path())
            .params(params(300))
            .build()
            .unwrap();
        populate(&cache, 3, 300);
    }
    let path = dir.path().join("docs.0.manifest.json");
    let original = std::fs::read(&path).unwrap();
    let q = vectors(1, 3).pop().unwrap();
    // What segment 0 really takes once loaded.
    let clean = {
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
        cache.search(&seg(0), &q, 3, 16).unwrap();
        gov.reserved(EngineId::Vector)
    };
    assert!(clean > 100_000, "fixture: a real segment ({clean} B)");
    let write = |v: &serde_json::Value| {
        let bytes = serde_json::to_vec_pretty(v).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        bytes
    };

    let expect_corrupt = |what: &str, v: serde_json::Value| {
        let written = write(&v);
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
        let damaged = cache.damaged();
        assert_eq!(damaged.len(), 1, "{what}: {damaged:?}");
        let err = cache.search(&seg(0), &q, 3, 16).unwrap_err();
        assert!(
            matches!(&err, HnswError::Corrupt { segment, path: p, .. }
                if *segment == seg(0) && *p == path),
            "{what}: {err}"
        );
        assert_eq!(gov.reserved(EngineId::Vector), 0, "{what}: nothing booked");
        assert!(
            !cache.search(&seg(1), &q, 3, 16).unwrap().is_empty(),
            "{what}: the other segments are still served"
        );
        assert!(
            matches!(cache.search_all(&q, 3, 16), Err(HnswError::Corrupt { .. })),
            "{what}: no silently partial answer"
        );
        assert!(
            matches!(
                cache.create_segment(&seg(0)),
                Err(HnswError::SegmentExists(_))
            ),
            "{what}: the damaged segment's id stays taken"
        );
        drop(cache);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            written,
            "{what}: the evidence is kept as found"
        );
    };

    // Current format, a figure edited without its checksum: 1 byte, and usize::MAX.
    for (what, bytes) in [("one byte", 1), ("usize::MAX", usize::MAX)] {
        let mut v: serde_json::Value = serde_json::from_slice(&original).unwrap();
        set_field(&mut v, "resident_bytes", bytes.into());
        expect_corrupt(what, v);
    }
    // Old format (no checksum): figures no graph of its shape can take.
    for (what, key, bytes) in [
        ("old format, one byte", "resident_bytes", 1),
        ("old format, usize::MAX", "resident_bytes", usize::MAX),
        (
            "old format, load peak usize::MAX",
            "load_transient_bytes",
            usize::MAX,
        ),
    ] {
        let mut v = old_format(&original);
        v[key] = bytes.into();
        expect_corrupt(what, v);
    }

    // Old format, as the old code wrote it, and with a plausible but low figure: both load,
    // booked at what the graph measures, and the manifest is rewritten checksummed.
    let body = old_format(&original);
    let dim = body["dim"].as_u64().unwrap() as usize;
    let m = body["max_connections"].as_u64().unwrap() as usize;
    let mut layers = [0usize; hnsw_adapter::layout::NB_LAYER_MAX];
    for (l, n) in body["layer_len"].as_array().unwrap().iter().enumerate() {
        layers[l] = n.as_u64().unwrap() as usize;
    }
    let ((least, _), _) = hnsw_adapter::layout::loaded_bounds(dim, m, &layers).unwrap();
    assert!(least < clean);
    for (what, figure) in [
        ("old format", None),
        ("old format, low figure", Some(least)),
    ] {
        let mut v = old_format(&original);
        if let Some(f) = figure {
            v["resident_bytes"] = f.into();
        }
        write(&v);
        let gov = governor(mib(64), mib(128));
        let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
        assert!(cache.damaged().is_empty(), "{what}");
        assert!(!cache.search(&seg(0), &q, 3, 16).unwrap().is_empty());
        assert_eq!(
            gov.reserved(EngineId::Vector),
            clean,
            "{what}: booked as measured"
        );
        let upgraded = hnsw_adapter::SegmentManifest::read(&path).unwrap();
        assert!(upgraded.is_checksummed(), "{what}");
        assert_eq!(upgraded.resident_bytes(), clean, "{what}");
    }
}

#[test]
fn bad_input_gets_typed_errors() {
    let gov = governor(mib(16), mib(64));
    assert!(matches!(
        SegmentId::new("../etc", 0),
        Err(HnswError::InvalidConfig { .. })
    ));
    assert!(matches!(
        SegmentId::new("", 0),
        Err(HnswError::InvalidConfig { .. })
    ));
    for bad in [
        HnswParams::new(0),
        HnswParams::new(8).max_connections(1),
        HnswParams::new(8).max_connections(300),
        HnswParams::new(8).ef_construction(0),
        HnswParams::new(8).max_layer(17),
        HnswParams::new(usize::MAX),
    ] {
        assert!(matches!(
            GovernedHnsw::create(&gov, seg(0), bad),
            Err(HnswError::InvalidConfig { .. })
        ));
    }
    let index = GovernedHnsw::create(&gov, seg(0), params(10)).unwrap();
    assert!(matches!(
        index.insert(1, &[0.0; 3]),
        Err(HnswError::DimensionMismatch {
            expected: DIM,
            got: 3,
            ..
        })
    ));
    let mut nan = vec![0.0; DIM];
    nan[5] = f32::NAN;
    assert!(matches!(
        index.insert(1, &nan),
        Err(HnswError::NonFinite { position: 5, .. })
    ));
    assert!(matches!(
        index.search(&nan, 3, 8),
        Err(HnswError::NonFinite { .. })
    ));
    assert!(
        index.search(&[0.0; DIM], 3, 8).unwrap().is_empty(),
        "empty index, no hits"
    );
    assert!(index.search(&[0.0; DIM], 0, 8).unwrap().is_empty());

    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        HnswCache::builder(gov.clone(), dir.path()).build(),
        Err(HnswError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    let cache = HnswCache::builder(gov, dir.path())
        .params(params(10))
        .build()
        .unwrap();
    assert!(matches!(
        cache.search(&seg(7), &[0.0; DIM], 1, 8),
        Err(HnswError::UnknownSegment(_))
    ));
    cache.create_segment(&seg(7)).unwrap();
    assert!(matches!(
        cache.create_segment(&seg(7)),
        Err(HnswError::SegmentExists(_))
    ));
    // An empty segment persists and comes back empty.
    cache.persist(&seg(7)).unwrap();
    assert!(cache.evict(&seg(7)).unwrap() > 0);
    assert!(cache.search(&seg(7), &[0.0; DIM], 1, 8).unwrap().is_empty());
    cache.insert(&seg(7), 42, &[0.5; DIM]).unwrap();
    assert_eq!(cache.search(&seg(7), &[0.5; DIM], 1, 8).unwrap()[0].id, 42);
}

#[test]
fn dropping_the_cache_persists_changed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let gov = governor(mib(64), mib(128));
    {
        let cache = HnswCache::builder(gov.clone(), dir.path())
            .params(params(50))
            .build()
            .unwrap();
        cache.create_segment(&seg(0)).unwrap();
        for (i, v) in vectors(50, 8).iter().enumerate() {
            cache.insert(&seg(0), i, v).unwrap();
        }
        // No persist: the drop must do it.
    }
    assert_eq!(gov.reserved(EngineId::Vector), 0);
    let cache = HnswCache::builder(gov, dir.path()).build().unwrap();
    let v = &vectors(50, 8)[17];
    assert_eq!(cache.search(&seg(0), v, 1, 16).unwrap()[0].id, 17);
}
