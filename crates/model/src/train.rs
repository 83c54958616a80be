//! The training loop: epochs of sampled batches (prefetched by [`super::data`]), augmentation
//! on tensors, backbone → neck → loss, a hand-written Adam/AdamW whose state is saved with the
//! checkpoint, warmup then a schedule, validation (precision@1, mAP@20) after each epoch,
//! TensorBoard events, the best and the last checkpoint, early stop and exact resume.
//!
//! Exact resume: everything random is a function of `(seed, epoch)` — the sampler draws from
//! its own stream per epoch and libtorch's generator is re-seeded at the start of every epoch —
//! and the last checkpoint holds the weights, the optimizer moments, the epoch and the history.
//! So a run resumed after epoch `e` takes exactly the steps an uninterrupted run would take.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::augment::{Aug, Augmenter};
use super::data::{Loader, Photo, prefetch};
use super::loss::{Loss, LossSpec};
use lake::metrics::{RetrievalMetrics, retrieval_metrics};
use super::net::{Net, NetSpec, to_input};
use super::optim::{OptimConfig, Optimizer};
use super::sampler::{Sampler, epoch_batches};
use super::schedule::Schedule;
use super::tensorboard::EventWriter;
use crate::{Error, Result};

/// Where the starting weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Pretrained {
    None,
    /// The backbone's ImageNet weights from `$PIPELINE_WEIGHTS`.
    Imagenet,
    /// An earlier model's checkpoint (transfer learning): its backbone, and its neck when the
    /// embedding size is the same; its loss (classifier) is dropped.
    Checkpoint(PathBuf),
}

lake::choice! { "schedule",
    /// The shape of the learning rate after warmup (serialised as its name, as before it was
    /// typed, so model ids stay the same).
    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum ScheduleKind {
        /// Cosine decay to `floor`.
        Cosine = "cosine",
        /// Times `gamma` every `step_epochs`.
        Step = "step",
        /// Times `gamma` at each of `milestones`.
        MultiStep = "multistep",
        Constant = "constant",
    }
}

/// Learning-rate schedule in epochs (turned into steps once the epoch length is known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    pub warmup_epochs: f64,
    /// Warmup starts at this fraction of the learning rate.
    pub warmup_start: f64,
    /// Cosine ends at this fraction of the learning rate.
    pub floor: f64,
    pub step_epochs: u32,
    pub milestones: Vec<u32>,
    pub gamma: f64,
}

/// Everything that decides what a training run computes. Its JSON goes with every checkpoint
/// and its hash names the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub net: NetSpec,
    pub pretrained: Pretrained,
    /// Weighted loss terms, summed.
    pub loss: Vec<(f64, LossSpec)>,
    pub sampler: Sampler,
    pub batch_size: usize,
    pub epochs: u32,
    pub optim: OptimConfig,
    /// Learning rate of the backbone.
    pub lr: f64,
    /// Learning rate of the neck and the loss's parameters (class centres).
    pub head_lr: f64,
    pub schedule: ScheduleConfig,
    pub augment: Vec<Aug>,
    pub seed: u64,
    /// Stop after this many epochs without a better validation mAP@20 (0: never).
    pub early_stop: u32,
}

/// One epoch's record, in the checkpoint, the `models` table and the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u32,
    pub steps: u64,
    pub loss: f64,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_second: f64,
    pub val: Option<RetrievalMetrics>,
}

/// State saved next to the last checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub config_hash: String,
    /// Epochs completed.
    pub epochs_done: u32,
    pub step: u64,
    pub history: Vec<EpochRecord>,
    pub best_epoch: Option<u32>,
    pub best_map_at_20: Option<f64>,
    pub stopped_early: bool,
    /// The last checkpoint's files, `<stem>.safetensors` and `<stem>.optim.safetensors`
    /// (`last-0007`: after epoch 7). Each epoch writes new files and then this state, which
    /// is what makes them current, so a kill at any instant leaves a state and the very
    /// checkpoint it names. None: `last.safetensors` (folders written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

impl TrainState {
    /// The last checkpoint's weights and optimizer files in `dir`.
    pub fn last_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        match &self.checkpoint {
            Some(stem) => (dir.join(format!("{stem}.safetensors")), dir.join(format!("{stem}.optim.safetensors"))),
            None => (dir.join(LAST), dir.join(LAST_OPTIM)),
        }
    }
}

/// What a finished run leaves.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub state: TrainState,
    /// The checkpoint to embed with: the best by validation mAP@20, or the last.
    pub best_file: PathBuf,
    pub spec_file: PathBuf,
    pub resumed_from: Option<u32>,
    pub classes: usize,
}

/// Runtime choices that do not change what is computed (beyond float rounding).
pub struct TrainEnv<'a> {
    pub device: Device,
    /// bf16 autocast (CUDA only).
    pub amp: bool,
    /// Channels-last memory order for the convolutions ([`Net::use_channels_last`]).
    pub channels_last: bool,
    /// `$PIPELINE_WEIGHTS`.
    pub weights_dir: PathBuf,
    /// Checkpoints, state and TensorBoard events go here.
    pub dir: PathBuf,
    pub resume: bool,
    pub prefetch: usize,
    pub eval_batch: usize,
    pub handle: tokio::runtime::Handle,
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Called after every step with (epoch, step in epoch, steps in epoch, loss).
    pub on_step: &'a (dyn Fn(u32, usize, usize, f64) + Sync),
    /// Called after every epoch.
    pub on_epoch: &'a (dyn Fn(&EpochRecord) + Sync),
    /// Called after the last checkpoint of an epoch is written (to copy it to the lake).
    pub on_checkpoint: &'a (dyn Fn() -> Result<()> + Sync),
}

pub const LAST: &str = "last.safetensors";
pub const LAST_OPTIM: &str = "last.optim.safetensors";
pub const LAST_STATE: &str = "last.json";
pub const BEST: &str = lake::models::WEIGHTS;
pub const SPEC: &str = "model.json";

impl TrainConfig {
    pub fn hash(&self) -> String {
        let json = serde_json::to_string(self).expect("config serialises");
        blake3::hash(json.as_bytes()).to_hex().to_string()
    }

    fn schedule(&self, steps_per_epoch: u64) -> Schedule {
        let s = &self.schedule;
        let warmup_steps = (s.warmup_epochs * steps_per_epoch as f64).round() as u64;
        let total_steps = self.epochs as u64 * steps_per_epoch;
        match s.kind {
            ScheduleKind::Step => Schedule::Step {
                warmup_steps,
                warmup_start: s.warmup_start,
                step_size: (s.step_epochs.max(1) as u64) * steps_per_epoch,
                gamma: s.gamma,
            },
            ScheduleKind::MultiStep => Schedule::MultiStep {
                warmup_steps,
                warmup_start: s.warmup_start,
                milestones: s.milestones.iter().map(|&m| m as u64 * steps_per_epoch).collect(),
                gamma: s.gamma,
            },
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::Cosine => Schedule::WarmupCosine { warmup_steps, warmup_start: s.warmup_start, total_steps, floor: s.floor },
        }
    }
}

/// Model input kind and device for `device = "auto" | "cpu" | "cuda"`.
pub fn pick_device(name: &str) -> std::result::Result<Device, String> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err("device = \"cuda\" but libtorch sees no CUDA device (use \"auto\" or \"cpu\")".into())
            }
        }
        other => Err(format!("unknown device `{other}` (auto, cpu, cuda)")),
    }
}

/// Class index per label, in sorted label order (stable across runs).
pub fn class_index(photos: &[Photo]) -> BTreeMap<String, u32> {
    let mut labels: Vec<&str> = photos.iter().filter_map(|p| p.label.as_deref()).collect();
    labels.sort_unstable();
    labels.dedup();
    labels.into_iter().enumerate().map(|(i, l)| (l.to_string(), i as u32)).collect()
}

/// Trains on `train`, validating on `val` (both labelled) after every epoch.
pub fn train(cfg: &TrainConfig, train: &[Photo], val: &[Photo], loader: Arc<Loader>, env: &TrainEnv) -> Result<TrainOutcome> {
    let err = |m: String| Error::Other(m);
    let classes = class_index(train);
    if classes.len() < 2 {
        return Err(err(format!("training needs at least 2 labelled individuals, the training split has {}", classes.len())));
    }
    let labels: Vec<u32> = train
        .iter()
        .map(|p| p.label.as_ref().map(|l| classes[l]).ok_or_else(|| err(format!("photo {} has no label", p.uri))))
        .collect::<Result<_>>()?;
    let mut counts = vec![0i64; classes.len()];
    for &l in &labels {
        counts[l as usize] += 1;
    }
    std::fs::create_dir_all(&env.dir).map_err(|e| Error::io(&env.dir, e))?;
    let config_hash = cfg.hash();
    // The initial weights (those not loaded from a file) are drawn from libtorch's generator:
    // seeded, so a run and its resumed twin start from the same ones.
    tch::manual_seed(seed_for(cfg.seed, u32::MAX));

    let mut net = Net::new(&cfg.net, env.device).map_err(|e| err(e.to_string()))?;
    // Before any weight is loaded (copies keep the layout) and before the optimizer makes its
    // moments (they take the layout of their variable).
    if env.channels_last {
        net.use_channels_last();
    }
    let loss = Loss::try_new(
        &net.vs.root().sub("loss").set_group(1),
        &cfg.loss,
        cfg.net.neck.embedding_dim,
        &counts,
    )
    .map_err(|e| err(format!("loss: {e}")))?;
    match &cfg.pretrained {
        Pretrained::None => {}
        Pretrained::Imagenet => {
            net.load_imagenet(&env.weights_dir).map_err(|e| err(e.to_string()))?;
        }
        Pretrained::Checkpoint(file) => {
            // The neck comes along when it fits (same embedding size and pooling).
            if net.load_from(file, true).is_err() {
                net.load_from(file, false).map_err(|e| err(e.to_string()))?;
            }
        }
    }
    let mut opt = Optimizer::new(&net.vs, cfg.optim.clone(), true);
    let augmenter = Augmenter::new(cfg.augment.clone());

    let photos = Arc::new(train.to_vec());
    let batch_size = cfg.batch_size.min(train.len()).max(2);
    let batches_of = |epoch: u32| epoch_batches(&cfg.sampler, &labels, batch_size, true, cfg.seed, epoch as u64);
    let steps_per_epoch = batches_of(0).len() as u64;
    if steps_per_epoch == 0 {
        return Err(err(format!(
            "no full batch can be drawn from {} training photos of {} individuals with sampler {:?}",
            train.len(),
            classes.len(),
            cfg.sampler
        )));
    }
    let schedule = cfg.schedule(steps_per_epoch);

    // Resume from the last checkpoint of this very configuration.
    let mut state = TrainState {
        config_hash: config_hash.clone(),
        epochs_done: 0,
        step: 0,
        history: Vec::new(),
        best_epoch: None,
        best_map_at_20: None,
        stopped_early: false,
        checkpoint: None,
    };
    let mut resumed_from = None;
    let state_file = env.dir.join(LAST_STATE);
    // A finished training of this very configuration (the directory is named by config and
    // data) is taken as it is, with or without --resume: a stage re-run for a reason that does
    // not touch the model (an engine upgrade, loader options) must not retrain for an hour.
    let saved: Option<TrainState> = if state_file.is_file() {
        let text = std::fs::read_to_string(&state_file).map_err(|e| Error::io(&state_file, e))?;
        match serde_json::from_str::<TrainState>(&text) {
            Ok(s) => Some(s),
            Err(e) if env.resume => return Err(err(format!("{}: {e}", state_file.display()))),
            Err(_) => None,
        }
    } else {
        None
    };
    if let Some(saved) = saved {
        let same = saved.config_hash == config_hash;
        let finished = same && (saved.epochs_done >= cfg.epochs || saved.stopped_early) && env.dir.join(BEST).is_file();
        if same && (env.resume || finished) {
            let (last, last_optim) = saved.last_files(&env.dir);
            net.load_from(&last, true).map_err(|e| err(e.to_string()))?;
            load_loss_vars(&net, &last)?;
            opt.load(&last_optim).map_err(|e| err(e.to_string()))?;
            resumed_from = Some(saved.epochs_done);
            state = saved;
        } else if env.resume {
            tracing::warn!("--resume: the last checkpoint in {} is of another configuration; starting over", env.dir.display());
        }
    }
    let spec_file = env.dir.join(SPEC);
    write_atomic(&spec_file, &serde_json::to_string_pretty(cfg).expect("config serialises"))?;
    let mut tb = EventWriter::create(&env.dir.join("tensorboard")).map_err(|e| Error::io(&env.dir, e))?;

    let val_photos = Arc::new(val.to_vec());
    let mut since_best = state.epochs_done - state.best_epoch.map_or(0, |b| b + 1);
    for epoch in state.epochs_done..cfg.epochs {
        if state.stopped_early {
            break;
        }
        tch::manual_seed(seed_for(cfg.seed, epoch));
        let batches = batches_of(epoch);
        let n_batches = batches.len();
        let started = Instant::now();
        let mut rx = prefetch(loader.clone(), photos.clone(), batches, env.prefetch, &env.handle);
        let (mut loss_sum, mut seen, mut lr_now) = (0.0, 0usize, cfg.lr);
        let mut i = 0;
        while let Some(item) = rx.blocking_recv() {
            if (env.cancelled)() {
                return Err(Error::Cancelled("training interrupted; the last finished epoch is checkpointed, run again with --resume".into()));
            }
            let (idx, pixels) = item?;
            let factor = schedule.factor(state.step);
            lr_now = cfg.lr * factor;
            opt.set_lr(0, lr_now);
            if opt.groups() > 1 {
                opt.set_lr(1, cfg.head_lr * factor);
            }
            let x = augmenter.apply(&to_input(&pixels, env.device));
            let y = Tensor::from_slice(&idx.iter().map(|&j| labels[j] as i64).collect::<Vec<_>>()).to_device(env.device);
            let emb = if env.amp && env.device.is_cuda() {
                tch::autocast(true, || net.forward(&x, true))
            } else {
                net.forward(&x, true)
            };
            let l = loss.forward(&emb.to_kind(Kind::Float), &y);
            opt.zero_grad();
            l.backward();
            let grad_norm = opt.step();
            let lv = l.double_value(&[]);
            if !lv.is_finite() {
                return Err(err(format!(
                    "the loss became {lv} at epoch {epoch} step {i}: lower the learning rate (lr = {}, head_lr = {}) or set clip_grad_norm",
                    cfg.lr, cfg.head_lr
                )));
            }
            loss_sum += lv;
            seen += idx.len();
            state.step += 1;
            let _ = tb.scalar("train/loss", lv, state.step as i64);
            let _ = tb.scalar("train/lr", lr_now, state.step as i64);
            let _ = tb.scalar("train/grad_norm", grad_norm, state.step as i64);
            i += 1;
            (env.on_step)(epoch, i, n_batches, lv);
        }
        if i < n_batches {
            return Err(Error::Cancelled("the photo loader stopped early".into()));
        }
        let seconds = started.elapsed().as_secs_f64();
        let val_metrics = if val.len() >= 2 {
            let (emb, dim) =
                embed_photos(&net, &loader, &val_photos, env.eval_batch, false, &env.handle, env.prefetch, env.cancelled)?;
            let labels: Vec<String> = val.iter().map(|p| p.label.clone().unwrap_or_default()).collect();
            let ids: Vec<String> = val.iter().map(|p| p.uri.clone()).collect();
            Some(retrieval_metrics(&emb, &labels, &ids, &emb, &labels, &ids, dim, &[1, 5, 10, 20]))
        } else {
            None
        };
        let record = EpochRecord {
            epoch,
            steps: i as u64,
            loss: loss_sum / i.max(1) as f64,
            lr: lr_now,
            seconds,
            images_per_second: seen as f64 / seconds.max(1e-9),
            val: val_metrics.clone(),
        };
        let e = epoch as i64 + 1;
        let _ = tb.scalar("epoch/loss", record.loss, e);
        let _ = tb.scalar("epoch/images_per_second", record.images_per_second, e);
        if let Some(m) = &val_metrics {
            let _ = tb.scalar("val/precision_at_1", m.precision_at_1, e);
            let _ = tb.scalar("val/map_at_20", m.map_at_20, e);
            let _ = tb.scalar("val/map_at_r", m.map_at_r, e);
        }
        let _ = tb.flush();
        let improved = match (&val_metrics, state.best_map_at_20) {
            (Some(m), Some(b)) => m.map_at_20 > b,
            (Some(_), None) => true,
            (None, _) => true, // nothing to compare: the latest is the best we know
        };
        if improved {
            state.best_epoch = Some(epoch);
            state.best_map_at_20 = val_metrics.as_ref().map(|m| m.map_at_20);
            lake::models::write_atomically(&env.dir.join(BEST), |tmp| net.save(tmp).map_err(|e| err(e.to_string())))?;
            since_best = 0;
        } else {
            since_best += 1;
        }
        state.history.push(record.clone());
        state.epochs_done = epoch + 1;
        if cfg.early_stop > 0 && since_best >= cfg.early_stop {
            state.stopped_early = true;
        }
        // Last checkpoint: new weights and optimizer files, then the state that names them
        // (one rename), then the files it no longer names. A kill before the state is written
        // leaves the previous state and its own files: resume redoes this epoch from there.
        let previous = state.last_files(&env.dir);
        state.checkpoint = Some(format!("last-{:04}", epoch + 1));
        let (last, last_optim) = state.last_files(&env.dir);
        lake::models::write_atomically(&last, |tmp| net.save(tmp).map_err(|e| err(e.to_string())))?;
        lake::models::write_atomically(&last_optim, |tmp| opt.save(tmp).map_err(|e| err(e.to_string())))?;
        write_atomic(&state_file, &serde_json::to_string_pretty(&state).expect("state serialises"))?;
        for old in [previous.0, previous.1] {
            if old != last && old != last_optim {
                let _ = std::fs::remove_file(old);
            }
        }
        (env.on_checkpoint)()?;
        (env.on_epoch)(&record);
    }
    Ok(TrainOutcome { state, best_file: env.dir.join(BEST), spec_file, resumed_from, classes: classes.len() })
}

/// libtorch's generator seed for an epoch.
pub fn seed_for(seed: u64, epoch: u32) -> i64 {
    (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch as u64) >> 1) as i64
}

/// The loss's variables (class centres) from a full checkpoint.
fn load_loss_vars(net: &Net, file: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(file)
        .map_err(|e| Error::Other(format!("{}: {e}", file.display())))?
        .into_iter()
        .collect();
    let _g = tch::no_grad_guard();
    for (name, mut var) in net.vs.variables() {
        if name.starts_with("loss.") {
            let src = tensors.get(&name).ok_or_else(|| {
                Error::Other(format!("checkpoint {}: tensor `{name}` is missing", file.display()))
            })?;
            if src.size() != var.size() {
                return Err(Error::Other(format!(
                    "checkpoint {}: tensor `{name}` has shape {:?}, the model expects {:?}",
                    file.display(),
                    src.size(),
                    var.size()
                )));
            }
            var.copy_(src);
        }
    }
    Ok(())
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    lake::models::write_atomically(path, |tmp| std::fs::write(tmp, text).map_err(|e| Error::io(tmp, e)))
}

/// Eval-mode embeddings of `photos`, row-major, with their dimension.
#[allow(clippy::too_many_arguments)]
pub fn embed_photos(
    net: &Net,
    loader: &Arc<Loader>,
    photos: &Arc<Vec<Photo>>,
    batch: usize,
    flip_tta: bool,
    handle: &tokio::runtime::Handle,
    depth: usize,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<(Vec<f32>, usize)> {
    let batches: Vec<Vec<usize>> = (0..photos.len()).collect::<Vec<_>>().chunks(batch.max(1)).map(<[usize]>::to_vec).collect();
    let mut rx = prefetch(loader.clone(), photos.clone(), batches, depth, handle);
    let mut out = Vec::with_capacity(photos.len() * net.spec.neck.embedding_dim as usize);
    while let Some(item) = rx.blocking_recv() {
        if cancelled() {
            return Err(Error::Cancelled("interrupted while embedding".into()));
        }
        let (_, pixels) = item?;
        let e = net.embed(&to_input(&pixels, net.device()), flip_tta).to_device(Device::Cpu).contiguous();
        out.extend(Vec::<f32>::try_from(e.flatten(0, -1)).map_err(|e| Error::Other(e.to_string()))?);
    }
    let dim = net.spec.neck.embedding_dim as usize;
    if out.len() != photos.len() * dim {
        return Err(Error::Cancelled("the photo loader stopped early".into()));
    }
    Ok((out, dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::AugOp;
    use crate::neck::{NeckConfig, Pooling};
    use crate::sampler::Sampler;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Three "individuals", four photos each: a bright square at an individual-specific place
    /// on a noisy background, written as PNG files.
    fn photos(dir: &Path) -> Vec<Photo> {
        let mut out = Vec::new();
        for ind in 0..3u32 {
            for k in 0..4u32 {
                let img = image::RgbImage::from_fn(40, 40, |x, y| {
                    let inside = (x / 13 == ind) && (y / 13 == (ind + 1) % 3);
                    let noise = ((x * 7 + y * 13 + k * 31) % 23) as u8;
                    if inside { image::Rgb([230, 200 - noise, 180]) } else { image::Rgb([20 + noise, 40, 60 + noise]) }
                });
                let p = dir.join(format!("w{ind}_{k}.png"));
                img.save(&p).unwrap();
                out.push(Photo {
                    photo_id: format!("w{ind}_{k}.png"),
                    uri: format!("file://{}", p.display()),
                    label: Some(format!("W{ind}")),
                    crop: None,
                    content_hash: None,
                });
            }
        }
        out
    }

    pub(super) fn config(epochs: u32) -> TrainConfig {
        TrainConfig {
            net: NetSpec {
                backbone: "mobilenet_v2".into(),
                neck: NeckConfig { pooling: Pooling::Gem { p: 3.0, learnable: true, eps: 1e-6 }, embedding_dim: 16, dropout: 0.1 },
                input_size: 32,
                crop: None,
            },
            pretrained: Pretrained::None,
            loss: vec![(1.0, LossSpec::ArcFace { s: 16.0, m: 0.2, easy_margin: false }), (0.5, LossSpec::CrossEntropy)],
            sampler: Sampler::Shuffled,
            batch_size: 4,
            epochs,
            optim: OptimConfig::default(),
            lr: 3e-3,
            head_lr: 1e-2,
            schedule: ScheduleConfig {
                kind: ScheduleKind::Cosine,
                warmup_epochs: 1.0,
                warmup_start: 0.1,
                floor: 0.01,
                step_epochs: 1,
                milestones: vec![],
                gamma: 0.1,
            },
            augment: vec![Aug { op: AugOp::HFlip, p: 0.5 }, Aug { op: AugOp::GaussianNoise { std: 0.02 }, p: 0.5 }],
            seed: 3,
            early_stop: 0,
        }
    }

    fn run(cfg: &TrainConfig, ps: &[Photo], dir: &Path, resume: bool, stop_after_epoch: Option<u32>) -> Result<TrainOutcome> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let stop = AtomicBool::new(false);
        let loader = Arc::new(Loader::new(cfg.net.input_size, 1, 1 << 24, HashMap::new()));
        let env = TrainEnv {
            device: Device::Cpu,
            amp: false,
            channels_last: true,
            weights_dir: PathBuf::from("/nonexistent"),
            dir: dir.to_path_buf(),
            resume,
            prefetch: 2,
            eval_batch: 8,
            handle: rt.handle().clone(),
            cancelled: &|| stop.load(Ordering::SeqCst),
            on_step: &|_, _, _, _| {},
            on_epoch: &|r| {
                if stop_after_epoch == Some(r.epoch) {
                    stop.store(true, Ordering::SeqCst);
                }
            },
            on_checkpoint: &|| Ok(()),
        };
        let (tr, val): (Vec<Photo>, Vec<Photo>) = ps.iter().cloned().partition(|p| !p.photo_id.ends_with("_3.png"));
        super::train(cfg, &tr, &val, loader, &env)
    }

    fn weights(file: &Path) -> Vec<(String, Tensor)> {
        let mut t = Tensor::read_safetensors(file).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    }

    #[test]
    fn a_few_epochs_lower_the_loss_and_leave_checkpoints_and_events() {
        let tmp = tempfile::tempdir().unwrap();
        let ps = photos(tmp.path());
        // Full batches (all 9 training photos), no augmentation, no dropout: each step sees the
        // same data, so the loss must fall steadily.
        let mut cfg = config(8);
        cfg.batch_size = 9;
        cfg.augment.clear();
        cfg.net.neck.dropout = 0.0;
        cfg.lr = 1e-3;
        let out = run(&cfg, &ps, &tmp.path().join("m"), false, None).unwrap();
        let h = &out.state.history;
        assert_eq!(h.len(), 8);
        assert!(h[7].loss < h[0].loss * 0.7, "loss should fall: {:?}", h.iter().map(|r| r.loss).collect::<Vec<_>>());
        assert!(h.iter().all(|r| r.val.is_some()), "validation runs every epoch");
        for f in [BEST, LAST_STATE, SPEC, "last-0008.safetensors", "last-0008.optim.safetensors"] {
            assert!(tmp.path().join("m").join(f).is_file(), "{f} missing");
        }
        // Only the last checkpoint stays, and no temporary file.
        let mut names: Vec<String> = std::fs::read_dir(tmp.path().join("m")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["best.safetensors", "last-0008.optim.safetensors", "last-0008.safetensors", "last.json", "model.json", "tensorboard"]);
        // The spec rebuilds the network; the best weights load into it.
        let spec: TrainConfig = serde_json::from_str(&std::fs::read_to_string(&out.spec_file).unwrap()).unwrap();
        assert_eq!(spec, cfg);
        let net = Net::load(&spec.net, &out.best_file, Device::Cpu).unwrap();
        let e = net.embed(&Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu)), true);
        let norms = e.norm_scalaropt_dim(2.0, [1], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
        // TensorBoard events: one loss per step, one mAP@20 per epoch.
        let tb = std::fs::read_dir(tmp.path().join("m/tensorboard")).unwrap().next().unwrap().unwrap().path();
        let events = crate::tensorboard::read_scalars(&tb).unwrap();
        let steps: u64 = h.iter().map(|r| r.steps).sum();
        assert_eq!(events.iter().filter(|e| e.tag == "train/loss").count() as u64, steps);
        assert_eq!(events.iter().filter(|e| e.tag == "val/map_at_20").count(), 8);
    }

    /// libtorch's generator is global to the process: this test is exact under `cargo nextest`
    /// (a process per test, the project's test command); under `cargo test`, other tests drawing
    /// random numbers in parallel threads can perturb it (run it with `--test-threads 1`).
    #[test]
    fn resume_after_an_interruption_takes_the_same_steps_as_an_uninterrupted_run() {
        let tmp = tempfile::tempdir().unwrap();
        let ps = photos(tmp.path());
        let cfg = config(3);
        let whole = run(&cfg, &ps, &tmp.path().join("whole"), false, None).unwrap();

        let part = tmp.path().join("part");
        let err = run(&cfg, &ps, &part, false, Some(0)).unwrap_err();
        assert!(matches!(err, Error::Cancelled(_)), "{err}");
        let resumed = run(&cfg, &ps, &part, true, None).unwrap();
        assert_eq!(resumed.resumed_from, Some(1));
        assert_eq!(resumed.state.history.len(), 3);
        for (a, b) in whole.state.history.iter().zip(&resumed.state.history) {
            assert_eq!(a.steps, b.steps);
            assert!((a.loss - b.loss).abs() < 1e-6, "epoch {}: {} vs {}", a.epoch, a.loss, b.loss);
        }
        let last = |dir: &Path| dir.join("last-0003.safetensors");
        for ((na, ta), (nb, tb)) in weights(&last(&tmp.path().join("whole"))).iter().zip(&weights(&last(&part))) {
            assert_eq!(na, nb);
            let d = (ta - tb).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{na} differs by {d}");
        }

        // Without --resume the same folder starts over; a changed config does not resume.
        let other = TrainConfig { lr: 1e-3, ..cfg.clone() };
        let fresh = run(&other, &ps, &part, true, None).unwrap();
        assert_eq!(fresh.resumed_from, None);

        // A finished training of the same configuration is taken as it is, even without --resume.
        let again = run(&cfg, &ps, &tmp.path().join("whole"), false, None).unwrap();
        assert_eq!(again.resumed_from, Some(3));
        assert_eq!(again.state.history.len(), 3);
        assert!(again.state.history.iter().zip(&whole.state.history).all(|(a, b)| (a.loss - b.loss).abs() < 1e-9));
    }

    #[test]
    fn a_missing_photo_fails_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ps = photos(tmp.path());
        // A validation photo: every epoch loads all of them.
        ps[3].uri = format!("file://{}/gone.png", tmp.path().display());
        let err = run(&config(1), &ps, &tmp.path().join("m"), false, None).unwrap_err().to_string();
        assert!(err.contains("gone.png"), "{err}");
    }
}

/// The network spec and best weights of a trained model's folder.
pub fn model_files(dir: &lake::models::ModelDir, model_id: &str) -> Result<(NetSpec, PathBuf)> {
    let spec_file = dir.local.join(SPEC);
    let bad = |source: Box<dyn std::error::Error + Send + Sync>| Error::ModelFile { model: model_id.to_string(), file: spec_file.clone(), source };
    let text = std::fs::read_to_string(&spec_file)
        .map_err(|e| bad(format!("cannot be read ({e}); is it a trained model of this lake?").into()))?;
    let cfg: TrainConfig = serde_json::from_str(&text).map_err(|e| bad(Box::new(e)))?;
    cfg.net.validate().map_err(|e| bad(Box::new(e)))?;
    let best = dir.local.join(BEST);
    if !best.is_file() {
        return Err(Error::Other(format!("model `{model_id}`: {} is missing (did its training finish an epoch?)", best.display())));
    }
    Ok((cfg.net, best))
}

#[cfg(test)]
mod model_files_tests {
    use super::*;

    /// A model folder holding `spec` as its spec.json and an (empty) best checkpoint.
    fn folder(spec: &str) -> (tempfile::TempDir, lake::models::ModelDir) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(SPEC), spec).unwrap();
        std::fs::write(tmp.path().join(BEST), b"").unwrap();
        let dir = lake::models::ModelDir::local(tmp.path().to_path_buf());
        (tmp, dir)
    }

    fn good() -> serde_json::Value {
        serde_json::to_value(super::tests::config(2)).unwrap()
    }

    #[test]
    fn a_corrupt_spec_is_an_error_naming_model_file_and_value_not_a_panic() {
        let (_t, dir) = folder("{ not json");
        let e = model_files(&dir, "m-1").unwrap_err().to_string();
        assert!(e.contains("model `m-1`") && e.contains(SPEC), "{e}");

        let mut v = good();
        v["net"]["neck"]["embedding_dim"] = 0.into();
        let (_t, dir) = folder(&v.to_string());
        let e = model_files(&dir, "m-2").unwrap_err().to_string();
        assert!(e.contains("model `m-2`") && e.contains("embedding_dim must be positive, got 0"), "{e}");

        let mut v = good();
        v["net"]["input_size"] = 0.into();
        let (_t, dir) = folder(&v.to_string());
        let e = model_files(&dir, "m-3").unwrap_err().to_string();
        assert!(e.contains("input_size must be in 16..=8192, got 0"), "{e}");

        let mut v = good();
        v["net"]["backbone"] = "vgg99".into();
        let (_t, dir) = folder(&v.to_string());
        let e = model_files(&dir, "m-4").unwrap_err().to_string();
        assert!(e.contains("unknown backbone") && e.contains("vgg99"), "{e}");

        let (_t, dir) = folder(&good().to_string());
        let (spec, best) = model_files(&dir, "m-5").unwrap();
        assert_eq!(spec, super::tests::config(2).net);
        assert!(best.ends_with(BEST));
    }
}
