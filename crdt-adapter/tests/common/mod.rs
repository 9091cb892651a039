//! Shared documents and setup for the document store tests.

#![allow(dead_code)]

use std::sync::Arc;

use crdt_adapter::loro::{ExportMode, LoroDoc};
use governor_core::{EngineId, MemoryGovernor, mib};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The kinds of documents the byte model is calibrated on.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Characters typed one at a time at random places, some deleted.
    Text,
    /// Map writes of random-letter values from 1 B to 1 KiB, many overwrites.
    Map,
    /// List pushes of numbers and short strings.
    List,
}

pub const KINDS: [Kind; 3] = [Kind::Text, Kind::Map, Kind::List];

/// Applies `n` edits of `kind` to `doc` from `seed`, committing every 20.
pub fn edit(doc: &LoroDoc, kind: Kind, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    match kind {
        Kind::Text => {
            let text = doc.get_text("body");
            for i in 0..n {
                let len = text.len_unicode();
                if len > 10 && rng.random_bool(0.2) {
                    let at = rng.random_range(0..len - 1);
                    text.delete(at, 1).unwrap();
                } else {
                    let at = rng.random_range(0..=len);
                    let c = char::from(b'a' + rng.random_range(0..26u8));
                    text.insert(at, &c.to_string()).unwrap();
                }
                if i % 20 == 19 {
                    doc.commit();
                }
            }
        }
        Kind::Map => {
            let map = doc.get_map("fields");
            for i in 0..n {
                let key = format!("k{}", rng.random_range(0..200));
                let len = rng.random_range(1..1024);
                let value: String = (0..len)
                    .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                    .collect();
                map.insert(&key, value).unwrap();
                if i % 20 == 19 {
                    doc.commit();
                }
            }
        }
        Kind::List => {
            let list = doc.get_list("items");
            for i in 0..n {
                if rng.random_bool(0.5) {
                    list.push(rng.random_range(0..1_000_000i64)).unwrap();
                } else {
                    list.push(format!("item-{i}")).unwrap();
                }
                if i % 20 == 19 {
                    doc.commit();
                }
            }
        }
    }
    doc.commit();
}

/// A document of `kind` with `n` edits, as update bytes a peer would send.
pub fn peer_updates(kind: Kind, n: usize, seed: u64) -> Vec<u8> {
    let doc = LoroDoc::new();
    doc.set_peer_id(seed).unwrap();
    edit(&doc, kind, n, seed);
    doc.export(ExportMode::all_updates()).unwrap()
}

/// A governor with a Crdt budget of `limit`.
pub fn governor(limit: usize) -> Arc<MemoryGovernor> {
    governed_blocks::testing::governor(EngineId::Crdt, limit, mib(1024))
}
