//! The Sparse and Crdt engines' share of the mixed workload: posting ingest with checked
//! top-k searches, and document edits with merged remote updates, each on its own engine's
//! runtime and budget.
//!
//! Both parts check their answers, not only that they came: a sparse search's top-k must
//! equal a brute-force scan of every document inserted so far (the same dot products, bit
//! for bit, in the same order), and every document must read back, after the run, exactly
//! what its local edits and its remote peer wrote. Nothing is kept to check against: the
//! corpus, the queries and the edits are pure functions of their numbers
//! ([`crate::workload`]'s splitmix generator), so the reference costs CPU, not memory in
//! the engine's arena.
//!
//! A refusal for lack of memory (an insert or an update refused, a document that cannot be
//! loaded yet) is backpressure: the work waits and retries, as the other engines' parts do.
//! Any other error, and any wrong answer, fails the run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crdt_adapter::loro::{ExportMode, LoroDoc, LoroValue};
use crdt_adapter::{CrdtError, DocStore};
use governor_core::MemoryGovernor;
use sparse_adapter::{DocId, Hit, SparseError, SparseIndex, SparseVector, TermId};

use crate::workload::mix;

/// Attempts of one refused operation before the run gives up on it (with the 10 ms pause
/// between them, two seconds of a budget that never frees).
const RETRIES: usize = 200;
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Sizes of the Sparse engine's part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseWork {
    /// Documents inserted.
    pub docs: u64,
    /// Vocabulary terms (drawn with a skew towards low ids: a few long posting lists).
    pub vocabulary: u32,
    /// Terms per document.
    pub terms_per_doc: usize,
    /// Top-k searches, spread over the ingest.
    pub searches: usize,
    /// The k of each search.
    pub k: usize,
    /// Inserts between commits (each commit merges the buffer into the store).
    pub commit_every: u64,
    /// Bytes of redb's page cache.
    pub store_cache_bytes: usize,
    /// Buffered bytes that start a flush.
    pub flush_bytes: usize,
}

/// What the Sparse part did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SparseOutcome {
    /// Documents inserted (and committed at the end).
    pub inserted: u64,
    /// Searches whose top-k equalled the brute-force top-k.
    pub searches_checked: usize,
    /// Inserts and searches refused for lack of memory and retried.
    pub refusals: usize,
    /// Posting-block lookups that missed the cache and read the store.
    pub block_misses: u64,
    /// Posting blocks evicted from the cache.
    pub block_evictions: u64,
}

/// Sizes of the Crdt engine's part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrdtWork {
    /// Documents.
    pub docs: u64,
    /// Rounds: each makes one local edit of a document (mostly of a hot quarter) and merges
    /// one update of the same document from the remote peer.
    pub rounds: u64,
    /// Rounds between commits.
    pub commit_every: u64,
    /// Bytes of redb's page cache.
    pub store_cache_bytes: usize,
    /// Buffered update bytes that start a flush.
    pub flush_bytes: usize,
}

/// What the Crdt part did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrdtOutcome {
    /// Local edits made.
    pub edits: u64,
    /// Remote updates merged.
    pub merges: u64,
    /// Documents read back equal to what was written.
    pub docs_verified: u64,
    /// Operations refused for lack of memory and retried.
    pub refusals: usize,
    /// Documents evicted (snapshotted when changed) during the run.
    pub evictions: u64,
}

/// Retries `op` while it fails with an error `backpressure` says is a refusal for lack of
/// memory, counting each in `refusals`; any other error, or too many refusals, ends it with
/// `what` and the error.
async fn with_retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    refusals: &mut usize,
    what: impl Fn() -> String,
    backpressure: fn(&E) -> bool,
    mut op: impl FnMut() -> F,
) -> Result<T, String> {
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if backpressure(&e) && attempt < RETRIES => {
                attempt += 1;
                *refusals += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => return Err(format!("{}: {e}", what())),
        }
    }
}

// --- Sparse -------------------------------------------------------------------------------

/// Document `doc`'s terms: `terms_per_doc` distinct vocabulary terms, the square of a
/// uniform draw so low ids are frequent, weights in [0.05, 1.05).
fn sparse_doc(work: &SparseWork, doc: DocId) -> SparseVector {
    let mut terms: Vec<(TermId, f32)> = Vec::with_capacity(work.terms_per_doc);
    let mut draw = 0u64;
    while terms.len() < work.terms_per_doc.min(work.vocabulary as usize) {
        let u = unit(mix(doc.wrapping_mul(1_000_003).wrapping_add(draw)));
        draw += 1;
        let term = ((u * u) * work.vocabulary as f32) as TermId % work.vocabulary;
        if !terms.iter().any(|&(t, _)| t == term) {
            let weight = 0.05 + unit(mix(doc ^ (u64::from(term) << 32)));
            terms.push((term, weight));
        }
    }
    SparseVector::new(terms).expect("generated vectors are valid")
}

/// Query `q`: 2..6 vocabulary terms with the corpus's skew, so searches read the long
/// posting lists (many blocks: the cache must load and evict) as well as short ones.
fn sparse_query(work: &SparseWork, q: usize) -> SparseVector {
    let want = 2 + (mix(q as u64 ^ 0xABCD) % 5) as usize;
    let mut terms: Vec<(TermId, f32)> = Vec::with_capacity(want);
    let mut draw = 0u64;
    while terms.len() < want.min(work.vocabulary as usize) {
        let u = unit(mix(((q as u64) << 20) | draw));
        let term = ((u * u) * work.vocabulary as f32) as TermId % work.vocabulary;
        draw += 1;
        if !terms.iter().any(|&(t, _)| t == term) {
            terms.push((term, 0.1 + 2.0 * unit(mix(draw ^ ((q as u64) << 8)))));
        }
    }
    SparseVector::new(terms).expect("generated queries are valid")
}

/// The top-k by scanning every document below `docs`: each score summed over the query's
/// terms in the query's order, as the index sums them, so equal answers are equal bit for
/// bit; ties by document id.
fn brute_force_top_k(work: &SparseWork, docs: DocId, query: &SparseVector) -> Vec<Hit> {
    let mut hits: Vec<Hit> = (0..docs)
        .filter_map(|doc| {
            let v = sparse_doc(work, doc);
            let mut score = 0.0f32;
            let mut matched = false;
            for &(term, qw) in query.terms() {
                if let Some(w) = v.weight(term) {
                    score += qw * w;
                    matched = true;
                }
            }
            matched.then_some(Hit { doc, score })
        })
        .collect();
    hits.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.doc.cmp(&b.doc)));
    hits.truncate(work.k);
    hits
}

/// Ingests the corpus into a governed sparse index in `dir`, running searches between
/// inserts (some see buffered documents, some only stored ones) and checking each against
/// the brute-force top-k over every document inserted so far.
///
/// Run it on the Sparse engine's runtime: the index's pressure watcher and buffer flushes
/// run on the current runtime.
pub async fn sparse_ingest_and_search(
    governor: Arc<MemoryGovernor>,
    work: SparseWork,
    dir: &Path,
    progress: &AtomicUsize,
    flushes: &AtomicU64,
) -> Result<SparseOutcome, String> {
    let mut tally = crate::progress::FlushTally::new(flushes);
    let index = SparseIndex::builder(governor, dir.join("sparse.redb"))
        .store_cache_bytes(work.store_cache_bytes)
        .flush_bytes(work.flush_bytes)
        .open()
        .map_err(|e| format!("opening the index: {e}"))?;
    let _watcher = index.spawn_pressure_watcher().map_err(|e| e.to_string())?;
    let mut outcome = SparseOutcome::default();
    // A search after every `search_every` inserts, the last one after the final commit.
    let search_every = (work.docs / work.searches.max(1) as u64).max(1);
    let mut q = 0;
    for doc in 0..work.docs {
        with_retry(
            &mut outcome.refusals,
            || format!("insert of document {doc}"),
            |e| matches!(e, SparseError::Refused { .. }),
            || index.insert(doc, sparse_doc(&work, doc)),
        )
        .await?;
        outcome.inserted += 1;
        progress.store(outcome.inserted as usize, Ordering::Release);
        tally.note(index.buffer_stats().flushes);
        if (doc + 1).is_multiple_of(work.commit_every) {
            index.commit().await.map_err(|e| format!("commit: {e}"))?;
        }
        if (doc + 1).is_multiple_of(search_every) && q + 1 < work.searches {
            check_search(&index, &work, doc + 1, q, &mut outcome.refusals).await?;
            outcome.searches_checked += 1;
            q += 1;
        }
    }
    index.commit().await.map_err(|e| format!("commit: {e}"))?;
    // The rest, over the committed corpus.
    while q < work.searches {
        check_search(&index, &work, work.docs, q, &mut outcome.refusals).await?;
        outcome.searches_checked += 1;
        q += 1;
    }
    let cache = index.stats().map_err(|e| e.to_string())?.cache;
    outcome.block_misses = cache.misses;
    outcome.block_evictions = cache.evictions;
    Ok(outcome)
}

async fn check_search(
    index: &SparseIndex,
    work: &SparseWork,
    docs: DocId,
    q: usize,
    refusals: &mut usize,
) -> Result<(), String> {
    let query = sparse_query(work, q);
    // No room for a block this query needs while others hold the budget: wait, retry.
    let got = with_retry(
        refusals,
        || format!("search {q}"),
        |e| matches!(e, SparseError::Cache(_)),
        || std::future::ready(index.search(&query, work.k)),
    )
    .await?;
    let want = brute_force_top_k(work, docs, &query);
    if got != want {
        return Err(format!(
            "search {q} over {docs} documents: top-{} {:?} is not the brute-force {:?}",
            work.k,
            &got[..got.len().min(3)],
            &want[..want.len().min(3)]
        ));
    }
    Ok(())
}

// --- Crdt ---------------------------------------------------------------------------------

/// The document round `round` edits: three rounds in four go to the hottest quarter of the
/// documents, as an editor's users keep returning to a few open documents, the rest to any.
/// (A round-robin over more documents than fit would miss the cache on every access, the
/// one pattern no LRU helps.)
fn doc_of(docs: u64, round: u64) -> u64 {
    let r = mix(round ^ 0xD0C5);
    if r.is_multiple_of(4) {
        (r >> 2) % docs
    } else {
        (r >> 2) % (docs / 4).max(1)
    }
}

fn doc_id(d: u64) -> String {
    format!("doc-{d}")
}

/// What round `round`'s local edit appends to its document's `local` text.
fn local_entry(round: u64) -> String {
    format!("l{round};")
}

/// What round `round`'s remote update appends to its document's `remote_log` text.
fn remote_entry(round: u64) -> String {
    format!("r{round};")
}

/// The remote peer: one loro document per store document, edited as a second writer and
/// exported as the updates since its last export. It runs on its own thread, off the Crdt
/// engine's arena, as a peer across the network would.
struct RemotePeer {
    docs: Vec<LoroDoc>,
}

impl RemotePeer {
    fn new(docs: u64) -> Result<Self, String> {
        let docs = (0..docs)
            .map(|d| {
                let doc = LoroDoc::new();
                // Distinct from the store's own (random) peer ids in practice, and stable.
                doc.set_peer_id(0x5EED_0000 + d)
                    .map_err(|e| e.to_string())?;
                Ok(doc)
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { docs })
    }

    /// Round `round`'s update: the peer sets `remote[r<round>] = round` and appends to its
    /// own text, and exports what it did since its previous update of that document.
    fn update(&self, round: u64) -> Result<Vec<u8>, String> {
        let doc = &self.docs[doc_of(self.docs.len() as u64, round) as usize];
        let before = doc.oplog_vv();
        doc.get_map("remote")
            .insert(&format!("r{round}"), round as i64)
            .map_err(|e| e.to_string())?;
        let text = doc.get_text("remote_log");
        text.insert(text.len_unicode(), &remote_entry(round))
            .map_err(|e| e.to_string())?;
        doc.commit();
        doc.export(ExportMode::updates(&before))
            .map_err(|e| e.to_string())
    }
}

/// Whether `e` is the store saying there is no memory for this now (retry), rather than a
/// broken document or store (fail).
fn crdt_backpressure(e: &CrdtError) -> bool {
    matches!(e, CrdtError::Cache(_) | CrdtError::Refused { .. })
}

/// Creates the documents, then for each round makes a local edit and merges the remote
/// peer's update of the same document, committing every `commit_every` rounds; after the
/// run reads every document back and compares it with what was written.
///
/// Run it on the Crdt engine's runtime; the remote peer runs on a thread of its own.
pub async fn crdt_edit_and_merge(
    governor: Arc<MemoryGovernor>,
    work: CrdtWork,
    dir: &Path,
    progress: &AtomicUsize,
    flushes: &AtomicU64,
) -> Result<CrdtOutcome, String> {
    let mut tally = crate::progress::FlushTally::new(flushes);
    let store = DocStore::builder(governor, dir.join("docs.redb"))
        .store_cache_bytes(work.store_cache_bytes)
        .flush_bytes(work.flush_bytes)
        .open()
        .map_err(|e| format!("opening the store: {e}"))?;
    let _watcher = store.spawn_pressure_watcher().map_err(|e| e.to_string())?;
    for d in 0..work.docs {
        store
            .create(&doc_id(d))
            .map_err(|e| format!("create {}: {e}", doc_id(d)))?;
    }
    // The peer runs ahead by at most a few updates; its thread ends when the rounds do.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(16);
    let peer = {
        let (docs, rounds) = (work.docs, work.rounds);
        std::thread::Builder::new()
            .name("crdt-remote-peer".into())
            .spawn(move || {
                let peer = match RemotePeer::new(docs) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                };
                for round in 0..rounds {
                    if tx.blocking_send(peer.update(round)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("remote peer thread: {e}"))?
    };
    let mut outcome = CrdtOutcome::default();
    let mut refusals = 0;
    for round in 0..work.rounds {
        progress.store(round as usize, Ordering::Release);
        let id = doc_id(doc_of(work.docs, round));
        with_retry(
            &mut refusals,
            || format!("edit of {id} in round {round}"),
            crdt_backpressure,
            || {
                std::future::ready(store.edit(&id, |d| {
                    let text = d.get_text("local");
                    text.insert(text.len_unicode(), &local_entry(round))
                }))
            },
        )
        .await?
        .map_err(|e| format!("edit of {id} in round {round}: {e}"))?;
        outcome.edits += 1;
        let update = rx.recv().await.ok_or("the remote peer stopped early")??;
        with_retry(
            &mut refusals,
            || format!("merge into {id} in round {round}"),
            crdt_backpressure,
            || store.receive(&id, update.clone()),
        )
        .await?;
        outcome.merges += 1;
        tally.note(store.stats().buffer.flushes);
        if (round + 1).is_multiple_of(work.commit_every) {
            store.commit().await.map_err(|e| format!("commit: {e}"))?;
        }
    }
    store.commit().await.map_err(|e| format!("commit: {e}"))?;
    peer.join().map_err(|_| "the remote peer panicked")?;
    for d in 0..work.docs {
        let id = doc_id(d);
        let value = with_retry(
            &mut refusals,
            || format!("reading {id} back"),
            crdt_backpressure,
            || std::future::ready(store.value(&id)),
        )
        .await?;
        check_document(&work, d, &value)?;
        outcome.docs_verified += 1;
    }
    outcome.refusals = refusals;
    outcome.evictions = store.stats().cache.evictions;
    Ok(outcome)
}

/// Document `d` holds exactly its rounds' local entries in order, the peer's entries in
/// order, and the peer's map with one key per round.
fn check_document(work: &CrdtWork, d: u64, value: &LoroValue) -> Result<(), String> {
    let id = doc_id(d);
    let rounds = (0..work.rounds).filter(|&r| doc_of(work.docs, r) == d);
    let count = rounds.clone().count();
    let want_local: String = rounds.clone().map(local_entry).collect();
    let want_remote: String = rounds.clone().map(remote_entry).collect();
    let map = value
        .as_map()
        .ok_or_else(|| format!("{id}: the value is not a map"))?;
    let text = |name: &str| match map.get(name) {
        Some(LoroValue::String(s)) => Ok(s.to_string()),
        None if count == 0 => Ok(String::new()),
        other => Err(format!("{id}: no {name} text: {other:?}")),
    };
    if text("local")? != want_local {
        return Err(format!(
            "{id}: the local edits did not read back as written"
        ));
    }
    if text("remote_log")? != want_remote {
        return Err(format!("{id}: the remote text did not read back as merged"));
    }
    let remote = map.get("remote").and_then(LoroValue::as_map);
    let entries = remote.map_or(0, |m| m.len());
    if entries != count
        || rounds.clone().any(|r| {
            remote.and_then(|m| m.get(&format!("r{r}"))) != Some(&LoroValue::I64(r as i64))
        })
    {
        return Err(format!(
            "{id}: the remote map has {entries} entries, not the {count} merged"
        ));
    }
    Ok(())
}

/// A number in [0, 1) from a hash.
fn unit(x: u64) -> f32 {
    (x >> 40) as f32 / (1u64 << 24) as f32
}
