//! The neck between a backbone and the metric-learning losses: global pooling of the feature
//! map, then Linear → BatchNorm1d to the embedding (the "BNNeck" of re-identification work).
//! The embedding is returned before any L2 normalisation: losses and retrieval normalise it
//! themselves.

use tch::{Kind, Tensor, nn};

/// How the `[N, C, h, w]` feature map is reduced to `[N, C]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Pooling {
    /// Global average pooling.
    Avg,
    /// Generalised mean pooling (Radenović et al.): `(mean_hw clamp(x, eps)^p)^(1/p)`.
    /// `p = 1` is average pooling, large `p` tends to max pooling; 3 is the usual start.
    /// With `learnable`, `p` is a trainable variable.
    Gem { p: f64, learnable: bool, eps: f64 },
}

/// Configuration of a [`Neck`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NeckConfig {
    pub pooling: Pooling,
    pub embedding_dim: i64,
    /// Dropout probability on the pooled vector, in training only (0 disables it).
    pub dropout: f64,
}

impl Default for NeckConfig {
    /// Learnable GeM starting at p = 3, a 256-d embedding, no dropout.
    fn default() -> Self {
        NeckConfig {
            pooling: Pooling::Gem {
                p: 3.0,
                learnable: true,
                eps: 1e-6,
            },
            embedding_dim: 256,
            dropout: 0.0,
        }
    }
}

/// A [`NeckConfig`] value out of range, found by [`NeckConfig::validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NeckError {
    #[error("neck: embedding_dim must be positive, got {0}")]
    EmbeddingDim(i64),
    #[error("neck: dropout must be in [0, 1), got {0}")]
    Dropout(f64),
    #[error("neck: GeM p must be a positive finite number, got {0}")]
    GemP(f64),
    #[error("neck: GeM eps must be a positive finite number, got {0}")]
    GemEps(f64),
}

impl NeckConfig {
    /// Checks the values a config file could get wrong; [`Neck::new`] panics on them.
    pub fn validate(&self) -> Result<(), NeckError> {
        if self.embedding_dim <= 0 {
            return Err(NeckError::EmbeddingDim(self.embedding_dim));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(NeckError::Dropout(self.dropout));
        }
        if let Pooling::Gem { p, eps, .. } = self.pooling {
            if !(p.is_finite() && p > 0.0) {
                return Err(NeckError::GemP(p));
            }
            if !(eps.is_finite() && eps > 0.0) {
                return Err(NeckError::GemEps(eps));
            }
        }
        Ok(())
    }
}

/// Pooling + Linear + BatchNorm1d. `Send` (it holds tensors), not `Sync`.
#[derive(Debug)]
pub struct Neck {
    /// `Some` for GeM: the exponent, a `[1]` variable (trainable only when learnable).
    gem_p: Option<Tensor>,
    gem_eps: f64,
    fc: nn::Linear,
    bn: nn::BatchNorm,
    dropout: f64,
    embedding_dim: i64,
}

impl Neck {
    /// Variables under `p`: `gem_p` (when Gem; trainable only if learnable), `fc.weight`,
    /// `fc.bias`, `bn.weight`, `bn.bias`, `bn.running_mean`, `bn.running_var`.
    ///
    /// Initialisation as in PyTorch: the Linear layer uses tch's `nn::linear` default
    /// (Kaiming-uniform weight, bias uniform in ±1/√in_channels, i.e. PyTorch's
    /// `nn.Linear`), BatchNorm weight 1 and bias 0 (set explicitly: tch's default BN weight
    /// is Uniform(0, 1)), running mean 0 and variance 1, eps 1e-5, momentum 0.1.
    /// The variables take the group of `p` (see [`nn::Path::set_group`]).
    ///
    /// # Panics
    /// If `in_channels <= 0` or `cfg` fails [`NeckConfig::validate`].
    pub fn new(p: &nn::Path, in_channels: i64, cfg: &NeckConfig) -> Neck {
        assert!(
            in_channels > 0,
            "neck: in_channels must be positive, got {in_channels}"
        );
        if let Err(e) = cfg.validate() {
            panic!("{e}");
        }
        let (gem_p, gem_eps) = match cfg.pooling {
            Pooling::Avg => (None, 0.0),
            Pooling::Gem {
                p: p0,
                learnable: true,
                eps,
            } => (Some(p.var("gem_p", &[1], nn::Init::Const(p0))), eps),
            Pooling::Gem {
                p: p0,
                learnable: false,
                eps,
            } => {
                let mut t = p.zeros_no_train("gem_p", &[1]);
                tch::no_grad(|| {
                    let _ = t.fill_(p0);
                });
                (Some(t), eps)
            }
        };
        let fc = nn::linear(p / "fc", in_channels, cfg.embedding_dim, Default::default());
        let bn_cfg = nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let bn = nn::batch_norm1d(p / "bn", cfg.embedding_dim, bn_cfg);
        Neck {
            gem_p,
            gem_eps,
            fc,
            bn,
            dropout: cfg.dropout,
            embedding_dim: cfg.embedding_dim,
        }
    }

    /// Length of the embedding.
    pub fn embedding_dim(&self) -> i64 {
        self.embedding_dim
    }

    /// Current GeM exponent (`None` for average pooling).
    pub fn gem_p(&self) -> Option<f64> {
        self.gem_p.as_ref().map(|p| p.double_value(&[0]))
    }

    /// `[N, C, h, w]` → `[N, C]`, in the kind of `features`. Pooling is computed in f32 when
    /// `features` is bf16/f16: `x^p` with p ≈ 3 over a whole map loses too much in bf16.
    ///
    /// # Panics
    /// If `features` is not 4-D.
    pub fn pool(&self, features: &Tensor) -> Tensor {
        self.pool_as(features, features.kind())
    }

    /// [`pool`](Neck::pool) with the result in `out`, so that bf16 features feeding an f32
    /// neck go from the f32 computation straight to f32, without a bf16 round trip.
    fn pool_as(&self, features: &Tensor, out: Kind) -> Tensor {
        assert_eq!(
            features.dim(),
            4,
            "neck: expected an [N, C, h, w] feature map, got {:?}",
            features.size()
        );
        let kind = features.kind();
        let compute = match kind {
            Kind::BFloat16 | Kind::Half => Kind::Float,
            k => k,
        };
        let x = features.to_kind(compute);
        let pooled = match &self.gem_p {
            None => x.mean_dim([2i64, 3].as_slice(), false, None::<Kind>),
            Some(p) => {
                let p = p.to_kind(compute);
                x.clamp_min(self.gem_eps)
                    .pow(&p)
                    .mean_dim([2i64, 3].as_slice(), false, None::<Kind>)
                    .pow(&p.reciprocal())
            }
        };
        pooled.to_kind(out)
    }

    /// `[N, C, h, w]` feature map → `[N, embedding_dim]` embedding (BN output, NOT
    /// normalised). GeM: `(mean over h,w of clamp(x, eps)^p)^(1/p)`. Dropout before fc in
    /// train mode.
    ///
    /// The pooled vector is cast to the kind of the neck's parameters, so a bf16 backbone
    /// can feed an f32 neck (the output is then f32); with a bf16 store the output is bf16.
    /// BatchNorm uses batch statistics (and updates its running statistics) in train mode
    /// and the running statistics in eval mode, where a batch of 1 works.
    ///
    /// # Panics
    /// If `features` is not 4-D, or in train mode with a batch of one (BatchNorm cannot take
    /// batch statistics of a single sample; PyTorch raises the same error).
    pub fn forward(&self, features: &Tensor, train: bool) -> Tensor {
        let n = features.size().first().copied().unwrap_or(0);
        assert!(
            !(train && n == 1),
            "neck: BatchNorm1d in train mode needs a batch of at least 2, got 1 (use eval mode)"
        );
        let mut x = self.pool_as(features, self.fc.ws.kind());
        if train && self.dropout > 0.0 {
            x = x.dropout(self.dropout, true);
        }
        x.apply(&self.fc).apply_t(&self.bn, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn gem(p: f64, learnable: bool) -> NeckConfig {
        NeckConfig {
            pooling: Pooling::Gem {
                p,
                learnable,
                eps: 1e-6,
            },
            embedding_dim: 8,
            dropout: 0.0,
        }
    }

    /// Positive deterministic features (no global RNG: tests run in parallel threads).
    fn feats(n: i64) -> Tensor {
        (Tensor::arange(n * 5 * 3 * 4, tch::kind::FLOAT_CPU) * 0.9)
            .sin()
            .abs()
            .view([n, 5, 3, 4])
            + 0.1
    }

    #[test]
    fn gem_p1_equals_average_pooling() {
        let vs = nn::VarStore::new(Device::Cpu);
        let gem1 = Neck::new(&(vs.root() / "a"), 5, &gem(1.0, false));
        let avg = Neck::new(
            &(vs.root() / "b"),
            5,
            &NeckConfig {
                pooling: Pooling::Avg,
                ..gem(1.0, false)
            },
        );
        let x = feats(2);
        let d = (gem1.pool(&x) - avg.pool(&x)).abs().max().double_value(&[]);
        assert!(d < 1e-6, "GeM(p=1) vs avg: {d}");
        let want = x.mean_dim([2i64, 3].as_slice(), false, None::<Kind>);
        assert!((avg.pool(&x) - want).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn gem_p3_hand_value() {
        let vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(&vs.root(), 2, &gem(3.0, false));
        // Channel 0: 1, 2, 3, 4 → (100/4)^(1/3). Channel 1: −5 and 0 clamp to eps, 2, 2
        // → ((2·eps³ + 16)/4)^(1/3) ≈ 4^(1/3).
        let x =
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, -5.0, 0.0, 2.0, 2.0]).view([1, 2, 2, 2]);
        let got = Vec::<f64>::try_from(neck.pool(&x).to_kind(Kind::Double).view([-1])).unwrap();
        assert!((got[0] - 25f64.cbrt()).abs() < 1e-5, "{got:?}");
        assert!((got[1] - 4f64.cbrt()).abs() < 1e-5, "{got:?}");
        assert_eq!(neck.gem_p(), Some(3.0));
    }

    #[test]
    fn learnable_p_gets_a_gradient_fixed_p_is_not_trainable() {
        let vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(&vs.root(), 5, &gem(3.0, true));
        neck.forward(&feats(4), true)
            .square()
            .sum(Kind::Float)
            .backward();
        let p = &vs.variables()["gem_p"];
        let g = p.grad();
        assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert_eq!(vs.trainable_variables().len(), 5); // gem_p, fc.{weight,bias}, bn.{weight,bias}

        let vs = nn::VarStore::new(Device::Cpu);
        let _neck = Neck::new(&vs.root(), 5, &gem(3.0, false));
        assert_eq!(vs.trainable_variables().len(), 4);
        assert!(!vs.variables()["gem_p"].requires_grad());
    }

    #[test]
    fn variables_shapes_and_bn_init() {
        let vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(&(vs.root() / "neck"), 5, &gem(3.0, true));
        let vars = vs.variables();
        let mut names: Vec<&str> = vars.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "neck.bn.bias",
                "neck.bn.running_mean",
                "neck.bn.running_var",
                "neck.bn.weight",
                "neck.fc.bias",
                "neck.fc.weight",
                "neck.gem_p"
            ]
        );
        let all = |name: &str, v: f64| {
            let t = &vars[name];
            t.eq(v).all().int64_value(&[]) == 1
        };
        assert!(all("neck.bn.weight", 1.0) && all("neck.bn.bias", 0.0));
        assert!(all("neck.bn.running_mean", 0.0) && all("neck.bn.running_var", 1.0));
        assert_eq!(vars["neck.fc.weight"].size(), [8, 5]);
        let bound = 1.0 / 5f64.sqrt();
        assert!(vars["neck.fc.bias"].abs().max().double_value(&[]) <= bound);
        let y = neck.forward(&feats(3), true);
        assert_eq!(y.size(), [3, 8]);
        assert_eq!(y.kind(), Kind::Float);
        assert_eq!(neck.embedding_dim(), 8);
    }

    #[test]
    fn batch_of_one_in_eval() {
        let vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(&vs.root(), 5, &gem(3.0, true));
        let y = neck.forward(&feats(1), false);
        assert_eq!(y.size(), [1, 8]);
        // Eval with fresh running stats (mean 0, var 1): BN is x/√(1+eps), so the embedding is
        // the fc output up to that factor.
        let fc = neck.pool(&feats(1)).apply(&neck.fc) / (1.0f64 + 1e-5).sqrt();
        assert!((y - fc).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    #[should_panic(expected = "batch of at least 2")]
    fn batch_of_one_in_train_panics() {
        let vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(&vs.root(), 5, &gem(3.0, true));
        let _ = neck.forward(&feats(1), true);
    }

    #[test]
    fn bf16_input() {
        // bf16 store and input → bf16 embedding.
        let mut vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(&vs.root(), 5, &gem(3.0, true));
        vs.bfloat16();
        let x = feats(3).to_kind(Kind::BFloat16);
        let y = neck.forward(&x, false);
        assert_eq!((y.kind(), y.size()), (Kind::BFloat16, vec![3, 8]));
        assert_eq!(neck.pool(&x).kind(), Kind::BFloat16);
        let y = neck.forward(&x, true);
        assert_eq!((y.kind(), y.size()), (Kind::BFloat16, vec![3, 8]));
        // f32 store, bf16 features → f32 embedding.
        let vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(&vs.root(), 5, &gem(3.0, true));
        let y = neck.forward(&x, false);
        assert_eq!((y.kind(), y.size()), (Kind::Float, vec![3, 8]));
    }

    #[test]
    fn dropout_only_in_train() {
        let vs = nn::VarStore::new(Device::Cpu);
        let neck = Neck::new(
            &vs.root(),
            5,
            &NeckConfig {
                dropout: 0.5,
                ..gem(3.0, true)
            },
        );
        let x = feats(4);
        let diff = |a: Tensor, b: Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(neck.forward(&x, true), neck.forward(&x, true)) > 0.0);
        assert_eq!(diff(neck.forward(&x, false), neck.forward(&x, false)), 0.0);
    }

    #[test]
    fn config_validation_and_default() {
        let d = NeckConfig::default();
        assert_eq!(
            d.pooling,
            Pooling::Gem {
                p: 3.0,
                learnable: true,
                eps: 1e-6
            }
        );
        assert_eq!((d.embedding_dim, d.dropout), (256, 0.0));
        assert!(d.validate().is_ok());
        assert_eq!(
            NeckConfig {
                embedding_dim: 0,
                ..d.clone()
            }
            .validate(),
            Err(NeckError::EmbeddingDim(0))
        );
        assert_eq!(
            NeckConfig {
                dropout: 1.0,
                ..d.clone()
            }
            .validate(),
            Err(NeckError::Dropout(1.0))
        );
        let bad_p = NeckConfig {
            pooling: Pooling::Gem {
                p: 0.0,
                learnable: true,
                eps: 1e-6,
            },
            ..d.clone()
        };
        assert_eq!(bad_p.validate(), Err(NeckError::GemP(0.0)));
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<NeckConfig>(&json).unwrap(), d);
        fn is_send<T: Send>() {}
        is_send::<Neck>();
    }
}
