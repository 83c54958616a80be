//! Adam / AdamW written on tensors, so that its state (moments and step counts) can be saved
//! in a checkpoint and training resumes exactly where it stopped.
//!
//! tch's own `nn::Adam`/`nn::AdamW` wrap libtorch's C++ optimizers, whose state has no accessor
//! and no serialisation in tch 0.24: resuming from a checkpoint would restart the moments at
//! zero. This optimizer follows libtorch's update rule (checked against `nn::AdamW`/`nn::Adam`
//! in the tests) and keeps its state in plain tensors on the parameters' device.
//!
//! Update for a parameter `p` with gradient `g` in group `k` (learning rate `lr_k`), at its
//! `t`-th update:
//! ```text
//! Adam:  g ← g + wd·p                        (coupled L2, as torch.optim.Adam)
//! AdamW: p ← p·(1 − lr·wd)                   (decoupled, as torch.optim.AdamW)
//! m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²
//! p ← p − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{COptimizer, Kind, Tensor, nn};

/// Which kind of weight decay the optimizer applies.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OptimKind {
    /// Coupled L2: the decay is added to the gradient (`g += wd·p`) and so goes through the
    /// moments, like `torch.optim.Adam(weight_decay=..)`.
    Adam,
    /// Decoupled decay: the parameter shrinks by `1 − lr·wd` before the Adam update, like
    /// `torch.optim.AdamW`.
    AdamW,
}

/// Hyper-parameters of [`Optimizer`] that do not change during training (the learning rate,
/// which does, is set per group with [`Optimizer::set_lr`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// When set, the global L2 norm of all gradients is scaled down to at most this value
    /// before the update (like `torch.nn.utils.clip_grad_norm_`).
    pub clip_grad_norm: Option<f64>,
}

impl Default for OptimConfig {
    /// AdamW with PyTorch's betas and eps, weight decay 1e-3, no clipping.
    fn default() -> Self {
        OptimConfig {
            kind: OptimKind::AdamW,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-3,
            clip_grad_norm: None,
        }
    }
}

impl OptimConfig {
    /// Checks the values a config file could get wrong: betas in [0, 1), eps > 0,
    /// weight decay >= 0, clipping norm > 0 (all finite).
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |field: &'static str, value: f64, expected: &'static str| {
            Err(OptimError::Config {
                field,
                value,
                expected,
            })
        };
        let unit = |x: f64| (0.0..1.0).contains(&x);
        if !unit(self.beta1) {
            return bad("beta1", self.beta1, "in [0, 1)");
        }
        if !unit(self.beta2) {
            return bad("beta2", self.beta2, "in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps, "positive");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "non-negative");
        }
        match self.clip_grad_norm {
            Some(c) if !(c.is_finite() && c > 0.0) => bad("clip_grad_norm", c, "positive"),
            _ => Ok(()),
        }
    }
}

/// Errors of [`OptimConfig::validate`], [`Optimizer::save`] and [`Optimizer::load`].
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer config: {field} = {value} must be {expected}")]
    Config {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("cannot write optimizer state to {path}: {source}")]
    Save {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("cannot read optimizer state from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("optimizer state {path} has no tensor `{name}`")]
    Missing { path: PathBuf, name: String },
    #[error("optimizer state {path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("optimizer state {path}: tensor `{name}` is not a valid step count ({reason})")]
    BadStep {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

/// One trainable variable with its Adam state.
#[derive(Debug)]
struct Param {
    name: String,
    tensor: Tensor,
    group: usize,
    /// False for 1-D variables when the optimizer was built with `no_decay_1d`.
    decay: bool,
    /// First moment (`m`), same shape, kind and device as the parameter.
    m: Tensor,
    /// Second moment (`v`).
    v: Tensor,
    /// Number of updates this variable received (its bias-correction `t`).
    steps: i64,
}

/// Adam/AdamW over the trainable variables of a `VarStore`, with per-group learning rates and
/// a state that [`save`](Optimizer::save)/[`load`](Optimizer::load) can persist.
///
/// `Send` (it holds tensors), not `Sync`.
#[derive(Debug)]
pub struct Optimizer {
    cfg: OptimConfig,
    /// Sorted by variable name, so that iteration (and the saved file) is deterministic.
    params: Vec<Param>,
    lrs: Vec<f64>,
    steps: i64,
    /// A libtorch optimizer over the same tensors, used only for its `zero_grad`, which sets
    /// gradients to undefined ("set_to_none"); tch exposes no other way to drop a gradient.
    /// `None` only if libtorch failed to build it; then gradients are zero-filled instead.
    grad_clearer: Option<COptimizer>,
}

/// Learning rate every group starts with (PyTorch's Adam default); a schedule normally sets
/// it with [`Optimizer::set_lr`] before the first step.
const DEFAULT_LR: f64 = 1e-3;

impl Optimizer {
    /// Takes the trainable variables of `vs`, grouped by their tch group
    /// ([`nn::Path::set_group`]). Group `g` gets the learning rate set by `set_lr(g, ..)`
    /// (every group starts at 1e-3).
    ///
    /// With `no_decay_1d`, variables of at most one dimension — biases, BatchNorm/LayerNorm
    /// weights and biases, scalars like a GeM exponent — get no weight decay, which is the
    /// common practice (decaying a normalisation scale or a bias towards zero only hurts).
    ///
    /// The variables are those present now: unlike `nn::Optimizer`, variables created in `vs`
    /// later are not picked up. Variables with no elements are skipped (nothing to update).
    /// Build the optimizer after moving the store to its device and kind: the moments are
    /// created like the parameters.
    pub fn new(vs: &nn::VarStore, cfg: OptimConfig, no_decay_1d: bool) -> Optimizer {
        let named = vs.variables();
        // Trainable variables carry their group but no name: find the name by identity.
        let mut by_ptr: HashMap<usize, Vec<(&String, &Tensor)>> = HashMap::new();
        for (name, t) in &named {
            by_ptr
                .entry(t.data_ptr() as usize)
                .or_default()
                .push((name, t));
        }
        let trainable: Vec<(Tensor, usize)> = {
            let vars = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
            vars.trainable_variables
                .iter()
                .map(|v| (v.tensor.shallow_clone(), v.group))
                .collect()
        };
        let mut params = Vec::with_capacity(trainable.len());
        for (tensor, group) in trainable {
            if tensor.numel() == 0 {
                continue;
            }
            let name = by_ptr
                .get(&(tensor.data_ptr() as usize))
                .and_then(|c| c.iter().find(|(_, t)| t.is_set_to(&tensor)))
                .map(|(n, _)| (*n).clone());
            // Every trainable variable is also a named one in a VarStore; keep a name anyway.
            let name = name.unwrap_or_else(|| format!("__unnamed{}", params.len()));
            let decay = !(no_decay_1d && tensor.dim() <= 1);
            let (m, v) = tch::no_grad(|| (tensor.zeros_like(), tensor.zeros_like()));
            params.push(Param {
                name,
                tensor,
                group,
                decay,
                m,
                v,
                steps: 0,
            });
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        let groups = params.iter().map(|p| p.group + 1).max().unwrap_or(0);
        let grad_clearer = COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)
            .ok()
            .and_then(|mut o| {
                for p in &params {
                    o.add_parameters(&p.tensor, 0).ok()?;
                }
                Some(o)
            });
        Optimizer {
            cfg,
            params,
            lrs: vec![DEFAULT_LR; groups],
            steps: 0,
            grad_clearer,
        }
    }

    /// The configuration the optimizer was built with.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Number of parameter groups: the highest group index among the variables, plus one
    /// (groups without variables in between count too); 0 for a store without variables.
    pub fn groups(&self) -> usize {
        self.lrs.len()
    }

    /// Sets the learning rate of `group`.
    ///
    /// # Panics
    /// If `group >= self.groups()`.
    pub fn set_lr(&mut self, group: usize, lr: f64) {
        let n = self.lrs.len();
        match self.lrs.get_mut(group) {
            Some(slot) => *slot = lr,
            None => panic!("set_lr: group {group} does not exist (the optimizer has {n} groups)"),
        }
    }

    /// Learning rate of `group`.
    ///
    /// # Panics
    /// If `group >= self.groups()`.
    pub fn lr(&self, group: usize) -> f64 {
        match self.lrs.get(group) {
            Some(lr) => *lr,
            None => panic!(
                "lr: group {group} does not exist (the optimizer has {} groups)",
                self.lrs.len()
            ),
        }
    }

    /// Drops the gradients of all variables (sets them to undefined, like PyTorch's
    /// `zero_grad(set_to_none=True)`), so that a variable the next forward does not use has
    /// no gradient and is skipped by [`step`](Optimizer::step).
    pub fn zero_grad(&mut self) {
        let cleared = self
            .grad_clearer
            .as_ref()
            .is_some_and(|o| o.zero_grad().is_ok());
        if !cleared {
            for p in &mut self.params {
                p.tensor.zero_grad();
            }
        }
    }

    /// One update under `no_grad`. Clips the global L2 norm of all gradients to
    /// `clip_grad_norm` when set (the gradients are scaled in place, as
    /// `clip_grad_norm_` does). Returns the global gradient norm before clipping.
    /// Variables without a gradient (not used in the forward) are skipped and keep their
    /// moments and their own step count (the bias correction is per variable, as in PyTorch).
    ///
    /// If the norm is not finite (NaN/inf gradients), nothing is updated and no step is
    /// counted, so the moments are not poisoned; the caller sees the non-finite norm.
    pub fn step(&mut self) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                g.defined().then_some(g)
            })
            .collect();
        let norms: Vec<Tensor> = grads
            .iter()
            .flatten()
            .map(|g| {
                let kind = if g.kind() == Kind::Double {
                    Kind::Double
                } else {
                    Kind::Float
                };
                g.norm_scalaropt_dtype(2.0, kind).to_kind(Kind::Double)
            })
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let norm = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if !norm.is_finite() {
            return norm;
        }
        if let Some(max) = self.cfg.clip_grad_norm {
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                for g in grads.iter().flatten() {
                    let _ = g.shallow_clone().g_mul_scalar_(coef);
                }
            }
        }
        let OptimConfig {
            kind,
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.cfg;
        for (p, g) in self.params.iter_mut().zip(&grads) {
            let Some(g) = g else { continue };
            let lr = self.lrs[p.group];
            let wd = if p.decay { weight_decay } else { 0.0 };
            if p.m.device() != p.tensor.device() {
                p.m = p.m.to_device(p.tensor.device());
                p.v = p.v.to_device(p.tensor.device());
            }
            let g = match kind {
                OptimKind::Adam if wd != 0.0 => g + &p.tensor * wd,
                _ => g.shallow_clone(),
            };
            if kind == OptimKind::AdamW && wd != 0.0 {
                let _ = p.tensor.g_mul_scalar_(1.0 - lr * wd);
            }
            p.steps += 1;
            let t = p.steps as f64;
            // m ← β1·m + (1−β1)·g and v ← β2·v + (1−β2)·g², one pass each (as torch's
            // `_foreach` implementation does it).
            let _ = p.m.lerp_(&g, 1.0 - beta1);
            let _ = p.v.lerp_(&g.square(), 1.0 - beta2);
            if lr != 0.0 {
                let bc1 = 1.0 - beta1.powf(t);
                let bc2 = 1.0 - beta2.powf(t);
                // p ← p − lr/bc1 · m / (√v/√bc2 + ε), written as p ← p + m / (a·√v + b) with
                // a = −bc1/(lr·√bc2) and b = −ε·bc1/lr so that it takes three passes.
                let a = -bc1 / (lr * bc2.sqrt());
                let b = -eps * bc1 / lr;
                let mut denom = p.v.sqrt();
                let _ = denom.g_mul_scalar_(a).g_add_scalar_(b);
                let _ = p.tensor.addcdiv_(&p.m, &denom);
            }
        }
        self.steps += 1;
        norm
    }

    /// Number of [`step`](Optimizer::step) calls that updated (restored by `load`).
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// The state as named tensors, as a checkpoint holds it: `step` (the optimizer's step
    /// count), and per variable `m.<name>`, `v.<name>` (moments) and `step.<name>` (its own
    /// update count, for the bias correction). All on the CPU, contiguous.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).contiguous();
        let mut out = Vec::with_capacity(3 * self.params.len() + 1);
        out.push(("step".to_string(), Tensor::from(self.steps)));
        for p in &self.params {
            out.push((format!("m.{}", p.name), cpu(&p.m)));
            out.push((format!("v.{}", p.name), cpu(&p.v)));
            out.push((format!("step.{}", p.name), Tensor::from(p.steps)));
        }
        out
    }

    /// Writes [`state_tensors`](Optimizer::state_tensors) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let state = tch::no_grad(|| self.state_tensors());
        Tensor::write_safetensors(&state, path).map_err(|source| OptimError::Save {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Restores the state written by [`save`](Optimizer::save). Every tensor of this
    /// optimizer's variables must be in the file with the right shape; everything is checked
    /// before anything is changed, so on error the optimizer is as it was. Extra tensors in
    /// the file are ignored. Learning rates are not part of the state (the schedule sets them).
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let file = Tensor::read_safetensors(path).map_err(|source| OptimError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file: HashMap<String, Tensor> = file.into_iter().collect();
        let mut take = |name: &str| {
            file.remove(name).ok_or_else(|| OptimError::Missing {
                path: path.to_path_buf(),
                name: name.to_string(),
            })
        };
        let read_step = |name: &str, t: Tensor| -> Result<i64, OptimError> {
            let bad = |reason: String| OptimError::BadStep {
                path: path.to_path_buf(),
                name: name.to_string(),
                reason,
            };
            if t.numel() != 1 {
                return Err(bad(format!("{} elements", t.numel())));
            }
            if t.kind() != Kind::Int64 {
                return Err(bad(format!("kind {:?}", t.kind())));
            }
            let s = t.reshape([-1]).int64_value(&[0]);
            if s < 0 {
                return Err(bad(format!("negative value {s}")));
            }
            Ok(s)
        };
        let steps = read_step("step", take("step")?)?;
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut moment = |prefix: &str| {
                let name = format!("{prefix}.{}", p.name);
                let t = take(&name)?;
                if t.size() != p.tensor.size() {
                    return Err(OptimError::Shape {
                        path: path.to_path_buf(),
                        name,
                        expected: p.tensor.size(),
                        found: t.size(),
                    });
                }
                Ok(t)
            };
            let m = moment("m")?;
            let v = moment("v")?;
            let name = format!("step.{}", p.name);
            let s = read_step(&name, take(&name)?)?;
            loaded.push((m, v, s));
        }
        tch::no_grad(|| {
            for (p, (m, v, s)) in self.params.iter_mut().zip(loaded) {
                let (device, kind) = (p.tensor.device(), p.tensor.kind());
                p.m = m.to_device(device).to_kind(kind);
                p.v = v.to_device(device).to_kind(kind);
                p.steps = s;
            }
        });
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;
    use tch::nn::{Module, OptimizerConfig};

    /// Two linear layers; the first in group 0, the second in group 1.
    struct Net {
        l1: nn::Linear,
        l2: nn::Linear,
    }

    fn net(vs: &nn::VarStore) -> Net {
        let root = vs.root();
        let l1 = nn::linear(&root / "l1", 4, 6, Default::default());
        let l2 = nn::linear(root.sub("l2").set_group(1), 6, 3, Default::default());
        Net { l1, l2 }
    }

    impl Net {
        fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
            let out = x.apply(&self.l1).tanh().apply(&self.l2);
            (out - y).square().mean(Kind::Float)
        }
    }

    /// Deterministic values without the global RNG (tests run in parallel threads, so
    /// `manual_seed` in one test would race with another).
    fn det(shape: &[i64], seed: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, tch::kind::FLOAT_CPU) * 0.7 + seed)
            .sin()
            .view(shape)
    }

    fn data(seed: i64) -> (Tensor, Tensor) {
        (det(&[8, 4], seed as f64), det(&[8, 3], seed as f64 + 0.5))
    }

    /// The net with values that depend only on `seed`.
    fn model(seed: i64) -> (nn::VarStore, Net) {
        let vs = nn::VarStore::new(Device::Cpu);
        let n = net(&vs);
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (i, (_, mut t)) in vars.into_iter().enumerate() {
                let v = det(&t.size(), (seed * 10 + i as i64) as f64) * 0.5;
                t.copy_(&v);
            }
        });
        (vs, n)
    }

    fn max_diff(a: &nn::VarStore, b: &nn::VarStore) -> f64 {
        let bv = b.variables();
        a.variables()
            .iter()
            .map(|(k, t)| (t - &bv[k]).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    fn run_ours(kind: OptimKind, wd: f64, steps: usize) -> nn::VarStore {
        let (vs, n) = model(1);
        let (x, y) = data(2);
        let cfg = OptimConfig {
            kind,
            weight_decay: wd,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&vs, cfg, false);
        assert_eq!(opt.groups(), 2);
        opt.set_lr(0, 1e-2);
        opt.set_lr(1, 3e-2);
        for _ in 0..steps {
            opt.zero_grad();
            n.loss(&x, &y).backward();
            opt.step();
        }
        vs
    }

    #[test]
    fn matches_tch_adamw_and_adam() {
        for kind in [OptimKind::AdamW, OptimKind::Adam] {
            let ours = run_ours(kind, 0.05, 5);
            let (vs, n) = model(1);
            let (x, y) = data(2);
            let mut opt = match kind {
                OptimKind::AdamW => nn::AdamW {
                    wd: 0.05,
                    ..Default::default()
                }
                .build(&vs, 1e-2),
                OptimKind::Adam => nn::Adam {
                    wd: 0.05,
                    ..Default::default()
                }
                .build(&vs, 1e-2),
            }
            .unwrap();
            opt.set_lr_group(0, 1e-2);
            opt.set_lr_group(1, 3e-2);
            for _ in 0..5 {
                opt.zero_grad();
                n.loss(&x, &y).backward();
                opt.step();
            }
            let d = max_diff(&ours, &vs);
            let moved = max_diff(&ours, &model(1).0);
            eprintln!("{kind:?}: max |ours - tch| = {d:e}, moved {moved:e}");
            assert!(d < 1e-6, "{kind:?}: differs from tch by {d}");
            assert!(moved > 1e-2, "{kind:?}: parameters did not move ({moved})");
        }
    }

    #[test]
    fn adam_and_adamw_differ_with_decay() {
        let a = run_ours(OptimKind::Adam, 0.5, 3);
        let w = run_ours(OptimKind::AdamW, 0.5, 3);
        assert!(max_diff(&a, &w) > 1e-4);
    }

    #[test]
    fn resume_from_saved_state_equals_uninterrupted() {
        let dir = std::env::temp_dir().join(format!("optim-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = OptimConfig {
            weight_decay: 0.05,
            clip_grad_norm: Some(0.5),
            ..Default::default()
        };
        let train = |vs: &nn::VarStore, n: &Net, opt: &mut Optimizer, steps: usize| {
            let (x, y) = data(2);
            for s in 0..steps {
                opt.set_lr(0, 1e-2 / (1.0 + s as f64));
                opt.set_lr(1, 2e-2);
                opt.zero_grad();
                n.loss(&x, &y).backward();
                opt.step();
            }
            let _ = vs;
        };
        // Uninterrupted: 6 steps (lr schedule restarts at 3 in both runs).
        let (vs_full, n_full) = model(1);
        let mut opt_full = Optimizer::new(&vs_full, cfg.clone(), true);
        train(&vs_full, &n_full, &mut opt_full, 3);
        train(&vs_full, &n_full, &mut opt_full, 3);

        let (vs_a, n_a) = model(1);
        let mut opt_a = Optimizer::new(&vs_a, cfg.clone(), true);
        train(&vs_a, &n_a, &mut opt_a, 3);
        vs_a.save(dir.join("model.safetensors")).unwrap();
        opt_a.save(&dir.join("optim.safetensors")).unwrap();
        drop((vs_a, n_a, opt_a));

        let (mut vs_b, n_b) = model(99);
        vs_b.load(dir.join("model.safetensors")).unwrap();
        let mut opt_b = Optimizer::new(&vs_b, cfg, true);
        opt_b.load(&dir.join("optim.safetensors")).unwrap();
        assert_eq!(opt_b.steps(), 3);
        train(&vs_b, &n_b, &mut opt_b, 3);
        assert_eq!(opt_b.steps(), 6);
        let d = max_diff(&vs_full, &vs_b);
        eprintln!("resume: max diff {d:e}");
        assert!(d <= 1e-7, "resumed run differs by {d}");

        // Control: resuming the parameters without the optimizer state does differ.
        let (mut vs_c, n_c) = model(99);
        vs_c.load(dir.join("model.safetensors")).unwrap();
        let mut opt_c = Optimizer::new(
            &vs_c,
            OptimConfig {
                weight_decay: 0.05,
                clip_grad_norm: Some(0.5),
                ..Default::default()
            },
            true,
        );
        train(&vs_c, &n_c, &mut opt_c, 3);
        let d = max_diff(&vs_full, &vs_c);
        assert!(
            d > 1e-4,
            "control run should differ without the optimizer state ({d})"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn clipping_returns_pre_clip_norm_and_uses_clipped_grad() {
        let (vs, n) = model(1);
        let (x, y) = data(2);
        let max = 0.05;
        let cfg = OptimConfig {
            clip_grad_norm: Some(max),
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&vs, cfg.clone(), false);
        opt.zero_grad();
        (n.loss(&x, &y) * 100.0).backward();
        let grads: Vec<Tensor> = opt.params.iter().map(|p| p.tensor.grad().copy()).collect();
        let expected: f64 = grads
            .iter()
            .map(|g| g.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        assert!(
            expected > max * 10.0,
            "test needs a large gradient, got {expected}"
        );
        let norm = opt.step();
        assert!(
            (norm - expected).abs() < 1e-4 * expected,
            "returned {norm}, expected {expected}"
        );
        let coef = max / (expected + 1e-6);
        let mut after = 0.0;
        for (p, g) in opt.params.iter().zip(&grads) {
            // m after one step = (1 − β1)·g_clipped.
            let want = g * (coef * (1.0 - cfg.beta1));
            let d = (&p.m - want).abs().max().double_value(&[]);
            assert!(
                d < 1e-7,
                "{}: first moment not from the clipped gradient ({d})",
                p.name
            );
            after += p.tensor.grad().square().sum(Kind::Double).double_value(&[]);
        }
        assert!(
            (after.sqrt() - max).abs() < 1e-5,
            "grads not clipped in place: {}",
            after.sqrt()
        );
    }

    #[test]
    fn unused_variables_are_skipped_and_keep_moments() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let used = root.var("used", &[3], nn::Init::Const(1.0));
        let unused = root.var("unused", &[2, 2], nn::Init::Const(1.0));
        let mut opt = Optimizer::new(&vs, OptimConfig::default(), false);
        opt.zero_grad();
        (&used * &unused.sum(Kind::Float))
            .sum(Kind::Float)
            .backward();
        opt.step();
        let m_unused = opt
            .params
            .iter()
            .find(|p| p.name == "unused")
            .unwrap()
            .m
            .copy();
        let before = unused.copy();
        opt.zero_grad();
        assert!(!unused.grad().defined(), "zero_grad must drop the gradient");
        used.sum(Kind::Float).backward();
        opt.step();
        let p = opt.params.iter().find(|p| p.name == "unused").unwrap();
        assert_eq!(p.steps, 1);
        assert_eq!((&p.m - m_unused).abs().max().double_value(&[]), 0.0);
        assert_eq!((&unused - before).abs().max().double_value(&[]), 0.0);
        assert_eq!(
            opt.params.iter().find(|p| p.name == "used").unwrap().steps,
            2
        );
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn no_decay_for_1d_variables() {
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "fc", 3, 2, Default::default());
        let (w0, b0) = (lin.ws.copy(), lin.bs.as_ref().unwrap().copy());
        let cfg = OptimConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&vs, cfg, true);
        opt.set_lr(0, 0.1);
        opt.zero_grad();
        // Zero gradient: Adam's own update is 0, only the decay moves a parameter.
        (lin.forward(&Tensor::ones([1, 3], tch::kind::FLOAT_CPU)) * 0.0)
            .sum(Kind::Float)
            .backward();
        opt.step();
        let dw = (&lin.ws - &w0 * (1.0 - 0.1 * 0.5))
            .abs()
            .max()
            .double_value(&[]);
        let db = (lin.bs.as_ref().unwrap() - &b0)
            .abs()
            .max()
            .double_value(&[]);
        assert!(dw < 1e-7, "weight not decayed ({dw})");
        assert_eq!(db, 0.0, "bias decayed");
    }

    #[test]
    fn non_finite_gradient_skips_the_update() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2], nn::Init::Const(1.0));
        let mut opt = Optimizer::new(&vs, OptimConfig::default(), false);
        opt.zero_grad();
        (&w * f64::NAN).sum(Kind::Float).backward();
        assert!(opt.step().is_nan());
        assert_eq!(opt.steps(), 0);
        assert_eq!(w.sum(Kind::Float).double_value(&[]), 2.0);
    }

    #[test]
    fn load_names_missing_and_misshapen_tensors() {
        let dir = std::env::temp_dir().join(format!("optim-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (vs, _n) = model(1);
        let mut opt = Optimizer::new(&vs, OptimConfig::default(), false);
        let path = dir.join("partial.safetensors");
        let state: Vec<(String, Tensor)> = opt
            .state_tensors()
            .into_iter()
            .filter(|(n, _)| n != "v.l2.weight")
            .collect();
        Tensor::write_safetensors(&state, &path).unwrap();
        let err = opt.load(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, OptimError::Missing { name, .. } if name == "v.l2.weight"),
            "{msg}"
        );
        assert!(
            msg.contains("v.l2.weight") && msg.contains("partial.safetensors"),
            "{msg}"
        );

        let mut state = opt.state_tensors();
        for (n, t) in &mut state {
            if n == "m.l1.weight" {
                *t = Tensor::zeros([2, 2], tch::kind::FLOAT_CPU);
            }
        }
        let path = dir.join("shape.safetensors");
        Tensor::write_safetensors(&state, &path).unwrap();
        let msg = opt.load(&path).unwrap_err().to_string();
        assert!(
            msg.contains("m.l1.weight") && msg.contains("[2, 2]") && msg.contains("[6, 4]"),
            "{msg}"
        );

        let msg = opt
            .load(&dir.join("nope.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nope.safetensors"), "{msg}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn config_validation_and_serde() {
        let d = OptimConfig::default();
        assert!(d.validate().is_ok());
        let msg = OptimConfig {
            beta2: 1.0,
            ..d.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(msg.contains("beta2"), "{msg}");
        let clip = OptimConfig {
            clip_grad_norm: Some(0.0),
            ..d.clone()
        };
        assert!(matches!(
            clip.validate(),
            Err(OptimError::Config {
                field: "clip_grad_norm",
                ..
            })
        ));
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<OptimConfig>(&json).unwrap(), d);
    }

    #[test]
    fn groups_and_lrs() {
        let (vs, _n) = model(1);
        let mut opt = Optimizer::new(&vs, OptimConfig::default(), true);
        assert_eq!(opt.groups(), 2);
        assert_eq!(opt.lr(1), DEFAULT_LR);
        opt.set_lr(1, 0.5);
        assert_eq!(opt.lr(1), 0.5);
        let names: Vec<&str> = opt.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]);
        let groups: Vec<usize> = opt.params.iter().map(|p| p.group).collect();
        assert_eq!(groups, [0, 0, 1, 1]);
        fn is_send<T: Send>() {}
        is_send::<Optimizer>();
    }
}
