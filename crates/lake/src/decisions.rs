//! What people decided about the pipeline's proposals (table `decisions`,
//! schemas/decisions.toml): the software proposes, a person decides, and the decision is data.
//!
//! The table is append-only. The latest decision of a photo wins (rows of one instant keep the
//! order they were written in); an undo is a decision of its own, so the history of who decided
//! what, answering which model's proposal, stays queryable with SQL. `ingest` lays each photo's
//! latest decision over the survey's labels ([`Decision::effect`]); training, the
//! new-individual threshold, the submission and the report then see the decided labels.
//!
//! Appends never conflict with each other nor with a run's commits (Lance appends), so the review
//! page writes decisions while a nightly run holds the lake's lease; a run reads the decisions
//! as they were when its `ingest` started.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};

use crate::{Catalog, Error, Lake, Result, WriteKind, tables};

pub const TABLE: &str = "decisions";

/// Reserved by `submit` for "none of the known individuals": no individual may be named so.
pub const NEW_INDIVIDUAL: &str = "new_individual";

/// What a person decided about a photo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// It is a known individual (`individual_id`).
    Same,
    /// It is an individual not seen before, named `individual_id`.
    New,
    /// Cannot tell: the photo leaves the queue, its label stays as the survey gave it.
    Unsure,
    /// A bad photo: it loses its label, so nothing trains on it as anyone.
    Bad,
    /// The photo's earlier decisions no longer count: back to the survey's label and the queue.
    Undo,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Same, Kind::New, Kind::Unsure, Kind::Bad, Kind::Undo];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Same => "same",
            Kind::New => "new",
            Kind::Unsure => "unsure",
            Kind::Bad => "bad",
            Kind::Undo => "undo",
        }
    }

    pub fn parse(s: &str) -> Result<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            Error::Other(format!(
                "unknown decision `{s}` (one of: {})",
                Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

/// What a photo's latest decision does to its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Its label is this individual.
    Label(String),
    /// It has no label (a bad photo).
    NoLabel,
    /// Its label is the survey's (cannot tell, undo).
    Survey,
}

/// One row of [`TABLE`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    pub decision_id: String,
    pub photo_id: String,
    #[serde(rename = "decision")]
    pub kind: Kind,
    pub individual_id: Option<String>,
    pub who: String,
    /// Microseconds since the epoch, UTC.
    pub decided_at: i64,
    pub model_id: Option<String>,
    pub proposal: Option<String>,
}

/// Longest individual name, photo id or proposal text taken (a name is a label, not a note).
const MAX_NAME: usize = 200;
const MAX_PROPOSAL: usize = 4000;

impl Decision {
    /// A decision made now, checked: `same` and `new` need an individual (`new_individual` is
    /// reserved), the others take none; the photo and who decided are named. The error says
    /// which of these is at fault.
    pub fn new(photo_id: &str, kind: Kind, individual_id: Option<&str>, who: &str) -> Result<Decision> {
        let bad = |what: String| Error::Other(format!("decision `{}` on photo `{photo_id}`: {what}", kind.as_str()));
        if photo_id.trim().is_empty() || photo_id.len() > MAX_NAME {
            return Err(Error::Other(format!("a decision needs a photo id of 1..{MAX_NAME} characters")));
        }
        if who.trim().is_empty() || who.len() > MAX_NAME {
            return Err(bad(format!("who decided must be named (1..{MAX_NAME} characters)")));
        }
        let individual = individual_id.map(str::trim).filter(|s| !s.is_empty());
        match (kind, individual) {
            (Kind::Same | Kind::New, None) => return Err(bad("needs an individual".into())),
            (Kind::Same | Kind::New, Some(i)) if i == NEW_INDIVIDUAL => {
                return Err(bad(format!("`{NEW_INDIVIDUAL}` is reserved for the proposals; name the individual")));
            }
            (Kind::Same | Kind::New, Some(i)) if i.len() > MAX_NAME || i.chars().any(char::is_control) => {
                return Err(bad(format!("an individual's name is 1..{MAX_NAME} characters without control characters")));
            }
            (Kind::Unsure | Kind::Bad | Kind::Undo, Some(i)) => return Err(bad(format!("takes no individual (`{i}` given)"))),
            _ => {}
        }
        Ok(Decision {
            decision_id: uuid::Uuid::new_v4().simple().to_string(),
            photo_id: photo_id.to_string(),
            kind,
            individual_id: individual.map(str::to_string),
            who: who.trim().to_string(),
            decided_at: chrono::Utc::now().timestamp_micros(),
            model_id: None,
            proposal: None,
        })
    }

    /// The proposal this decision answered: the model and what it showed.
    pub fn answering(mut self, model_id: Option<&str>, proposal: Option<&str>) -> Result<Decision> {
        if proposal.is_some_and(|p| p.len() > MAX_PROPOSAL) {
            return Err(Error::Other(format!("decision on photo `{}`: the proposal is over {MAX_PROPOSAL} characters", self.photo_id)));
        }
        self.model_id = model_id.filter(|m| !m.is_empty()).map(str::to_string);
        self.proposal = proposal.filter(|p| !p.is_empty()).map(str::to_string);
        Ok(self)
    }

    pub fn effect(&self) -> Effect {
        match self.kind {
            Kind::Same | Kind::New => Effect::Label(self.individual_id.clone().unwrap_or_default()),
            Kind::Bad => Effect::NoLabel,
            Kind::Unsure | Kind::Undo => Effect::Survey,
        }
    }
}

fn batch_of(rows: &[Decision]) -> Result<RecordBatch> {
    let s = |f: &dyn Fn(&Decision) -> Option<&str>| -> Arc<dyn Array> { Arc::new(StringArray::from_iter(rows.iter().map(f))) };
    Ok(RecordBatch::try_new(
        Catalog::builtin(TABLE),
        vec![
            s(&|d| Some(&d.decision_id)),
            s(&|d| Some(&d.photo_id)),
            s(&|d| Some(d.kind.as_str())),
            s(&|d| d.individual_id.as_deref()),
            s(&|d| Some(&d.who)),
            Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|d| d.decided_at)).with_timezone("UTC")),
            s(&|d| d.model_id.as_deref()),
            s(&|d| d.proposal.as_deref()),
        ],
    )?)
}

/// Appends `rows` in one commit.
pub async fn append(lake: &Lake, rows: &[Decision]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let schema = lake.catalog().get(TABLE).unwrap_or_else(|| Catalog::builtin(TABLE));
    let mut sink = lake.sink(TABLE, schema, WriteKind::Append);
    sink.send(batch_of(rows)?).await?;
    sink.finish().await?;
    Ok(())
}

/// Every decision, in the order they were made (rows of one instant in the order written).
pub async fn all(lake: &Lake) -> Result<Vec<Decision>> {
    read(lake, "photo_id IS NOT NULL").await
}

/// The decisions about one photo, in the order they were made.
pub async fn of_photo(lake: &Lake, photo_id: &str) -> Result<Vec<Decision>> {
    read(lake, &format!("photo_id = {}", tables::sql_string(photo_id))).await
}

async fn read(lake: &Lake, filter: &str) -> Result<Vec<Decision>> {
    let Some(ds) = lake.open(TABLE).await? else { return Ok(Vec::new()) };
    let mut out = rows_of(tables::rows_where(&ds, TABLE, filter, None).await?)?;
    // Stable: rows of one instant keep the order the scan gave (the order they were written).
    out.sort_by_key(|d| d.decided_at);
    Ok(out)
}

/// The decisions in `batches`, in their order.
fn rows_of(batches: Vec<RecordBatch>) -> Result<Vec<Decision>> {
    let mut out = Vec::new();
    for b in batches {
        let c = tables::Columns::new(TABLE, &b);
        let (ids, photos, kinds, inds, who, models, props) = (
            c.strings("decision_id")?,
            c.strings("photo_id")?,
            c.strings("decision")?,
            c.strings("individual_id")?,
            c.strings("who")?,
            c.strings("model_id")?,
            c.strings("proposal")?,
        );
        let at = b
            .column_by_name("decided_at")
            .and_then(|a| a.as_primitive_opt::<arrow::datatypes::TimestampMicrosecondType>().cloned())
            .ok_or_else(|| Error::Schema { table: TABLE.into(), column: "decided_at".into(), detail: "missing or not a timestamp(us)".into() })?;
        let opt = |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
        for i in 0..b.num_rows() {
            let kind = Kind::parse(kinds.value(i)).map_err(|e| Error::Schema {
                table: TABLE.into(),
                column: "decision".into(),
                detail: format!("row {}: {e}", ids.value(i)),
            })?;
            out.push(Decision {
                decision_id: ids.value(i).to_string(),
                photo_id: photos.value(i).to_string(),
                kind,
                individual_id: opt(&inds, i),
                who: who.value(i).to_string(),
                decided_at: at.value(i),
                model_id: opt(&models, i),
                proposal: opt(&props, i),
            });
        }
    }
    Ok(out)
}

/// Every decision of the lake by photo, kept by a server and brought up to date by reading only
/// what was appended since ([`History::refresh`]): the table is append-only, so a version's new
/// rows are its new fragments. A fragment read before that is gone or changed (`pipeline
/// vacuum` compacts them) makes it read the table again whole. So the review page's answers
/// after a decision cost one small read, not a scan of every decision.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// The version of the table read; None before it exists.
    pub version: Option<u64>,
    /// The fragments read, as they were.
    read: Vec<lance::table::format::Fragment>,
    by_photo: std::collections::HashMap<String, Vec<Decision>>,
}

impl History {
    /// Reads what was appended since the last call; true when anything was.
    pub async fn refresh(&mut self, lake: &Lake) -> Result<bool> {
        let Some(ds) = lake.open(TABLE).await? else {
            let had = self.version.is_some();
            *self = History::default();
            return Ok(had);
        };
        let version = ds.version().version;
        if Some(version) == self.version {
            return Ok(false);
        }
        let now: Vec<lance::table::format::Fragment> = ds.manifest().fragments.iter().cloned().collect();
        let kept = self.read.iter().all(|f| now.contains(f));
        if !kept {
            *self = History::default();
        }
        let new: Vec<lance::table::format::Fragment> = now.iter().filter(|f| !self.read.contains(f)).cloned().collect();
        if !new.is_empty() {
            let lerr = |e| Error::lance(TABLE, e);
            let mut scan = ds.scan();
            scan.with_fragments(new.clone());
            let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(scan.try_into_stream().await.map_err(lerr)?).await.map_err(lerr)?;
            let mut touched = std::collections::HashSet::new();
            for d in rows_of(batches)? {
                touched.insert(d.photo_id.clone());
                self.by_photo.entry(d.photo_id.clone()).or_default().push(d);
            }
            // Stable: a photo's rows of one instant keep the order they were written in.
            for p in touched {
                if let Some(v) = self.by_photo.get_mut(&p) {
                    v.sort_by_key(|d| d.decided_at);
                }
            }
        }
        self.read = now;
        self.version = Some(version);
        Ok(true)
    }

    /// The decisions about `photo_id`, in the order they were made.
    pub fn of_photo(&self, photo_id: &str) -> &[Decision] {
        self.by_photo.get(photo_id).map(Vec::as_slice).unwrap_or_default()
    }

    /// The latest decision of each photo that has one.
    pub fn latest(&self) -> impl Iterator<Item = &Decision> {
        self.by_photo.values().filter_map(|v| v.last())
    }

    /// How many decisions it holds.
    pub fn len(&self) -> usize {
        self.by_photo.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_photo.is_empty()
    }
}

/// The latest decision of every photo that has one, by photo id.
pub fn latest_of(all: Vec<Decision>) -> BTreeMap<String, Decision> {
    let mut out = BTreeMap::new();
    for d in all {
        out.insert(d.photo_id.clone(), d);
    }
    out
}

/// [`latest_of`] the lake's decisions.
pub async fn latest(lake: &Lake) -> Result<BTreeMap<String, Decision>> {
    Ok(latest_of(all(lake).await?))
}

/// A digest of what the latest decisions do to labels (photo, effect), so a stage that applies
/// them runs again exactly when that changes (a "cannot tell" changes nothing).
pub fn effects_digest(latest: &BTreeMap<String, Decision>) -> String {
    let mut h = blake3::Hasher::new();
    for (photo, d) in latest {
        let e = match d.effect() {
            // The kind too: `images.decision` records it (same and new name a label alike).
            Effect::Label(l) => format!("{}:{l}", d.kind.as_str()),
            Effect::NoLabel => "none".to_string(),
            Effect::Survey => continue,
        };
        h.update(photo.as_bytes());
        h.update(&[0]);
        h.update(e.as_bytes());
        h.update(&[0]);
    }
    h.finalize().to_hex().to_string()
}

/// The label of a photo: its latest decision's when that names one or takes it away, else the
/// survey's.
pub fn label(latest: &BTreeMap<String, Decision>, photo_id: &str, survey: Option<String>) -> Option<String> {
    match latest.get(photo_id).map(Decision::effect) {
        Some(Effect::Label(l)) => Some(l),
        Some(Effect::NoLabel) => None,
        Some(Effect::Survey) | None => survey,
    }
}

/// What a photo's latest decision says, as `images.decision` records it: `same`, `new` or
/// `bad`; None when it has none that counts (none, cannot tell, undone).
pub fn standing(latest: &BTreeMap<String, Decision>, photo_id: &str) -> Option<&'static str> {
    latest.get(photo_id).filter(|d| matches!(d.kind, Kind::Same | Kind::New | Kind::Bad)).map(|d| d.kind.as_str())
}

/// Whether the lake's `images` has a photo `photo_id` (a decision about any other is refused).
pub async fn known_photo(lake: &Lake, photo_id: &str) -> Result<bool> {
    let Some(ds) = lake.open("images").await? else { return Ok(false) };
    let rows = tables::rows_where(&ds, "images", &format!("photo_id = {}", tables::sql_string(photo_id)), Some(&["photo_id"])).await?;
    Ok(rows.iter().any(|b| b.num_rows() > 0))
}

/// Counts of the latest decisions that change labels: (same, new, bad).
pub fn counts(latest: &BTreeMap<String, Decision>) -> (usize, usize, usize) {
    latest.values().fold((0, 0, 0), |(s, n, b), d| match d.kind {
        Kind::Same => (s + 1, n, b),
        Kind::New => (s, n + 1, b),
        Kind::Bad => (s, n, b + 1),
        _ => (s, n, b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_checked_and_names_what_is_wrong() {
        assert!(Decision::new("a.jpg", Kind::Same, Some("W1"), "ana").is_ok());
        let e = Decision::new("a.jpg", Kind::Same, None, "ana").unwrap_err().to_string();
        assert!(e.contains("`same` on photo `a.jpg`") && e.contains("needs an individual"), "{e}");
        let e = Decision::new("a.jpg", Kind::New, Some("  "), "ana").unwrap_err().to_string();
        assert!(e.contains("needs an individual"), "{e}");
        let e = Decision::new("a.jpg", Kind::New, Some(NEW_INDIVIDUAL), "ana").unwrap_err().to_string();
        assert!(e.contains("reserved"), "{e}");
        let e = Decision::new("a.jpg", Kind::Bad, Some("W1"), "ana").unwrap_err().to_string();
        assert!(e.contains("takes no individual (`W1` given)"), "{e}");
        let e = Decision::new("a.jpg", Kind::Unsure, None, " ").unwrap_err().to_string();
        assert!(e.contains("who decided"), "{e}");
        assert!(Decision::new("", Kind::Unsure, None, "ana").is_err());
        assert!(Kind::parse("maybe").unwrap_err().to_string().contains("one of: same, new, unsure, bad, undo"));
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()).unwrap(), k);
        }
        // Names are trimmed.
        assert_eq!(Decision::new("a.jpg", Kind::New, Some(" W-new "), "ana").unwrap().individual_id.as_deref(), Some("W-new"));
    }

    #[tokio::test]
    async fn the_latest_decision_of_a_photo_wins_and_undo_gives_the_survey_label_back() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::default());
        let mut at = 1_000_000i64;
        let mut d = |p: &str, k: Kind, i: Option<&str>| {
            at += 1;
            let mut x = Decision::new(p, k, i, "ana").unwrap();
            x.decided_at = at;
            x
        };
        let rows = vec![
            d("a.jpg", Kind::Same, Some("W1")),
            d("b.jpg", Kind::New, Some("W9")),
            d("c.jpg", Kind::Bad, None),
            d("d.jpg", Kind::Same, Some("W2")),
            d("d.jpg", Kind::Undo, None),
            d("e.jpg", Kind::Unsure, None),
            d("a.jpg", Kind::Same, Some("W3")),
        ];
        append(&lake, &rows[..3]).await.unwrap();
        let before = effects_digest(&latest(&lake).await.unwrap());
        append(&lake, &rows[3..]).await.unwrap();
        let all_rows = all(&lake).await.unwrap();
        assert_eq!(all_rows, rows, "every decision kept, in order");
        let l = latest(&lake).await.unwrap();
        assert_eq!(label(&l, "a.jpg", Some("W0".into())).as_deref(), Some("W3"), "a later decision wins");
        assert_eq!(label(&l, "b.jpg", None).as_deref(), Some("W9"));
        assert_eq!(label(&l, "c.jpg", Some("W5".into())), None, "a bad photo loses its label");
        assert_eq!(label(&l, "d.jpg", Some("W4".into())).as_deref(), Some("W4"), "undone: the survey's label");
        assert_eq!(label(&l, "e.jpg", Some("W6".into())).as_deref(), Some("W6"), "cannot tell keeps it");
        assert_eq!(label(&l, "f.jpg", Some("W7".into())).as_deref(), Some("W7"), "no decision");
        assert_eq!(counts(&l), (1, 1, 1));
        assert_eq!(
            ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"].map(|p| standing(&l, p)),
            [Some("same"), Some("new"), Some("bad"), None, None, None],
            "what images.decision records"
        );
        // The digest follows what changes labels only.
        let after = effects_digest(&l);
        assert_ne!(before, after, "a's label changed");
        // Same individual, another kind of decision: images.decision changes, so does the digest.
        let mut renamed = l.clone();
        renamed.get_mut("a.jpg").unwrap().kind = Kind::New;
        assert_ne!(effects_digest(&renamed), after);
        append(&lake, &[d("g.jpg", Kind::Unsure, None)]).await.unwrap();
        assert_eq!(effects_digest(&latest(&lake).await.unwrap()), after, "cannot tell changes no label");
    }

    #[tokio::test]
    async fn a_history_reads_only_what_was_appended_and_agrees_with_a_full_read() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::default());
        let mut h = History::default();
        assert!(!h.refresh(&lake).await.unwrap(), "no table, nothing read");
        let mut at = 5_000_000i64;
        let mut d = |p: &str, k: Kind, i: Option<&str>| {
            at += 1;
            let mut x = Decision::new(p, k, i, "ana").unwrap();
            x.decided_at = at;
            x
        };
        let first = vec![d("a.jpg", Kind::Same, Some("W1")), d("b.jpg", Kind::Bad, None)];
        append(&lake, &first).await.unwrap();
        assert!(h.refresh(&lake).await.unwrap());
        assert_eq!(h.len(), 2);
        let read_before = h.read.clone();
        // One more decision at the same instant as a's first: it comes after it all the same.
        let mut again = d("a.jpg", Kind::Undo, None);
        again.decided_at = first[0].decided_at;
        append(&lake, std::slice::from_ref(&again)).await.unwrap();
        assert!(h.refresh(&lake).await.unwrap());
        assert!(read_before.iter().all(|f| h.read.contains(f)) && h.read.len() == read_before.len() + 1, "one new fragment read");
        assert_eq!(h.of_photo("a.jpg"), &[first[0].clone(), again.clone()]);
        assert!(!h.refresh(&lake).await.unwrap(), "same version: nothing read");
        let full = latest(&lake).await.unwrap();
        let mine: BTreeMap<String, Decision> = h.latest().map(|d| (d.photo_id.clone(), d.clone())).collect();
        assert_eq!(mine, full);
        assert_eq!(h.of_photo("b.jpg"), of_photo(&lake, "b.jpg").await.unwrap().as_slice());
        assert!(h.of_photo("zzz.jpg").is_empty());
        // Compacted (vacuum): the fragments read are gone, so it reads the table again whole.
        lake.vacuum(chrono::Duration::zero()).await.unwrap();
        h.refresh(&lake).await.unwrap();
        assert_eq!(h.len(), 3, "nothing counted twice after a compaction");
        let mine: BTreeMap<String, Decision> = h.latest().map(|d| (d.photo_id.clone(), d.clone())).collect();
        assert_eq!(mine, full);
    }
}
