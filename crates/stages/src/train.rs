//! Stage kind `train`: a barrier that reads every labelled photo of its input table, splits
//! them by individual (seeded), trains an embedding model on libtorch and writes
//!
//! - its own table (named after the stage, schema `splits`): the split of every photo and the
//!   model id, which `embed` reads;
//! - a row in the shared `models` registry;
//! - the model's files under `<lake>/models/<model id>/`: `best.safetensors` (weights of the
//!   best epoch by validation mAP@20), `model.json` (the full configuration), `last.*` (for
//!   `--resume`) and `tensorboard/` (events: `tensorboard --logdir <lake>/models`).
//!
//! ```toml
//! [stages.train]
//! kind = "train"
//! inputs = ["clean"]
//! table = "clean"              # photos with photo_id, uri, individual_id
//! backbone = "mobilenet_v2"    # resnet18/34/50, densenet121, mobilenet_v2, efficientnet_b0, efficientnet_lite0/1/2
//! pretrained = "imagenet"      # or "none", or a model id / checkpoint file to start from
//! input_size = 480
//! loss = "arcface"             # terms summed with weights: "arcface + 0.2*cross_entropy"
//! epochs = 80
//! ```
//! Every key and its default is in [`TrainStage::parse`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;
use futures::TryStreamExt;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Device, Keys, Loc, Node, Reporter, Val};
use engine::StageCtx;
use lake::models::model_dir;
use lake::{Catalog, Lake, WriteKind, store};
use model::augment::{Aug, AugOp, Augmenter};
use model::data::{Loader, Photo};
use model::loss::LossSpec;
use model::neck::{NeckConfig, Pooling};
use model::net::{CropSpec, NetSpec};
use model::optim::{OptimConfig, OptimKind};
use model::sampler::Sampler;
use model::train::{self, Pretrained, ScheduleConfig, ScheduleKind, TrainConfig, TrainEnv};
use crate::{Error, Result};

const KEYS: &[&str] = &[
    "table", "extra", "crops", "crop_margin", "output", "model", "backbone", "pretrained", "input_size", "embedding_dim", "pooling", "gem_p",
    "gem_learnable", "dropout", "loss", "arcface_s", "arcface_m", "easy_margin", "subcenter_k", "margin_a",
    "margin_lambda", "margin_b", "triplet_margin", "sampler", "pk_p", "pk_k", "batch_size", "epochs", "optimizer",
    "lr", "head_lr", "weight_decay", "clip_grad_norm", "schedule", "warmup_epochs", "warmup_start", "lr_floor",
    "step_epochs", "milestones", "gamma", "augment", "seed", "val_individuals", "val_photos", "min_photos",
    "early_stop", "device", "amp", "channels_last", "threads", "loader_threads", "cache_mb", "crop_cache", "prefetch", "eval_batch", "promote",
];

lake::choice! { "promotion policy",
    /// `promote = ...`: whether the model trained becomes current for its name (what stages
    /// with `model = "current:NAME"`, the nightly pipeline's embed, use).
    pub enum Promote {
        /// When its best validation mAP@20 beats the current model's, or none is current.
        Best = "best",
        /// Every model it trains.
        Always = "always",
        /// Never; `pipeline promote MODEL_ID` does it by hand.
        Never = "never",
    }
}

/// How the labelled photos are split.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SplitConfig {
    /// Fraction of individuals held out entirely (their photos are `val_unseen`).
    pub val_individuals: f64,
    /// Fraction of the photos of each trained individual held out (`val_seen`); at least
    /// `min_photos` stay in training.
    pub val_photos: f64,
    /// Individuals with fewer labelled photos are not trained on (`excluded`): a singleton
    /// gives ArcFace a class with nothing to pull together.
    pub min_photos: usize,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct TrainStage {
    pub table: String,
    pub extra: Vec<String>,
    /// Table of detector boxes (a detect stage's output): the model trains on the crops.
    pub crops: Option<String>,
    /// Fraction of a box's size added on every side of the crop.
    pub crop_margin: f32,
    pub output: Option<String>,
    pub model: Option<String>,
    /// `pretrained = "<model id>"` as written; resolved at run time to the model's folder.
    pub pretrained_model: Option<String>,
    pub config: TrainConfig,
    pub split: SplitConfig,
    pub device: Device,
    pub amp: bool,
    /// Convolutions in channels-last memory order (faster on CPU and GPU; same results).
    pub channels_last: bool,
    pub threads: usize,
    pub loader_threads: usize,
    pub cache_mb: usize,
    /// Read and fill the lake's crop cache ([`lake::crops`]).
    pub crop_cache: bool,
    pub prefetch: usize,
    pub eval_batch: usize,
    pub promote: Promote,
}

const LOSSES: &[&str] = &["arcface", "subcenter_arcface", "triplet", "cross_entropy"];

/// Loss parameters from the stage's flat keys (`arcface_s`, `subcenter_k`, ...): the values of a
/// loss written by name, and the defaults of a loss table.
struct LossDefaults {
    s: f64,
    m: f64,
    easy_margin: bool,
    k: i64,
    margin_a: f64,
    margin_lambda: f64,
    margin_b: f64,
    triplet_margin: f64,
}

impl LossDefaults {
    fn spec(&self, name: &str) -> LossSpec {
        match name {
            "arcface" => LossSpec::ArcFace { s: self.s, m: self.m, easy_margin: self.easy_margin },
            "subcenter_arcface" => LossSpec::SubCenterArcFace {
                s: self.s,
                k: self.k,
                margin_a: self.margin_a,
                margin_lambda: self.margin_lambda,
                margin_b: self.margin_b,
                easy_margin: self.easy_margin,
            },
            "triplet" => LossSpec::Triplet { margin: (self.triplet_margin > 0.0).then_some(self.triplet_margin) },
            _ => LossSpec::CrossEntropy,
        }
    }
}

/// `loss`, as one of:
/// - a name or weighted sum of names: `"arcface"`, `"arcface + 0.2*cross_entropy"` (parameters
///   from the flat keys `arcface_s`, `arcface_m`, `subcenter_k`, `margin_a`, ...);
/// - a table: `{ kind = "subcenter_arcface", k = 3, s = 30, margin_a = 0.45 }` (unset
///   parameters from the flat keys, then the defaults);
/// - a list of tables, each with an optional `weight`:
///   `[{ kind = "arcface", m = 0.5 }, { kind = "cross_entropy", weight = 0.2 }]`.
fn parse_loss(k: &mut Keys, flat: &LossDefaults) -> Option<Vec<(f64, LossSpec)>> {
    let Some(node) = k.node("loss") else {
        return Some(vec![(1.0, flat.spec("arcface"))]);
    };
    match &node.val {
        Val::Str(text) => parse_loss_text(text, k, flat),
        Val::Table(_) => parse_loss_table(node, k, flat).map(|t| vec![t]),
        Val::Array(items) if !items.is_empty() => {
            let terms: Vec<Option<(f64, LossSpec)>> = items.iter().map(|it| parse_loss_table(it, k, flat)).collect();
            terms.into_iter().collect()
        }
        _ => {
            k.error("loss", "`loss` must be a name (\"arcface\"), a table ({ kind = \"arcface\", m = 0.5 }) or a list of tables");
            None
        }
    }
}

fn parse_loss_text(text: &str, k: &mut Keys, flat: &LossDefaults) -> Option<Vec<(f64, LossSpec)>> {
    let mut out = Vec::new();
    for term in text.split('+') {
        let term = term.trim();
        let (w, name) = match term.split_once('*') {
            Some((w, n)) => match w.trim().parse::<f64>() {
                Ok(w) if w.is_finite() && w > 0.0 => (w, n.trim()),
                _ => {
                    k.error("loss", format!("bad weight `{}` in term `{term}` (a positive number)", w.trim()));
                    return None;
                }
            },
            None => (1.0, term),
        };
        if !LOSSES.contains(&name) {
            k.error(
                "loss",
                format!("unknown loss `{name}` (known: {}; combine as \"arcface + 0.2*cross_entropy\")", LOSSES.join(", ")),
            );
            return None;
        }
        out.push((w, flat.spec(name)));
    }
    Some(out)
}

/// One loss table: `kind`, the kind's parameters and `weight`, every problem reported at its line.
fn parse_loss_table(node: &Node, k: &mut Keys, flat: &LossDefaults) -> Option<(f64, LossSpec)> {
    let stage = k.stage().map(str::to_string);
    if node.as_table().is_none() {
        k.reporter().error(&node.at, stage.as_deref(), "each `loss` item must be a table like { kind = \"arcface\", m = 0.5 }");
        return None;
    }
    let before = k.reporter().count();
    let mut t = Keys::new(node, stage.as_deref(), "loss", k.reporter());
    let kind = match t.str("kind") {
        Some(name) if LOSSES.contains(&name.as_str()) => Some(name),
        Some(name) => {
            t.error("kind", format!("unknown loss `{name}` (known: {})", LOSSES.join(", ")));
            None
        }
        None => {
            if !t.has("kind") {
                t.missing("kind", &format!("one of: {}", LOSSES.join(", ")));
            }
            None
        }
    };
    let weight = t.float("weight", 1e-6, 1e6).unwrap_or(1.0);
    let (spec, known): (Option<LossSpec>, &[&str]) = match kind.as_deref() {
        Some("arcface") => (
            Some(LossSpec::ArcFace {
                s: t.float("s", 1.0, 128.0).unwrap_or(flat.s),
                m: t.float("m", 0.0, 1.5).unwrap_or(flat.m),
                easy_margin: t.bool("easy_margin").unwrap_or(flat.easy_margin),
            }),
            &["kind", "weight", "s", "m", "easy_margin"],
        ),
        Some("subcenter_arcface") => (
            Some(LossSpec::SubCenterArcFace {
                s: t.float("s", 1.0, 128.0).unwrap_or(flat.s),
                k: t.int("k", 1, 16).unwrap_or(flat.k),
                margin_a: t.float("margin_a", 0.0, 1.5).unwrap_or(flat.margin_a),
                margin_lambda: t.float("margin_lambda", 0.0, 4.0).unwrap_or(flat.margin_lambda),
                margin_b: t.float("margin_b", 0.0, 1.5).unwrap_or(flat.margin_b),
                easy_margin: t.bool("easy_margin").unwrap_or(flat.easy_margin),
            }),
            &["kind", "weight", "s", "k", "margin_a", "margin_lambda", "margin_b", "easy_margin"],
        ),
        Some("triplet") => {
            let m = t.float("margin", 0.0, 10.0).unwrap_or(flat.triplet_margin);
            (Some(LossSpec::Triplet { margin: (m > 0.0).then_some(m) }), &["kind", "weight", "margin"])
        }
        Some(_) => (Some(LossSpec::CrossEntropy), &["kind", "weight"]),
        None => {
            t.ignore_rest();
            (None, &[])
        }
    };
    t.finish(known);
    let clean = t.reporter().count() == before;
    spec.filter(|_| clean).map(|s| (weight, s))
}

/// `augment = "heavy" | "none" | [{ op = "hflip", p = 0.5 }, { op = "rotate", p = 0.5, degrees = 15 }]`.
fn parse_augment(k: &mut Keys) -> Option<Vec<Aug>> {
    let Some(node) = k.node("augment") else {
        return Some(Augmenter::heavy().ops);
    };
    match &node.val {
        Val::Str(s) if s == "heavy" => Some(Augmenter::heavy().ops),
        Val::Str(s) if s == "none" => Some(Vec::new()),
        Val::Array(items) => {
            let mut ops = Vec::new();
            for it in items {
                let Some(entries) = it.as_table() else {
                    k.reporter().error(&it.at, None, "each `augment` item must be a table like { op = \"hflip\", p = 0.5 }");
                    return None;
                };
                let mut name = None;
                let mut p = 1.0;
                let mut params = BTreeMap::new();
                for (key, _, v) in entries {
                    let num = match &v.val {
                        Val::Int(i) => Some(*i as f64),
                        Val::Float(f) => Some(*f),
                        _ => None,
                    };
                    match (key.as_str(), &v.val, num) {
                        ("op", Val::Str(s), _) => name = Some(s.clone()),
                        ("p", _, Some(x)) if (0.0..=1.0).contains(&x) => p = x,
                        ("p", _, _) => {
                            k.reporter().error(&v.at, None, "augment `p` must be a probability in 0..1");
                            return None;
                        }
                        (_, _, Some(x)) => {
                            params.insert(key.clone(), x);
                        }
                        _ => {
                            k.reporter().error(&v.at, None, format!("augment `{key}` must be a number"));
                            return None;
                        }
                    }
                }
                let Some(name) = name else {
                    k.reporter().error(&it.at, None, format!("augment item without `op` (ops: {})", AugOp::names().join(", ")));
                    return None;
                };
                match AugOp::from_config(&name, &params) {
                    Ok(op) => ops.push(Aug { op, p }),
                    Err(e) => {
                        k.reporter().error(&it.at, None, e);
                        return None;
                    }
                }
            }
            Some(ops)
        }
        _ => {
            k.error("augment", "`augment` must be \"heavy\", \"none\" or a list of { op = ..., p = ... } tables");
            None
        }
    }
}

fn int_list(k: &mut Keys, key: &str) -> Option<Vec<u32>> {
    let node = k.node(key)?;
    match &node.val {
        Val::Array(items) => {
            let mut out = Vec::new();
            for it in items {
                match it.val {
                    Val::Int(i) if i >= 0 => out.push(i as u32),
                    _ => {
                        k.error(key, format!("`{key}` must be a list of epoch numbers"));
                        return None;
                    }
                }
            }
            Some(out)
        }
        _ => {
            k.error(key, format!("`{key}` must be a list of epoch numbers"));
            None
        }
    }
}

impl TrainStage {
    pub fn parse(k: &mut Keys, ctx: &Context) -> Option<TrainStage> {
        let mut ok = true;
        let backbone = k.str("backbone").unwrap_or_else(|| "mobilenet_v2".into());
        if backbone.parse::<model::backbone::Arch>().is_err() {
            let names: Vec<&str> = model::backbone::Arch::ALL.iter().map(|a| a.name()).collect();
            k.error("backbone", format!("unknown backbone `{backbone}` (known: {})", names.join(", ")));
            ok = false;
        }
        let (pretrained, pretrained_model) = match k.str("pretrained").as_deref() {
            None | Some("imagenet") => (Pretrained::Imagenet, None),
            Some("none") => (Pretrained::None, None),
            Some(other) => {
                let path = ctx.path(other);
                if other.ends_with(".safetensors") {
                    if !path.is_file() {
                        k.error("pretrained", format!("checkpoint file {} does not exist", path.display()));
                        ok = false;
                    }
                    (Pretrained::Checkpoint(path), None)
                } else {
                    // A model id, looked up in the lake when the stage runs.
                    (Pretrained::None, Some(other.to_string()))
                }
            }
        };
        let pooling = match k.str("pooling").as_deref() {
            None | Some("gem") => Pooling::Gem {
                p: k.float("gem_p", 1.0, 16.0).unwrap_or(3.0),
                learnable: k.bool("gem_learnable").unwrap_or(true),
                eps: 1e-6,
            },
            Some("avg") => Pooling::Avg,
            Some(o) => {
                k.error("pooling", format!("unknown pooling `{o}` (gem, avg)"));
                ok = false;
                Pooling::Avg
            }
        };
        let neck = NeckConfig {
            pooling,
            embedding_dim: k.int("embedding_dim", 8, 8192).unwrap_or(256),
            dropout: k.float("dropout", 0.0, 0.9).unwrap_or(0.0),
        };
        let flat = LossDefaults {
            s: k.float("arcface_s", 1.0, 128.0).unwrap_or(30.0),
            m: k.float("arcface_m", 0.0, 1.5).unwrap_or(0.5),
            easy_margin: k.bool("easy_margin").unwrap_or(false),
            k: k.int("subcenter_k", 1, 16).unwrap_or(3),
            margin_a: k.float("margin_a", 0.0, 1.5).unwrap_or(0.45),
            margin_lambda: k.float("margin_lambda", 0.0, 4.0).unwrap_or(0.25),
            margin_b: k.float("margin_b", 0.0, 1.5).unwrap_or(0.05),
            triplet_margin: k.float("triplet_margin", 0.0, 10.0).unwrap_or(0.3),
        };
        let loss = match parse_loss(k, &flat) {
            Some(terms) => terms,
            None => {
                ok = false;
                Vec::new()
            }
        };
        let batch_size = k.int("batch_size", 2, 4096).unwrap_or(32) as usize;
        let sampler = match k.str("sampler").as_deref() {
            None | Some("shuffled") => Sampler::Shuffled,
            Some("pk") => Sampler::Pk {
                p: k.int("pk_p", 2, 1024).unwrap_or(8) as usize,
                k: k.int("pk_k", 2, 64).unwrap_or(4) as usize,
            },
            Some(o) => {
                k.error("sampler", format!("unknown sampler `{o}` (shuffled, pk)"));
                ok = false;
                Sampler::Shuffled
            }
        };
        if matches!(sampler, Sampler::Shuffled) && loss.iter().any(|(_, l)| matches!(l, LossSpec::Triplet { .. })) {
            k.error("sampler", "the triplet loss mines pairs inside a batch: use sampler = \"pk\"");
            ok = false;
        }
        let kind = match k.str("optimizer").as_deref() {
            None | Some("adamw") => OptimKind::AdamW,
            Some("adam") => OptimKind::Adam,
            Some(o) => {
                k.error("optimizer", format!("unknown optimizer `{o}` (adamw, adam)"));
                ok = false;
                OptimKind::AdamW
            }
        };
        let clip = k.float("clip_grad_norm", 0.0, 1e6).unwrap_or(0.0);
        let optim = OptimConfig {
            kind,
            weight_decay: k.float("weight_decay", 0.0, 1.0).unwrap_or(1e-3),
            clip_grad_norm: (clip > 0.0).then_some(clip),
            ..OptimConfig::default()
        };
        let lr = k.float("lr", 1e-8, 10.0).unwrap_or(2e-4);
        let head_lr = k.float("head_lr", 1e-8, 10.0).unwrap_or(lr * 10.0);
        let schedule_kind = k.choice("schedule", ScheduleKind::Cosine);
        ok &= schedule_kind.is_some();
        let schedule = ScheduleConfig {
            kind: schedule_kind.unwrap_or(ScheduleKind::Cosine),
            warmup_epochs: k.float("warmup_epochs", 0.0, 1000.0).unwrap_or(2.0),
            warmup_start: k.float("warmup_start", 0.0, 1.0).unwrap_or(0.1),
            floor: k.float("lr_floor", 0.0, 1.0).unwrap_or(0.01),
            step_epochs: k.int("step_epochs", 1, 100_000).unwrap_or(10) as u32,
            milestones: int_list(k, "milestones").unwrap_or_default(),
            gamma: k.float("gamma", 0.0, 1.0).unwrap_or(0.1),
        };
        let augment = parse_augment(k);
        ok &= augment.is_some();
        let seed = k.int("seed", 0, i64::MAX).unwrap_or(42) as u64;
        let device = k.device();
        ok &= device.is_some();
        let device = device.unwrap_or_default();
        let (loader_threads, prefetch) = k.loader();
        let config = TrainConfig {
            net: NetSpec { backbone, neck, input_size: k.int("input_size", 32, 2048).unwrap_or(480) as u32, crop: None },
            pretrained,
            loss,
            sampler,
            batch_size,
            epochs: k.int("epochs", 1, 100_000).unwrap_or(80) as u32,
            optim,
            lr,
            head_lr,
            schedule,
            augment: augment.unwrap_or_default(),
            seed,
            early_stop: k.int("early_stop", 0, 100_000).unwrap_or(0) as u32,
        };
        let stage = TrainStage {
            table: k.str("table").unwrap_or_else(|| "clean".into()),
            extra: k.str_list("extra").unwrap_or_default(),
            crops: k.str("crops"),
            crop_margin: k.float("crop_margin", 0.0, 1.0).unwrap_or(0.1) as f32,
            output: k.str("output"),
            model: k.str("model"),
            pretrained_model,
            config,
            split: SplitConfig {
                val_individuals: k.float("val_individuals", 0.0, 0.95).unwrap_or(0.3),
                val_photos: k.float("val_photos", 0.0, 0.9).unwrap_or(0.0),
                min_photos: k.int("min_photos", 1, 1000).unwrap_or(2) as usize,
                seed,
            },
            device,
            amp: k.bool("amp").unwrap_or(true),
            channels_last: k.bool("channels_last").unwrap_or(true),
            threads: k.int("threads", 0, 1024).unwrap_or(0) as usize,
            loader_threads,
            cache_mb: k.int("cache_mb", 0, 1 << 20).unwrap_or(4096) as usize,
            crop_cache: k.bool("crop_cache").unwrap_or(true),
            prefetch,
            eval_batch: k.int("eval_batch", 1, 4096).unwrap_or(64) as usize,
            promote: match k.choice("promote", Promote::Best) {
                Some(p) => p,
                None => {
                    ok = false;
                    Promote::Best
                }
            },
        };
        engine::stage::finish_keys(k, KEYS);
        ok.then_some(stage)
    }

    pub fn output(&self, stage: &str) -> String {
        self.output.clone().unwrap_or_else(|| stage.to_string())
    }

    /// Promotes `id` by the stage's policy; says what it did, for the summary.
    async fn promote_if(&self, ctx: &StageCtx, id: &str, map: Option<f64>) -> Result<String> {
        let name = self.model_name(&ctx.name);
        let current = lake::models::current(&ctx.lake, &name).await?;
        let fmt = |m: Option<f64>| m.map_or("none".to_string(), |m| format!("{m:.3}"));
        if current.as_ref().is_some_and(|c| c.model_id == id) {
            return Ok("current model".into());
        }
        let (reason, why) = match (self.promote, &current) {
            (Promote::Never, _) => return Ok("not promoted (promote = \"never\")".into()),
            (Promote::Always, _) => ("always", String::new()),
            (Promote::Best, None) => ("best", format!(" (no `{name}` model was current)")),
            (Promote::Best, Some(c)) => {
                let theirs = lake::models::best_map(&ctx.lake, &c.model_id).await?.or(c.map_at_20);
                match (map, theirs) {
                    (Some(m), Some(t)) if m > t => ("best", format!(" (val mAP@20 {m:.3} > {t:.3} of {})", c.model_id)),
                    (Some(_), None) => ("best", format!(" ({} has no validation mAP@20)", c.model_id)),
                    _ => {
                        return Ok(format!(
                            "not promoted: val mAP@20 {} does not beat {} of current {} (`pipeline promote {id}` to use it anyway)",
                            fmt(map),
                            fmt(theirs),
                            c.model_id
                        ));
                    }
                }
            }
        };
        ctx.promote_model(id, reason, map, current.as_ref().map(|c| c.model_id.as_str())).await?;
        Ok(format!("promoted to current `{name}`{why}"))
    }

    fn model_name(&self, stage: &str) -> String {
        self.model.clone().unwrap_or_else(|| stage.to_string())
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        for t in std::iter::once(&self.table).chain(&self.extra) {
            ins.need(rep, &mut reads, t, &["photo_id", "uri", "individual_id"]);
        }
        if let Some(c) = &self.crops {
            ins.need(rep, &mut reads, c, &["photo_id", "detector_id", "x0", "y0", "x1", "y1"]);
        }
        Checked {
            reads,
            writes: vec![(self.output(stage), Catalog::builtin("splits"))],
            // The options are hashed as written (a key added with a default that keeps today's
            // training retrains nothing); a checkpoint file they name, by its content, so the
            // project can move.
            hash_extra: match &self.config.pretrained {
                Pretrained::Checkpoint(p) => match std::fs::read(p) {
                    Ok(bytes) => format!("pretrained:{}", blake3::hash(&bytes).to_hex()),
                    Err(e) => format!("pretrained:unreadable:{e}"),
                },
                _ => String::new(),
            },
            models: vec![self.model_name(stage)],
        }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        // Photos: the input table, then extra (pseudo-labelled) tables; a photo in both keeps
        // the input table's label.
        let mut photos: Vec<Photo> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut rows_in = 0u64;
        for t in std::iter::once(&self.table).chain(&self.extra) {
            for p in read_photos(&ctx.lake, t).await? {
                rows_in += 1;
                if p.label.is_some() && seen.insert(p.uri.clone()) {
                    photos.push(p);
                }
            }
        }
        photos.sort_by(|a, b| a.uri.cmp(&b.uri));
        let split = split_photos(&photos, &self.split);
        let mut cfg = self.config.clone();
        let mut uncropped = 0usize;
        if let Some(table) = &self.crops {
            let (detector, boxes) = lake::tables::read_boxes(&ctx.lake, table, None).await?;
            for p in &mut photos {
                p.crop = boxes.get(&p.photo_id).map(|b| vision::expand_box(*b, self.crop_margin));
                uncropped += usize::from(p.crop.is_none());
            }
            cfg.net.crop = Some(CropSpec { detector, table: table.clone(), margin: self.crop_margin });
        }
        // Held to the end of the run: for a remote lake it is the downloaded copy.
        let mut _pretrained_dir = None;
        if let Some(id) = &self.pretrained_model {
            let dir = model_dir(&ctx.lake, id).await?;
            let best = dir.local.join(train::BEST);
            if !best.is_file() {
                return Err(Error::Other(format!("pretrained = \"{id}\": no model of that id in {}/models (no {})", ctx.lake.root(), train::BEST)));
            }
            cfg.pretrained = Pretrained::Checkpoint(best);
            _pretrained_dir = Some(dir);
        }
        // The model id names configuration and data: same config on the same photos and split
        // → same id, which is what lets `--resume` find its checkpoint.
        let mut h = blake3::Hasher::new();
        h.update(cfg.hash().as_bytes());
        h.update(serde_json::to_string(&self.split).unwrap_or_default().as_bytes());
        for (p, s) in photos.iter().zip(&split) {
            h.update(p.uri.as_bytes());
            h.update(p.label.as_deref().unwrap_or("").as_bytes());
            h.update(s.as_bytes());
        }
        let model_id = format!("{}-{}", self.model_name(&ctx.name), &h.finalize().to_hex()[..12]);
        let train_set: Vec<Photo> = photos.iter().zip(&split).filter(|(_, s)| **s == "train").map(|(p, _)| p.clone()).collect();
        let val_set: Vec<Photo> =
            photos.iter().zip(&split).filter(|(_, s)| s.starts_with("val")).map(|(p, _)| p.clone()).collect();
        if train_set.is_empty() {
            return Err(Error::Other(format!(
                "table `{}` has no photo to train on ({} labelled photos; individuals need at least {} photos, min_photos)",
                self.table,
                photos.len(),
                self.split.min_photos
            )));
        }

        let device = train::pick_device(ctx.device.unwrap_or(self.device).as_str()).map_err(Error::Other)?;
        if self.threads > 0 {
            tch::set_num_threads(self.threads as i32);
        }
        let dir = lake::models::model_dir_to_train(&ctx.lake, &model_id).await?;
        let loader = Loader::new(cfg.net.input_size, self.loader_threads, self.cache_mb << 20, ctx.lake.options().clone()).in_lake(ctx.lake.root());
        let loader = Arc::new(if self.crop_cache { loader.with_crop_cache(ctx.lake.clone()) } else { loader });
        let loaded = loader.clone();
        let weights_dir = std::env::var_os("PIPELINE_WEIGHTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| dirs_cache().join("weights"));
        let progress = ctx.progress.clone();
        let cancel = ctx.cancel.clone();
        let handle = tokio::runtime::Handle::current();
        let resume = ctx.resume;
        let (amp, channels_last, prefetch, eval_batch) = (self.amp, self.channels_last, self.prefetch, self.eval_batch);
        let epochs = cfg.epochs;
        let local = dir.local.clone();
        let sync = dir.clone_sync();
        let cfg2 = cfg.clone();
        progress.set_length(epochs as u64);
        progress.set_message(format!("{model_id}: {} photos, {} individuals", train_set.len(), train::class_index(&train_set).len()));
        let outcome = tokio::task::spawn_blocking(move || {
            let sync_handle = handle.clone();
            let env = TrainEnv {
                device,
                amp,
                channels_last,
                weights_dir,
                dir: local,
                resume,
                prefetch,
                eval_batch,
                handle,
                cancelled: &|| cancel.is_cancelled(),
                on_step: &|e, i, n, l| {
                    progress.set_message(format!("epoch {}/{epochs} step {i}/{n} loss {l:.3}", e + 1));
                },
                on_epoch: &|r| {
                    progress.set_position(r.epoch as u64 + 1);
                    let m = r.val.as_ref().map(|m| format!(", val P@1 {:.3} mAP@20 {:.3}", m.precision_at_1, m.map_at_20)).unwrap_or_default();
                    tracing::info!("epoch {}: loss {:.4}, {:.1} img/s{m}", r.epoch + 1, r.loss, r.images_per_second);
                },
                on_checkpoint: &|| sync_handle.block_on(sync.upload()),
            };
            train::train(&cfg2, &train_set, &val_set, loader, &env)
        })
        .await
        .map_err(|e| Error::Other(format!("training panicked: {e}")))??;
        loaded.flush_or_warn(&ctx.name).await;
        dir.upload().await?;

        // The split table (owned) and the registry row.
        let out = self.output(&ctx.name);
        let mut sink = ctx.sink(&out, Catalog::builtin("splits"), WriteKind::Overwrite).await?;
        let n = photos.len();
        let batch = RecordBatch::try_new(
            Catalog::builtin("splits"),
            vec![
                Arc::new(StringArray::from(vec![model_id.as_str(); n])),
                Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.photo_id.as_str()))),
                Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.uri.as_str()))),
                Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.label.as_deref().unwrap_or("")))),
                Arc::new(StringArray::from_iter_values(split.iter().copied())),
                Arc::new(StringArray::from(vec![ctx.run_id.as_str(); n])),
            ],
        )?;
        sink.send(batch).await?;
        let committed = sink.finish().await?;

        let st = &outcome.state;
        let best = st.best_epoch.and_then(|b| st.history.iter().find(|h| h.epoch == b));
        let registry = RecordBatch::try_new(
            Catalog::builtin("models"),
            vec![
                Arc::new(StringArray::from(vec![model_id.as_str()])),
                Arc::new(StringArray::from(vec!["trained"])),
                Arc::new(StringArray::from(vec![ctx.name.as_str()])),
                Arc::new(StringArray::from(vec![ctx.run_id.as_str()])),
                Arc::new(StringArray::from(vec![cfg.net.backbone.as_str()])),
                Arc::new(Int32Array::from(vec![cfg.net.neck.embedding_dim as i32])),
                Arc::new(Int32Array::from(vec![cfg.net.input_size as i32])),
                Arc::new(StringArray::from(vec![serde_json::json!({ "train": cfg, "split": self.split }).to_string()])),
                Arc::new(StringArray::from(vec![serde_json::to_string(&st.history).unwrap_or_default()])),
                Arc::new(Int32Array::from(vec![st.best_epoch.map(|e| e as i32)])),
                Arc::new(Float64Array::from(vec![st.best_map_at_20])),
                Arc::new(StringArray::from(vec![store::lake_relative(ctx.lake.root(), &dir.uri).unwrap_or_else(|| dir.uri.clone())])),
                Arc::new(TimestampMicrosecondArray::from(vec![chrono::Utc::now().timestamp_micros()]).with_timezone("UTC")),
            ],
        )?;
        ctx.register_model(registry).await?;
        let promoted = self.promote_if(ctx, &model_id, st.best_map_at_20).await?;

        let counts = |s: &str| split.iter().filter(|x| **x == s).count();
        let metrics = best
            .and_then(|b| b.val.as_ref())
            .map(|m| format!("; best epoch {}: val P@1 {:.3}, mAP@20 {:.3}", b_epoch(best), m.precision_at_1, m.map_at_20))
            .unwrap_or_default();
        let resumed = match outcome.resumed_from {
            Some(e) if e >= st.epochs_done => " (already trained: taken from its directory)".to_string(),
            Some(e) => format!(" (resumed after epoch {e})"),
            None => String::new(),
        };
        Ok(Outcome {
            rows_in,
            rows_out: n as u64,
            written: BTreeMap::from([(out, committed.version)]),
            summary: format!(
                "model {model_id}{resumed}: {} epochs on {} photos of {} individuals, {} val_unseen, {} val_seen{metrics}{}; {promoted}; {}",
                st.epochs_done,
                counts("train"),
                outcome.classes,
                counts("val_unseen"),
                counts("val_seen"),
                match &cfg.net.crop {
                    Some(c) if uncropped > 0 => format!("; crops of {} ({uncropped} photos without a box used whole)", c.detector),
                    Some(c) => format!("; crops of {}", c.detector),
                    None => String::new(),
                },
                loaded.summary(),
            ),
            ..Default::default()
        })
    }
}

fn b_epoch(r: Option<&train::EpochRecord>) -> u32 {
    r.map(|r| r.epoch + 1).unwrap_or(0)
}

fn dirs_cache() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".cache/pipeline")
}

/// Reads `photo_id`, `uri`, `individual_id` of every row of `table`.
pub async fn read_photos(lake: &Lake, table: &str) -> Result<Vec<Photo>> {
    let ds = lake.open(table).await?.ok_or_else(|| Error::Other(format!("table `{table}` does not exist in the lake")))?;
    let mut scan = ds.scan();
    // The content hash (when the table has one) keys the photo's crops in the crop cache.
    let keyed = ds.schema().field("content_hash").is_some();
    let columns: &[&str] = if keyed { &["photo_id", "uri", "individual_id", "content_hash"] } else { &["photo_id", "uri", "individual_id"] };
    scan.project(columns).map_err(|e| Error::lance(table, e))?;
    let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance(table, e))?;
    let mut out = Vec::new();
    while let Some(b) = stream.try_next().await.map_err(|e| Error::lance(table, e))? {
        let (pid, uri, lab) = (b.column(0).as_string::<i32>(), b.column(1).as_string::<i32>(), b.column(2).as_string::<i32>());
        let hash = keyed.then(|| b.column(3).as_string::<i32>());
        for i in 0..b.num_rows() {
            out.push(Photo {
                photo_id: pid.value(i).to_string(),
                uri: uri.value(i).to_string(),
                label: (lab.is_valid(i) && !lab.value(i).is_empty()).then(|| lab.value(i).to_string()),
                crop: None,
                content_hash: hash.filter(|h| h.is_valid(i)).map(|h| h.value(i).to_string()),
            });
        }
    }
    Ok(out)
}

/// The split of each photo (same order): `train`, `val_unseen`, `val_seen` or `excluded`.
/// Deterministic in the seed and the set of (uri, label) pairs, whatever the input order.
pub fn split_photos(photos: &[Photo], cfg: &SplitConfig) -> Vec<&'static str> {
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in photos.iter().enumerate() {
        if let Some(l) = &p.label {
            by_label.entry(l).or_default().push(i);
        }
    }
    for v in by_label.values_mut() {
        v.sort_by(|a, b| photos[*a].uri.cmp(&photos[*b].uri));
    }
    let mut out = vec!["excluded"; photos.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut eligible: Vec<&str> = by_label.iter().filter(|(_, v)| v.len() >= cfg.min_photos.max(1)).map(|(l, _)| *l).collect();
    // Individuals with too few photos to train on still make good held-out queries when they
    // have two (a query and its match): they go to val_unseen.
    eligible.shuffle(&mut rng);
    let n_val = (eligible.len() as f64 * cfg.val_individuals).round() as usize;
    let (val, trained) = eligible.split_at(n_val.min(eligible.len().saturating_sub(2)));
    for l in val {
        for &i in &by_label[l] {
            out[i] = "val_unseen";
        }
    }
    for l in trained {
        let mut idx = by_label[l].clone();
        idx.shuffle(&mut rng);
        let keep = cfg.min_photos.max(2);
        let hold = ((idx.len() as f64 * cfg.val_photos).round() as usize).min(idx.len().saturating_sub(keep));
        for (j, &i) in idx.iter().enumerate() {
            out[i] = if j < hold { "val_seen" } else { "train" };
        }
    }
    out
}








impl Stage for TrainStage {
    fn describe(&self) -> String {
        format!("train {} {}² on {}, {} epochs", self.config.net.backbone, self.config.net.input_size, self.table, self.config.epochs)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(TrainStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(TrainStage::run(self, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photos(spec: &[(&str, usize)]) -> Vec<Photo> {
        let mut out = Vec::new();
        for (l, n) in spec {
            for i in 0..*n {
                out.push(Photo { photo_id: format!("{l}_{i}.jpg"), uri: format!("file:///p/{l}_{i}.jpg"), label: Some(l.to_string()), crop: None, content_hash: None });
            }
        }
        out
    }

    #[test]
    fn split_holds_out_whole_individuals_and_is_deterministic() {
        let ps = photos(&[("a", 5), ("b", 4), ("c", 3), ("d", 6), ("e", 2), ("f", 1), ("g", 4), ("h", 3), ("i", 5), ("j", 2)]);
        let cfg = SplitConfig { val_individuals: 0.3, val_photos: 0.0, min_photos: 2, seed: 7 };
        let s = split_photos(&ps, &cfg);
        // The singleton is excluded; 9 eligible individuals, 3 held out.
        assert_eq!(s[ps.iter().position(|p| p.label.as_deref() == Some("f")).unwrap()], "excluded");
        let mut unseen: BTreeSet<&str> = BTreeSet::new();
        let mut trained: BTreeSet<&str> = BTreeSet::new();
        for (p, s) in ps.iter().zip(&s) {
            match *s {
                "val_unseen" => unseen.insert(p.label.as_deref().unwrap()),
                "train" => trained.insert(p.label.as_deref().unwrap()),
                _ => false,
            };
        }
        assert_eq!(unseen.len(), 3);
        assert!(unseen.is_disjoint(&trained), "an individual is either held out or trained on");
        // Same result whatever the input order.
        let mut rev = ps.clone();
        rev.reverse();
        let s2 = split_photos(&rev, &cfg);
        for (p, s) in rev.iter().zip(&s2) {
            let i = ps.iter().position(|q| q == p).unwrap();
            assert_eq!(*s, split_photos(&ps, &cfg)[i]);
        }
        // Another seed, another split.
        let other = split_photos(&ps, &SplitConfig { seed: 8, ..cfg.clone() });
        assert_ne!(s, other);
    }

    #[test]
    fn val_photos_keep_enough_for_training() {
        let ps = photos(&[("a", 10), ("b", 3), ("c", 2)]);
        let cfg = SplitConfig { val_individuals: 0.0, val_photos: 0.5, min_photos: 2, seed: 1 };
        let s = split_photos(&ps, &cfg);
        let count = |l: &str, what: &str| ps.iter().zip(&s).filter(|(p, x)| p.label.as_deref() == Some(l) && **x == what).count();
        assert_eq!(count("a", "val_seen"), 5);
        assert_eq!(count("a", "train"), 5);
        assert_eq!(count("b", "val_seen"), 1);
        assert_eq!(count("b", "train"), 2);
        assert_eq!(count("c", "val_seen"), 0, "two photos: both stay in training");
    }
}
