//! Metric-learning losses on embeddings: a weighted sum of terms, each one of [`LossSpec`].
//!
//! Everything is computed in f32: the embedding (and any parameter, should the store have been
//! cast to bf16) is cast first, because the angular margin `cos(θ + m)` and the scale `s = 30`
//! lose the target logit in bf16 rounding.

use std::f64::consts::PI;

use tch::{Kind, Tensor, nn};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LossSpec {
    /// Additive angular margin (Deng et al., ArcFace). Usual values: s = 30, m = 0.5.
    ArcFace { s: f64, m: f64, easy_margin: bool },
    /// Sub-center ArcFace (Deng et al. 2020) with a dynamic per-class margin
    /// `m_c = margin_a · n_c^(−margin_lambda) + margin_b` (`n_c` = photos of class `c`, at least
    /// 1): rare individuals get larger margins. `k` sub-centers per class, the class cosine is
    /// the max over them.
    SubCenterArcFace {
        s: f64,
        k: i64,
        margin_a: f64,
        margin_lambda: f64,
        margin_b: f64,
        easy_margin: bool,
    },
    /// Batch-hard triplet loss (Hermans et al.) on L2-normalised embeddings with Euclidean
    /// distance: per anchor, its farthest positive and nearest negative; anchors without a
    /// positive or a negative in the batch are skipped. `Some(m)`: `max(0, d_ap − d_an + m)`;
    /// `None`: soft margin `log(1 + exp(d_ap − d_an))`.
    Triplet { margin: Option<f64> },
    /// Softmax cross-entropy of a linear classifier (with bias) on the raw embedding.
    CrossEntropy,
}

impl LossSpec {
    /// Name of the term in logs and the prefix of its parameters.
    pub fn name(&self) -> &'static str {
        match self {
            LossSpec::ArcFace { .. } => "arcface",
            LossSpec::SubCenterArcFace { .. } => "subcenter_arcface",
            LossSpec::Triplet { .. } => "triplet",
            LossSpec::CrossEntropy => "cross_entropy",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossError {
    #[error("a loss needs at least one term")]
    NoTerms,
    #[error("the embedding dimension must be positive, got {0}")]
    EmbeddingDim(i64),
    #[error("class counts: {0}")]
    ClassCounts(String),
    #[error("loss term {index} ({name}): {what}")]
    Term {
        index: usize,
        name: &'static str,
        what: String,
    },
}

/// `m_c = a · max(n_c, 1)^(−λ) + b` for each class.
pub fn dynamic_margins(class_counts: &[i64], a: f64, lambda: f64, b: f64) -> Vec<f64> {
    class_counts
        .iter()
        .map(|&n| a * (n.max(1) as f64).powf(-lambda) + b)
        .collect()
}

enum Term {
    ArcFace {
        w: Tensor,
        s: f64,
        m: f64,
        easy_margin: bool,
    },
    /// `w` is `[classes·k, dim]`, sub-center `j` of class `c` at row `c·k + j` (the layout of the
    /// common PyTorch implementation, so weights convert without reordering); `margins` `[classes]`.
    SubCenter {
        w: Tensor,
        k: i64,
        s: f64,
        margins: Tensor,
        easy_margin: bool,
    },
    Triplet {
        margin: Option<f64>,
    },
    CrossEntropy {
        linear: nn::Linear,
    },
}

pub struct Loss {
    /// (weight, name, term)
    terms: Vec<(f64, String, Term)>,
    classes: i64,
}

impl Loss {
    /// Parameters (class centers, classifier) are created under `p` (the caller puts p in the
    /// head's optimizer group), as `p / <term name> / …`; a term kind used twice gets its index
    /// appended to the name (`arcface_2`).
    ///
    /// # Panics
    /// On an invalid spec; [`Loss::try_new`] returns the error instead.
    pub fn new(
        p: &nn::Path,
        terms: &[(f64, LossSpec)],
        emb_dim: i64,
        class_counts: &[i64],
    ) -> Loss {
        Loss::try_new(p, terms, emb_dim, class_counts)
            .unwrap_or_else(|e| panic!("invalid loss: {e}"))
    }

    pub fn try_new(
        p: &nn::Path,
        terms: &[(f64, LossSpec)],
        emb_dim: i64,
        class_counts: &[i64],
    ) -> Result<Loss, LossError> {
        if terms.is_empty() {
            return Err(LossError::NoTerms);
        }
        if emb_dim <= 0 {
            return Err(LossError::EmbeddingDim(emb_dim));
        }
        if class_counts.is_empty() {
            return Err(LossError::ClassCounts("no classes".into()));
        }
        if let Some(n) = class_counts.iter().find(|&&n| n < 0) {
            return Err(LossError::ClassCounts(format!("negative count {n}")));
        }
        let classes = class_counts.len() as i64;
        let mut built = Vec::with_capacity(terms.len());
        for (index, (weight, spec)) in terms.iter().enumerate() {
            let name = spec.name();
            let bad = |what: String| LossError::Term { index, name, what };
            if !weight.is_finite() {
                return Err(bad(format!("weight {weight} is not finite")));
            }
            let label = if terms[..index].iter().any(|(_, s)| s.name() == name) {
                format!("{name}_{index}")
            } else {
                name.to_string()
            };
            let tp = p / label.as_str();
            let term = match *spec {
                LossSpec::ArcFace { s, m, easy_margin } => {
                    check_scale(s).map_err(bad)?;
                    check_margin(m).map_err(bad)?;
                    // Xavier-uniform, as the reference implementations initialise the centers.
                    let bound = (6.0 / (classes + emb_dim) as f64).sqrt();
                    let w = tp.var(
                        "weight",
                        &[classes, emb_dim],
                        nn::Init::Uniform {
                            lo: -bound,
                            up: bound,
                        },
                    );
                    Term::ArcFace {
                        w,
                        s,
                        m,
                        easy_margin,
                    }
                }
                LossSpec::SubCenterArcFace {
                    s,
                    k,
                    margin_a,
                    margin_lambda,
                    margin_b,
                    easy_margin,
                } => {
                    check_scale(s).map_err(bad)?;
                    if k < 1 {
                        return Err(bad(format!("k = {k}: needs at least one sub-center")));
                    }
                    let margins = dynamic_margins(class_counts, margin_a, margin_lambda, margin_b);
                    for (c, &m) in margins.iter().enumerate() {
                        check_margin(m).map_err(|e| {
                            bad(format!("class {c} (n = {}): {e}", class_counts[c]))
                        })?;
                    }
                    // 1/√dim uniform, as the common sub-center implementation.
                    let bound = 1.0 / (emb_dim as f64).sqrt();
                    let w = tp.var(
                        "weight",
                        &[classes * k, emb_dim],
                        nn::Init::Uniform {
                            lo: -bound,
                            up: bound,
                        },
                    );
                    let margins = Tensor::from_slice(&margins)
                        .to_kind(Kind::Float)
                        .to_device(p.device());
                    Term::SubCenter {
                        w,
                        k,
                        s,
                        margins,
                        easy_margin,
                    }
                }
                LossSpec::Triplet { margin } => {
                    if let Some(m) = margin
                        && !(m.is_finite() && m >= 0.0)
                    {
                        return Err(bad(format!("margin {m} must be finite and ≥ 0")));
                    }
                    Term::Triplet { margin }
                }
                LossSpec::CrossEntropy => Term::CrossEntropy {
                    linear: nn::linear(&tp, emb_dim, classes, Default::default()),
                },
            };
            built.push((*weight, label, term));
        }
        Ok(Loss {
            terms: built,
            classes,
        })
    }

    /// Weighted sum of the terms; `labels` int64 `[N]` in `0..class_counts.len()`, `emb`
    /// `[N, emb_dim]` of any float kind.
    pub fn forward(&self, emb: &Tensor, labels: &Tensor) -> Tensor {
        self.compute(emb, labels).0
    }

    /// The weighted sum and each term's own (unweighted) value, for logging. Reading the
    /// values waits for the device.
    pub fn forward_terms(&self, emb: &Tensor, labels: &Tensor) -> (Tensor, Vec<(String, f64)>) {
        let (total, parts) = self.compute(emb, labels);
        let values = parts
            .into_iter()
            .map(|(name, t)| (name, t.double_value(&[])))
            .collect();
        (total, values)
    }

    fn compute(&self, emb: &Tensor, labels: &Tensor) -> (Tensor, Vec<(String, Tensor)>) {
        let emb = emb.to_kind(Kind::Float);
        let labels = labels.to_kind(Kind::Int64).to_device(emb.device());
        let mut total: Option<Tensor> = None;
        let mut parts = Vec::with_capacity(self.terms.len());
        for (weight, name, term) in &self.terms {
            let value = match term {
                Term::ArcFace {
                    w,
                    s,
                    m,
                    easy_margin,
                } => {
                    let cos = cosine(&emb, w);
                    let m = Tensor::full([emb.size()[0], 1], *m, (Kind::Float, emb.device()));
                    margin_cross_entropy(&cos, &labels, &m, *s, *easy_margin, self.classes)
                }
                Term::SubCenter {
                    w,
                    k,
                    s,
                    margins,
                    easy_margin,
                } => {
                    let n = emb.size()[0];
                    let (cos, _) = cosine(&emb, w)
                        .view([n, self.classes, *k])
                        .max_dim(2, false);
                    let m = margins
                        .to_device(emb.device())
                        .index_select(0, &labels)
                        .unsqueeze(1);
                    margin_cross_entropy(&cos, &labels, &m, *s, *easy_margin, self.classes)
                }
                Term::Triplet { margin } => batch_hard_triplet(&emb, &labels, *margin),
                Term::CrossEntropy { linear } => {
                    let bs = linear.bs.as_ref().map(|b| b.to_kind(Kind::Float));
                    emb.linear(&linear.ws.to_kind(Kind::Float), bs.as_ref())
                        .cross_entropy_for_logits(&labels)
                }
            };
            let weighted = &value * *weight;
            total = Some(match total {
                Some(t) => t + weighted,
                None => weighted,
            });
            parts.push((name.clone(), value));
        }
        // try_new refuses an empty term list, so there is always a total.
        let total = total.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, emb.device())));
        (total, parts)
    }
}

fn check_scale(s: f64) -> Result<(), String> {
    if s.is_finite() && s > 0.0 {
        Ok(())
    } else {
        Err(format!("scale s = {s} must be finite and > 0"))
    }
}

fn check_margin(m: f64) -> Result<(), String> {
    if m.is_finite() && (0.0..PI).contains(&m) {
        Ok(())
    } else {
        Err(format!("margin {m} must be in [0, π)"))
    }
}

/// Rows scaled to unit L2 norm, the norm floored at 1e-12 (as `F.normalize`).
fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [1i64], true).clamp_min(1e-12)
}

/// `[N, rows of w]` cosines between embeddings and (f32-cast) weight rows.
fn cosine(emb: &Tensor, w: &Tensor) -> Tensor {
    l2_normalize(emb).matmul(&l2_normalize(&w.to_kind(Kind::Float)).tr())
}

/// ArcFace logits and their cross-entropy, as the common PyTorch reference (`ArcMarginProduct`
/// of arcface-pytorch, the one Kaggle solutions copy): `phi = cos(θ + m) = cos·cos m − sin·sin m` on the target class; where
/// `θ + m` would pass π (`cos θ ≤ cos(π − m)`), `phi = cos θ − sin(π − m)·m` keeps the logit
/// decreasing in θ; with `easy_margin` the margin applies only where `cos θ > 0`. `m` is `[N, 1]`
/// (one margin per row, for the dynamic-margin variant).
fn margin_cross_entropy(
    cos: &Tensor,
    labels: &Tensor,
    m: &Tensor,
    s: f64,
    easy_margin: bool,
    classes: i64,
) -> Tensor {
    // The floor keeps sqrt's gradient finite where cos = ±1 (an embedding on its center):
    // without it the unused where() branch sends 0·∞ = NaN back.
    let sine = (1f64 - cos.square()).clamp(1e-12, 1.0).sqrt();
    let phi = cos * m.cos() - &sine * m.sin();
    let phi = if easy_margin {
        phi.where_self(&cos.gt(0.0), cos)
    } else {
        let th = (-m + PI).cos();
        let mm = (-m + PI).sin() * m;
        phi.where_self(&cos.gt_tensor(&th), &(cos - mm))
    };
    let one_hot = labels.one_hot(classes).to_kind(Kind::Float);
    let logits = (&one_hot * phi + (1f64 - &one_hot) * cos) * s;
    logits.cross_entropy_for_logits(labels)
}

/// Mean over valid anchors of the batch-hard triplet loss; 0 (still attached to the graph) when
/// no anchor has both a positive and a negative.
fn batch_hard_triplet(emb: &Tensor, labels: &Tensor, margin: Option<f64>) -> Tensor {
    let n = emb.size()[0];
    let x = l2_normalize(emb);
    let sq = x
        .pow_tensor_scalar(2)
        .sum_dim_intlist(Some([1i64].as_slice()), true, Kind::Float);
    let d2 = &sq + sq.tr() - x.matmul(&x.tr()) * 2.0;
    // Floored before sqrt so that zero distances (the diagonal, duplicates) have a finite
    // gradient: masked entries still get 0·(1/0) otherwise.
    let dist = d2.clamp_min(1e-12).sqrt();
    let same = labels.unsqueeze(1).eq_tensor(&labels.unsqueeze(0));
    let eye = Tensor::eye(n, (Kind::Bool, emb.device()));
    let pos = same.logical_and(&eye.logical_not());
    let neg = same.logical_not();
    // Fillers outside [0, 2] (distances of unit vectors) that never win the max/min and keep
    // every per-anchor value finite, so invalid anchors can be masked by multiplication.
    let far = Tensor::from(-1.0f32).to_device(emb.device());
    let near = Tensor::from(1e4f32).to_device(emb.device());
    let (d_ap, _) = dist.where_self(&pos, &far).max_dim(1, false);
    let (d_an, _) = dist.where_self(&neg, &near).min_dim(1, false);
    let diff = d_ap - d_an;
    let per_anchor = match margin {
        Some(m) => (diff + m).relu(),
        None => diff.softplus(),
    };
    let valid = pos
        .any_dim(1, false)
        .logical_and(&neg.any_dim(1, false))
        .to_kind(Kind::Float);
    // Divided on the device (no host sync): with no valid anchor the sum is 0 and the count 1.
    (per_anchor * &valid).sum(Kind::Float) / valid.sum(Kind::Float).clamp_min(1.0)
}

#[cfg(test)]
mod tests {
    use tch::{Device, nn::VarStore};

    use super::*;

    // Reference values: a separate numpy implementation of the formulas above, run once:
    //
    //   import numpy as np
    //   E = np.array([[1.0, 0.2, -0.3], [0.1, 0.9, 0.4], [0.6, -0.4, 0.5], [0.4, -0.2, -0.9], [-0.5, 0.3, 0.8]])
    //   y = np.array([0, 1, 0, 2, 1])
    //   W = np.array([[0.9, 0.1, 0.0], [0.0, 1.0, 0.2], [-0.3, 0.2, 0.9]])
    //   W6 = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, -0.1], [0.0, 1.0, 0.2], [0.5, 0.5, 0.5], [-0.3, 0.2, 0.9], [0.1, -0.9, 0.3]])
    //   CW = np.array([[0.5, -0.2, 0.1], [0.3, 0.8, -0.4], [-0.6, 0.1, 0.7]]); CB = np.array([0.1, -0.2, 0.05])
    //   n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    //   def ce(logits, y):
    //       z = logits - logits.max(1, keepdims=True)
    //       return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])
    //   def arc(cos, y, m, s, easy):  # m: per-row margins
    //       m = np.broadcast_to(np.asarray(m, float), (len(y),))[:, None]
    //       sine = np.sqrt(np.clip(1 - cos**2, 0, 1))
    //       phi = cos * np.cos(m) - sine * np.sin(m)
    //       phi = np.where(cos > 0, phi, cos) if easy else np.where(cos > np.cos(np.pi - m), phi, cos - np.sin(np.pi - m) * m)
    //       oh = np.eye(cos.shape[1])[y]
    //       return ce(s * (oh * phi + (1 - oh) * cos), y)
    //   cos = n(E) @ n(W).T                                    # cos[3, 2] = -0.9955: the fallback branch
    //   arc(cos, y, 0.5, 30, False), arc(cos, y, 0.5, 30, True)
    //   mc = 0.5 * np.array([10, 3, 1]) ** -0.25 + 0.05
    //   arc((n(E) @ n(W6).T).reshape(5, 3, 2).max(2), y, mc[y], 16, False)
    //   ce(E @ CW.T + CB, y)
    //   X = n(E); D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1)); hard, soft = [], []
    //   for i in range(5):
    //       pos = [D[i, j] for j in range(5) if j != i and y[j] == y[i]]; neg = [D[i, j] for j in range(5) if y[j] != y[i]]
    //       if pos and neg:
    //           hard.append(max(0.0, max(pos) - min(neg) + 0.8)); soft.append(np.log1p(np.exp(max(pos) - min(neg))))
    //   np.mean(hard), np.mean(soft)
    const ARCFACE: f64 = 15.938631390521673;
    const ARCFACE_EASY: f64 = 14.500354774709063;
    const SUBCENTER: f64 = 7.340969943519821;
    const CROSS_ENTROPY: f64 = 1.2238410270509368;
    const TRIPLET_08: f64 = 0.5558165614166387;
    const TRIPLET_SOFT: f64 = 0.5867650812858973;

    const E: [f32; 15] = [
        1.0, 0.2, -0.3, 0.1, 0.9, 0.4, 0.6, -0.4, 0.5, 0.4, -0.2, -0.9, -0.5, 0.3, 0.8,
    ];
    const Y: [i64; 5] = [0, 1, 0, 2, 1];
    const W: [f32; 9] = [0.9, 0.1, 0.0, 0.0, 1.0, 0.2, -0.3, 0.2, 0.9];
    const W6: [f32; 18] = [
        0.9, 0.1, 0.0, 0.2, 0.8, -0.1, 0.0, 1.0, 0.2, 0.5, 0.5, 0.5, -0.3, 0.2, 0.9, 0.1, -0.9, 0.3,
    ];
    const CW: [f32; 9] = [0.5, -0.2, 0.1, 0.3, 0.8, -0.4, -0.6, 0.1, 0.7];
    const CB: [f32; 3] = [0.1, -0.2, 0.05];
    const COUNTS: [i64; 3] = [10, 3, 1];

    fn emb() -> Tensor {
        Tensor::from_slice(&E).view([5, 3]).set_requires_grad(true)
    }

    fn labels() -> Tensor {
        Tensor::from_slice(&Y)
    }

    /// Copies `values` into the store variable `name` (shape taken from the variable).
    fn set(vs: &VarStore, name: &str, values: &[f32]) {
        let vars = vs.variables();
        let mut v = vars
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}; have {:?}", vars.keys()))
            .shallow_clone();
        let src = Tensor::from_slice(values).view(v.size().as_slice());
        tch::no_grad(|| v.copy_(&src));
    }

    fn loss_with(spec: LossSpec) -> (VarStore, Loss) {
        let vs = VarStore::new(Device::Cpu);
        let loss = Loss::new(&vs.root().sub("loss"), &[(1.0, spec)], 3, &COUNTS);
        match vs.variables().keys().next().map(String::as_str) {
            Some("loss.arcface.weight") => set(&vs, "loss.arcface.weight", &W),
            Some("loss.subcenter_arcface.weight") => set(&vs, "loss.subcenter_arcface.weight", &W6),
            Some(_) => {
                set(&vs, "loss.cross_entropy.weight", &CW);
                set(&vs, "loss.cross_entropy.bias", &CB);
            }
            None => {}
        }
        (vs, loss)
    }

    /// Forward against the reference, then a backward that reaches the embedding.
    fn check(spec: LossSpec, expected: f64) {
        let (_vs, loss) = loss_with(spec.clone());
        let e = emb();
        let v = loss.forward(&e, &labels());
        let got = v.double_value(&[]);
        assert!(
            (got - expected).abs() < 1e-5 * expected.abs().max(1.0),
            "{spec:?}: {got} vs {expected}"
        );
        v.backward();
        let g = e.grad();
        assert!(
            g.isfinite().all().int64_value(&[]) == 1,
            "{spec:?}: non-finite gradient"
        );
        assert!(
            g.abs().sum(Kind::Float).double_value(&[]) > 1e-6,
            "{spec:?}: no gradient"
        );
    }

    #[test]
    fn arcface_matches_reference() {
        check(
            LossSpec::ArcFace {
                s: 30.0,
                m: 0.5,
                easy_margin: false,
            },
            ARCFACE,
        );
    }

    #[test]
    fn arcface_easy_margin_matches_reference() {
        check(
            LossSpec::ArcFace {
                s: 30.0,
                m: 0.5,
                easy_margin: true,
            },
            ARCFACE_EASY,
        );
    }

    #[test]
    fn subcenter_arcface_matches_reference() {
        let spec = LossSpec::SubCenterArcFace {
            s: 16.0,
            k: 2,
            margin_a: 0.5,
            margin_lambda: 0.25,
            margin_b: 0.05,
            easy_margin: false,
        };
        check(spec, SUBCENTER);
    }

    #[test]
    fn cross_entropy_matches_reference() {
        check(LossSpec::CrossEntropy, CROSS_ENTROPY);
    }

    #[test]
    fn triplet_matches_reference() {
        check(LossSpec::Triplet { margin: Some(0.8) }, TRIPLET_08);
        check(LossSpec::Triplet { margin: None }, TRIPLET_SOFT);
    }

    /// Margin 0 makes ArcFace plain normalised softmax: `CE(s·cos θ)`, computed here directly.
    #[test]
    fn arcface_with_zero_margin_is_scaled_cosine_softmax() {
        let (vs, loss) = loss_with(LossSpec::ArcFace {
            s: 10.0,
            m: 0.0,
            easy_margin: false,
        });
        let w = vs.variables()["loss.arcface.weight"].shallow_clone();
        let e = emb();
        let direct = (cosine(&e, &w) * 10.0).cross_entropy_for_logits(&labels());
        let got = loss.forward(&e, &labels());
        assert!((got - direct).abs().double_value(&[]) < 1e-6);
    }

    /// By hand: n = 10, 3, 1 with a = 0.5, λ = 0.25, b = 0.05:
    /// 0.5·10^−¼ + 0.05 = 0.5·0.562341 + 0.05 = 0.331171; 0.5·3^−¼ + 0.05 = 0.429918;
    /// 0.5·1 + 0.05 = 0.55; a class with no photo counts as one.
    #[test]
    fn dynamic_margin_formula() {
        let m = dynamic_margins(&[10, 3, 1, 0], 0.5, 0.25, 0.05);
        let want = [0.3311706625951745, 0.42991784282579626, 0.55, 0.55];
        for (g, w) in m.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{m:?}");
        }
        // λ = 0: every class gets a + b.
        assert_eq!(dynamic_margins(&[1, 50], 0.3, 0.0, 0.1), vec![0.4, 0.4]);
    }

    #[test]
    fn weighted_sum_is_sum_of_weighted_terms() {
        let vs = VarStore::new(Device::Cpu);
        let terms = [
            (
                1.0,
                LossSpec::ArcFace {
                    s: 30.0,
                    m: 0.5,
                    easy_margin: false,
                },
            ),
            (0.5, LossSpec::Triplet { margin: Some(0.8) }),
            (0.25, LossSpec::CrossEntropy),
            (2.0, LossSpec::Triplet { margin: None }),
        ];
        let loss = Loss::new(&vs.root().sub("loss"), &terms, 3, &COUNTS);
        set(&vs, "loss.arcface.weight", &W);
        set(&vs, "loss.cross_entropy.weight", &CW);
        set(&vs, "loss.cross_entropy.bias", &CB);
        let (total, parts) = loss.forward_terms(&emb(), &labels());
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["arcface", "triplet", "cross_entropy", "triplet_3"]);
        let expected = [ARCFACE, TRIPLET_08, CROSS_ENTROPY, TRIPLET_SOFT];
        for ((_, v), e) in parts.iter().zip(expected) {
            assert!((v - e).abs() < 1e-5 * e.max(1.0), "{parts:?}");
        }
        let sum: f64 = parts.iter().zip(&terms).map(|((_, v), (w, _))| w * v).sum();
        assert!(
            (total.double_value(&[]) - sum).abs() < 1e-5,
            "{} vs {sum}",
            total.double_value(&[])
        );
        assert!(
            (loss.forward(&emb(), &labels()) - total)
                .abs()
                .double_value(&[])
                < 1e-6
        );
    }

    /// bf16 embeddings are computed in f32 (the result is f32 and close to the f32 value).
    #[test]
    fn bf16_input_is_computed_in_f32() {
        let (_vs, loss) = loss_with(LossSpec::ArcFace {
            s: 30.0,
            m: 0.5,
            easy_margin: false,
        });
        let v = loss.forward(&emb().to_kind(Kind::BFloat16), &labels());
        assert_eq!(v.kind(), Kind::Float);
        assert!((v.double_value(&[]) - ARCFACE).abs() < 0.2);
    }

    /// A batch where no anchor has a positive: the triplet term is 0 and backward still works.
    #[test]
    fn triplet_without_valid_anchor_is_zero() {
        let (_vs, loss) = loss_with(LossSpec::Triplet { margin: Some(0.3) });
        let e = emb();
        let v = loss.forward(&e, &Tensor::from_slice(&[0i64, 1, 2, 3, 4]));
        assert_eq!(v.double_value(&[]), 0.0);
        v.backward();
        assert_eq!(e.grad().isfinite().all().int64_value(&[]), 1);
    }

    /// An embedding exactly on its (only) center: cos = 1, where sqrt(1 − cos²) has an infinite
    /// derivative; the gradient must stay finite.
    #[test]
    fn arcface_gradient_is_finite_on_the_center() {
        let (_vs, loss) = loss_with(LossSpec::ArcFace {
            s: 30.0,
            m: 0.5,
            easy_margin: false,
        });
        let e = Tensor::from_slice(&[0.9f32, 0.1, 0.0, 0.0, 1.0, 0.2])
            .view([2, 3])
            .set_requires_grad(true);
        let v = loss.forward(&e, &Tensor::from_slice(&[0i64, 1]));
        v.backward();
        assert_eq!(e.grad().isfinite().all().int64_value(&[]), 1);
    }

    #[test]
    fn invalid_specs_are_refused() {
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root();
        let arc = |s, m| {
            (
                1.0,
                LossSpec::ArcFace {
                    s,
                    m,
                    easy_margin: false,
                },
            )
        };
        assert_eq!(
            Loss::try_new(&p, &[], 3, &COUNTS).err(),
            Some(LossError::NoTerms)
        );
        assert!(Loss::try_new(&p, &[arc(30.0, 0.5)], 0, &COUNTS).is_err());
        assert!(Loss::try_new(&p, &[arc(30.0, 0.5)], 3, &[]).is_err());
        assert!(Loss::try_new(&p, &[arc(0.0, 0.5)], 3, &COUNTS).is_err());
        assert!(Loss::try_new(&p, &[arc(30.0, -0.1)], 3, &COUNTS).is_err());
        assert!(
            Loss::try_new(
                &p,
                &[(1.0, LossSpec::Triplet { margin: Some(-1.0) })],
                3,
                &COUNTS
            )
            .is_err()
        );
        let sub = LossSpec::SubCenterArcFace {
            s: 30.0,
            k: 3,
            margin_a: 5.0,
            margin_lambda: 0.25,
            margin_b: 0.0,
            easy_margin: false,
        };
        let err = Loss::try_new(&p, &[(1.0, sub)], 3, &COUNTS)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("class 1 (n = 3)")),
            "{err:?}"
        );
    }

    /// Parameters land under the given path, in its optimizer group.
    #[test]
    fn parameters_live_under_the_path() {
        let vs = VarStore::new(Device::Cpu);
        let head = vs.root().sub("head").set_group(1);
        let terms = [
            (
                1.0,
                LossSpec::SubCenterArcFace {
                    s: 30.0,
                    k: 3,
                    margin_a: 0.5,
                    margin_lambda: 0.25,
                    margin_b: 0.05,
                    easy_margin: false,
                },
            ),
            (1.0, LossSpec::CrossEntropy),
        ];
        let _loss = Loss::new(&head.sub("loss"), &terms, 8, &[4, 2, 1, 9, 1]);
        let vars = vs.variables();
        assert_eq!(vars["head.loss.subcenter_arcface.weight"].size(), [15, 8]);
        assert_eq!(vars["head.loss.cross_entropy.weight"].size(), [5, 8]);
        assert_eq!(vars.len(), 3);
    }
}
