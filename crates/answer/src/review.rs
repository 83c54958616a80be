//! What the review page of `pipeline serve` shows (#9): the queue of photos awaiting a person's
//! decision, newest first, and what the pipeline proposes for each (the individuals it most
//! resembles, each with its closest photos). Decisions themselves are `lake::decisions`.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, AsArray};
use lake::decisions::{self, Decision, Kind};
use lake::vector::{self, Expansion};
use lake::{Lake, tables};

use crate::{Error, Result, Snapshot};

/// Neighbours searched to gather a photo's candidate individuals.
pub const NEIGHBOURS: usize = 100;
/// Photos shown of each candidate individual.
pub const PHOTOS_PER_CANDIDATE: usize = 3;

/// A photo awaiting a decision.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Waiting {
    pub photo_id: String,
    /// When `ingest` first recorded it (RFC 3339, UTC); the queue is newest first.
    pub ingested_at: Option<String>,
}

/// The photos of the served table `ds` (of `table`) without a label, newest ingested first
/// (when `images` recorded them; a photo it does not have sorts last), then by id: those that
/// may await a decision ([`awaiting`] tells which do). A server reads it once per version.
pub async fn unlabelled(lake: &Lake, ds: &lance::Dataset, table: &str) -> Result<Vec<Waiting>> {
    let mut unlabelled: HashSet<String> = HashSet::new();
    for b in tables::rows_where(ds, table, "individual_id IS NULL", Some(&["photo_id"])).await? {
        let ids = tables::Columns::new(table, &b).strings("photo_id")?;
        unlabelled.extend(ids.iter().flatten().map(str::to_string));
    }
    let mut at: HashMap<String, i64> = HashMap::new();
    if let Some(images) = lake.open("images").await? {
        for b in tables::rows_where(&images, "images", "individual_id IS NULL", Some(&["photo_id", "ingested_at"])).await? {
            let ids = tables::Columns::new("images", &b).strings("photo_id")?;
            let ts = b
                .column_by_name("ingested_at")
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampMicrosecondType>().cloned())
                .ok_or_else(|| Error::Schema { table: "images".into(), column: "ingested_at".into(), detail: "missing or not a timestamp(us)".into() })?;
            for i in 0..b.num_rows() {
                if ts.is_valid(i) && unlabelled.contains(ids.value(i)) {
                    at.insert(ids.value(i).to_string(), ts.value(i));
                }
            }
        }
    }
    let mut out: Vec<(Option<i64>, String)> = unlabelled.into_iter().map(|p| (at.get(&p).copied(), p)).collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    Ok(out
        .into_iter()
        .map(|(t, photo_id)| Waiting {
            photo_id,
            ingested_at: t.and_then(chrono::DateTime::from_timestamp_micros).map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        })
        .collect())
}

/// Those of `unlabelled` that await a decision: none about them counts (none, or the latest
/// is an undo). In memory: no table is read.
pub fn awaiting(unlabelled: &[Waiting], decided: &decisions::History) -> Vec<Waiting> {
    unlabelled.iter().filter(|w| decided.of_photo(&w.photo_id).last().is_none_or(|d| d.kind == Kind::Undo)).cloned().collect()
}

/// An individual the pipeline proposes for a photo.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Candidate {
    pub individual_id: String,
    /// Its best cosine similarity to the photo.
    pub similarity: f32,
    /// Its photos closest to the photo, best first.
    pub photos: Vec<String>,
}

/// What the review page shows of one photo.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Proposal {
    pub photo_id: String,
    /// The model whose embeddings made the proposal.
    pub model_id: String,
    /// The photo's label in the served table (the survey's, or a decision already applied).
    pub label: Option<String>,
    /// The box the model reads (the detector's box grown by its margin), fractions of the frame.
    pub crop: Option<[f32; 4]>,
    /// The individuals it most resembles, best first.
    pub candidates: Vec<Candidate>,
    /// What the last `submit` proposed (table `proposals`): individuals best first, with
    /// `new_individual` where the photo's best similarity falls under the fitted threshold (its
    /// similarity is that threshold). Empty when no submission covered the photo.
    pub proposed: Vec<Proposed>,
    /// The model that made `proposed` (the served one, or an older one before the next run).
    pub proposed_by: Option<String>,
    /// The proposal as recorded with a decision: `W12 0.812; new_individual 0.550; W7 0.640`
    /// (the submission's when there is one, else the candidates').
    pub text: String,
    /// Every decision about the photo so far, oldest first (the last one counts).
    pub decisions: Vec<Decision>,
}

/// One row of what `submit` proposed for a photo.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Proposed {
    pub individual_id: String,
    pub similarity: f32,
}

/// Table `proposals`, read once and kept by photo (a server keeps one per version of the table,
/// so a photo's page costs no scan of its rows, five per photo).
#[derive(Debug, Default)]
pub struct ProposalIndex {
    /// The version of `proposals` read; None when the lake has no such table.
    pub version: Option<u64>,
    /// Photo → its proposals best first, and the model that made them.
    by_photo: HashMap<String, (Vec<Proposed>, String)>,
}

impl ProposalIndex {
    pub const TABLE: &'static str = "proposals";

    /// The version of table `proposals` now (None: no such table), to tell whether an index
    /// is still current.
    pub async fn version_now(lake: &Lake) -> Result<Option<u64>> {
        Ok(lake.open(Self::TABLE).await?.map(|d| d.version().version))
    }

    /// Reads the whole table.
    pub async fn load(lake: &Lake) -> Result<ProposalIndex> {
        let Some(ds) = lake.open(Self::TABLE).await? else { return Ok(ProposalIndex::default()) };
        let mut rows: HashMap<String, (Vec<(i32, Proposed)>, String)> = HashMap::new();
        for b in tables::rows_where(&ds, Self::TABLE, "photo_id IS NOT NULL", Some(&["photo_id", "rank", "individual_id", "similarity", "model_id"])).await? {
            let c = tables::Columns::new(Self::TABLE, &b);
            let (photo, rank, ind, sim, m) = (c.strings("photo_id")?, c.i32s("rank")?, c.strings("individual_id")?, c.f32s("similarity")?, c.strings("model_id")?);
            for i in 0..b.num_rows() {
                let e = rows.entry(photo.value(i).to_string()).or_insert_with(|| (Vec::new(), m.value(i).to_string()));
                e.0.push((rank.value(i), Proposed { individual_id: ind.value(i).to_string(), similarity: sim.value(i) }));
            }
        }
        let by_photo = rows
            .into_iter()
            .map(|(photo, (mut r, model))| {
                r.sort_by_key(|(rank, _)| *rank);
                (photo, (r.into_iter().map(|(_, p)| p).collect(), model))
            })
            .collect();
        Ok(ProposalIndex { version: Some(ds.version().version), by_photo })
    }

    /// What the last `submit` proposed for `photo_id`, best first, and the model that proposed
    /// it; empty when it covered no such photo.
    pub fn of(&self, photo_id: &str) -> (Vec<Proposed>, Option<String>) {
        match self.by_photo.get(photo_id) {
            Some((p, m)) => (p.clone(), Some(m.clone())),
            None => (Vec::new(), None),
        }
    }
}

/// The candidate individuals of `photo_id` in the served table `snap`: the individuals of
/// its [`NEIGHBOURS`] nearest photos in the order of their best, at most `individuals`, each
/// with its [`PHOTOS_PER_CANDIDATE`] closest photos. None when the table has no such photo.
pub async fn proposal(
    snap: &Snapshot,
    photo_id: &str,
    individuals: usize,
    crops: &HashMap<String, [f32; 4]>,
    proposals: &ProposalIndex,
    decided: &decisions::History,
) -> Result<Option<Proposal>> {
    let Some((v, me)) = snap.embedding_of(photo_id).await? else { return Ok(None) };
    let hits = vector::similar(&snap.source, &v, NEIGHBOURS, Expansion::OFF, Some(&me.uri)).await?;
    let hits = without_bad(hits, decided);
    let candidates: Vec<Candidate> = vector::by_individual(hits.iter().map(|h| (h.individual_id.as_deref(), h.similarity())))
        .into_iter()
        .take(individuals)
        .map(|(individual_id, similarity, at)| Candidate {
            individual_id,
            similarity,
            photos: at.into_iter().take(PHOTOS_PER_CANDIDATE).map(|i| hits[i].photo_id.clone()).collect(),
        })
        .collect();
    let (proposed, proposed_by) = proposals.of(&me.photo_id);
    let text = if proposed.is_empty() {
        candidates.iter().map(|c| format!("{} {:.3}", c.individual_id, c.similarity)).collect::<Vec<_>>().join("; ")
    } else {
        proposed.iter().map(|p| format!("{} {:.3}", p.individual_id, p.similarity)).collect::<Vec<_>>().join("; ")
    };
    Ok(Some(Proposal {
        photo_id: me.photo_id.clone(),
        model_id: snap.model_id.clone(),
        label: me.individual_id.clone(),
        crop: crops.get(&me.photo_id).copied(),
        candidates,
        proposed,
        proposed_by,
        text,
        decisions: decided.of_photo(&me.photo_id).to_vec(),
    }))
}

/// `hits` less the photos whose latest decision calls them bad: they show no candidate, even
/// before the next run takes their label away.
pub fn without_bad(hits: Vec<vector::Hit>, decided: &decisions::History) -> Vec<vector::Hit> {
    hits.into_iter().filter(|h| decided.of_photo(&h.photo_id).last().is_none_or(|d| d.kind != Kind::Bad)).collect()
}

/// A photo whose box a person should look at: what the detector found, and how sure it was.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BoxWaiting {
    pub photo_id: String,
    /// The detector's probability that a subject is there at all.
    pub score: f32,
    /// The detector's box, fractions of the frame.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// Every detection of the detector model `model_id` crops with, least sure first: the photos
/// whose boxes people should draw or correct, before those with a drawn box are left out
/// ([`without_drawn`]). A server reads it once per version of the detections table.
#[derive(Debug, Default)]
pub struct BoxCandidates {
    /// The detector, None when the model reads whole photos.
    pub detector: Option<String>,
    /// The table of its detections, and the version read.
    pub table: Option<(String, u64)>,
    pub photos: Vec<BoxWaiting>,
}

/// The detections of `model_id`'s detector, least sure first ([`BoxCandidates`]).
pub async fn box_candidates(lake: &Lake, model_id: &str) -> Result<BoxCandidates> {
    let Ok((id, dir)) = lake::models::resolve_model(lake, model_id).await else { return Ok(BoxCandidates::default()) };
    let Ok((spec, _)) = model::train::model_files(&dir, &id) else { return Ok(BoxCandidates::default()) };
    let Some(c) = &spec.crop else { return Ok(BoxCandidates::default()) };
    let ds = tables::open_existing(lake, &c.table, " (run the detect stage that writes it)").await?;
    let filter = format!("detector_id = {}", tables::sql_string(&c.detector));
    let mut out = Vec::new();
    for b in tables::rows_where(&ds, &c.table, &filter, Some(&["photo_id", "score", "x0", "y0", "x1", "y1"])).await? {
        let col = tables::Columns::new(&c.table, &b);
        let (ids, score) = (col.strings("photo_id")?, col.f32s("score")?);
        let v = [col.f32s("x0")?, col.f32s("y0")?, col.f32s("x1")?, col.f32s("y1")?];
        for i in 0..b.num_rows() {
            out.push(BoxWaiting {
                photo_id: ids.value(i).to_string(),
                score: score.value(i),
                bbox: [v[0].value(i), v[1].value(i), v[2].value(i), v[3].value(i)],
            });
        }
    }
    out.sort_by(|a, b| a.score.total_cmp(&b.score).then_with(|| a.photo_id.cmp(&b.photo_id)));
    Ok(BoxCandidates { detector: Some(c.detector.clone()), table: Some((c.table.clone(), ds.version().version)), photos: out })
}

/// Those of `all` without a box drawn on the review page. In memory.
pub fn without_drawn(all: &BoxCandidates, drawn: &std::collections::BTreeMap<String, lake::boxes::DrawnBox>) -> Vec<BoxWaiting> {
    all.photos.iter().filter(|w| !drawn.contains_key(&w.photo_id)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_photo_shows_no_candidate_until_undone() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), lake::Catalog::default());
        let hit = |p: &str| vector::Hit { photo_id: p.into(), uri: format!("u/{p}"), individual_id: Some("W1".into()), distance: 0.1 };
        let hits = || vec![hit("a.jpg"), hit("b.jpg"), hit("c.jpg")];
        let ids = |h: Vec<vector::Hit>| h.into_iter().map(|h| h.photo_id).collect::<Vec<_>>();
        let mut decided = decisions::History::default();
        decided.refresh(&lake).await.unwrap();
        assert_eq!(ids(without_bad(hits(), &decided)), ["a.jpg", "b.jpg", "c.jpg"]);
        let mut bad = Decision::new("b.jpg", Kind::Bad, None, "ana").unwrap();
        bad.decided_at = 1;
        let mut unsure = Decision::new("c.jpg", Kind::Unsure, None, "ana").unwrap();
        unsure.decided_at = 2;
        decisions::append(&lake, &[bad, unsure]).await.unwrap();
        decided.refresh(&lake).await.unwrap();
        assert_eq!(ids(without_bad(hits(), &decided)), ["a.jpg", "c.jpg"]);
        let mut undo = Decision::new("b.jpg", Kind::Undo, None, "ana").unwrap();
        undo.decided_at = 3;
        decisions::append(&lake, &[undo]).await.unwrap();
        decided.refresh(&lake).await.unwrap();
        assert_eq!(ids(without_bad(hits(), &decided)), ["a.jpg", "b.jpg", "c.jpg"]);
        // The queue, in memory: b is back after its undo; c (cannot tell) is not; the order of
        // the unlabelled list is kept.
        let w = |p: &str| Waiting { photo_id: p.into(), ingested_at: None };
        let queued: Vec<String> = awaiting(&[w("c.jpg"), w("b.jpg"), w("a.jpg")], &decided).into_iter().map(|w| w.photo_id).collect();
        assert_eq!(queued, ["b.jpg", "a.jpg"]);
    }
}
