//! Learning-rate schedules as a multiplier of each parameter group's base learning rate.
//!
//! The trainer calls `opt.set_lr(g, base_lr[g] * schedule.factor(step))` before every
//! optimizer step, so one schedule drives all groups and keeps their ratio (e.g. backbone
//! 10× lower than the head). The factor is a pure function of the step, so resuming from a
//! checkpoint only needs the step count.

use std::f64::consts::PI;

/// A learning-rate schedule. Every variant but [`Schedule::Constant`] starts with a linear
/// warmup: the factor goes from `warmup_start` at step 0 to 1 at step `warmup_steps`
/// (`warmup_steps = 0` means no warmup).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Schedule {
    /// Linear warmup from `warmup_start` × lr to lr over `warmup_steps`, then cosine from lr
    /// down to `floor` × lr at `total_steps`.
    WarmupCosine {
        warmup_steps: u64,
        warmup_start: f64,
        total_steps: u64,
        floor: f64,
    },
    /// Warmup as above, then lr × gamma^(floor(step_after_warmup / step_size)).
    Step {
        warmup_steps: u64,
        warmup_start: f64,
        step_size: u64,
        gamma: f64,
    },
    /// Warmup, then lr × gamma^(number of milestones <= step). Milestones count optimizer
    /// steps from 0 (not from the end of the warmup), like PyTorch's `MultiStepLR`.
    MultiStep {
        warmup_steps: u64,
        warmup_start: f64,
        milestones: Vec<u64>,
        gamma: f64,
    },
    /// Always the base learning rate.
    Constant,
}

/// A schedule parameter out of its range, found by [`Schedule::validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule: warmup_start must be in [0, 1], got {0}")]
    WarmupStart(f64),
    #[error("schedule: floor must be in [0, 1], got {0}")]
    Floor(f64),
    #[error("schedule: total_steps ({total_steps}) must be at least warmup_steps ({warmup_steps})")]
    TotalSteps { total_steps: u64, warmup_steps: u64 },
    #[error("schedule: step_size must be positive")]
    StepSize,
    #[error("schedule: gamma must be a positive finite number, got {0}")]
    Gamma(f64),
}

impl Schedule {
    /// Multiplier for the base lr at optimizer step `step` (0-based). Never negative (nor
    /// NaN): a parameter out of range gives 0 rather than a negative rate. Steps past
    /// `total_steps` stay at the floor.
    pub fn factor(&self, step: u64) -> f64 {
        let f = match self {
            Schedule::WarmupCosine {
                warmup_steps,
                warmup_start,
                total_steps,
                floor,
            } => warmup(step, *warmup_steps, *warmup_start).unwrap_or_else(|| {
                let span = total_steps.saturating_sub(*warmup_steps);
                let done = step - warmup_steps;
                let t = if span == 0 {
                    1.0
                } else {
                    done.min(span) as f64 / span as f64
                };
                floor + (1.0 - floor) * 0.5 * (1.0 + (PI * t).cos())
            }),
            Schedule::Step {
                warmup_steps,
                warmup_start,
                step_size,
                gamma,
            } => warmup(step, *warmup_steps, *warmup_start).unwrap_or_else(|| {
                let k = (step - warmup_steps).checked_div(*step_size).unwrap_or(0);
                gamma.powf(k as f64)
            }),
            Schedule::MultiStep {
                warmup_steps,
                warmup_start,
                milestones,
                gamma,
            } => warmup(step, *warmup_steps, *warmup_start).unwrap_or_else(|| {
                let k = milestones.iter().filter(|&&m| m <= step).count();
                gamma.powf(k as f64)
            }),
            Schedule::Constant => 1.0,
        };
        // `f64::max` returns the non-NaN operand, so NaN also becomes 0.
        f.max(0.0)
    }

    /// Checks that the parameters are in range (a config file may hold anything);
    /// [`factor`](Schedule::factor) never panics either way.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let check_warmup = |start: f64| {
            if (0.0..=1.0).contains(&start) {
                Ok(())
            } else {
                Err(ScheduleError::WarmupStart(start))
            }
        };
        let check_gamma = |gamma: f64| {
            if gamma.is_finite() && gamma > 0.0 {
                Ok(())
            } else {
                Err(ScheduleError::Gamma(gamma))
            }
        };
        match self {
            Schedule::WarmupCosine {
                warmup_steps,
                warmup_start,
                total_steps,
                floor,
            } => {
                check_warmup(*warmup_start)?;
                if !(0.0..=1.0).contains(floor) {
                    return Err(ScheduleError::Floor(*floor));
                }
                if total_steps < warmup_steps {
                    return Err(ScheduleError::TotalSteps {
                        total_steps: *total_steps,
                        warmup_steps: *warmup_steps,
                    });
                }
                Ok(())
            }
            Schedule::Step {
                warmup_start,
                step_size,
                gamma,
                ..
            } => {
                check_warmup(*warmup_start)?;
                if *step_size == 0 {
                    return Err(ScheduleError::StepSize);
                }
                check_gamma(*gamma)
            }
            Schedule::MultiStep {
                warmup_start,
                gamma,
                ..
            } => {
                check_warmup(*warmup_start)?;
                check_gamma(*gamma)
            }
            Schedule::Constant => Ok(()),
        }
    }
}

/// The warmup factor while `step < warmup_steps`, `None` after.
fn warmup(step: u64, warmup_steps: u64, start: f64) -> Option<f64> {
    (step < warmup_steps).then(|| start + (1.0 - start) * step as f64 / warmup_steps as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_cosine_values() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 10,
            warmup_start: 0.1,
            total_steps: 110,
            floor: 0.01,
        };
        s.validate().unwrap();
        assert!(close(s.factor(0), 0.1));
        assert!(close(s.factor(5), 0.1 + 0.9 * 0.5));
        assert!(close(s.factor(10), 1.0)); // end of warmup = start of cosine
        // Middle of the cosine: halfway between 1 and the floor.
        assert!(close(s.factor(60), 0.01 + 0.99 * 0.5));
        // A quarter in: 0.5·(1 + cos(π/4)).
        assert!(close(
            s.factor(35),
            0.01 + 0.99 * 0.5 * (1.0 + (PI / 4.0).cos())
        ));
        assert!(close(s.factor(110), 0.01));
        assert!(close(s.factor(111), 0.01));
        assert!(close(s.factor(1_000_000), 0.01));
        let mut prev = f64::INFINITY;
        for step in 10..=110 {
            let f = s.factor(step);
            assert!(f <= prev, "not monotone at {step}: {f} > {prev}");
            prev = f;
        }
        let mut prev = 0.0;
        for step in 0..=10 {
            let f = s.factor(step);
            assert!(f >= prev, "warmup not increasing at {step}");
            prev = f;
        }
    }

    #[test]
    fn no_warmup_and_degenerate_spans() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 0,
            warmup_start: 0.0,
            total_steps: 4,
            floor: 0.0,
        };
        assert!(close(s.factor(0), 1.0));
        assert!(close(s.factor(2), 0.5));
        assert!(close(s.factor(4), 0.0));
        // Cosine phase of length 0: straight to the floor after warmup.
        let s = Schedule::WarmupCosine {
            warmup_steps: 5,
            warmup_start: 0.0,
            total_steps: 5,
            floor: 0.2,
        };
        assert!(close(s.factor(5), 0.2));
        // Out-of-range parameters never give a negative factor.
        let s = Schedule::WarmupCosine {
            warmup_steps: 0,
            warmup_start: 0.0,
            total_steps: 4,
            floor: -1.0,
        };
        assert!(s.factor(4) >= 0.0);
        assert_eq!(s.validate(), Err(ScheduleError::Floor(-1.0)));
        let s = Schedule::WarmupCosine {
            warmup_steps: 5,
            warmup_start: 0.0,
            total_steps: 3,
            floor: 0.0,
        };
        assert!(matches!(
            s.validate(),
            Err(ScheduleError::TotalSteps { .. })
        ));
    }

    #[test]
    fn step_values() {
        let s = Schedule::Step {
            warmup_steps: 4,
            warmup_start: 0.0,
            step_size: 10,
            gamma: 0.5,
        };
        s.validate().unwrap();
        assert!(close(s.factor(0), 0.0));
        assert!(close(s.factor(2), 0.5));
        assert!(close(s.factor(4), 1.0));
        assert!(close(s.factor(13), 1.0));
        assert!(close(s.factor(14), 0.5));
        assert!(close(s.factor(34), 0.125));
        let bad = Schedule::Step {
            warmup_steps: 0,
            warmup_start: 0.0,
            step_size: 0,
            gamma: 0.5,
        };
        assert_eq!(bad.validate(), Err(ScheduleError::StepSize));
        assert!(close(bad.factor(100), 1.0)); // no panic on a zero step size
        let neg = Schedule::Step {
            warmup_steps: 0,
            warmup_start: 0.0,
            step_size: 1,
            gamma: -0.5,
        };
        assert!(neg.validate().is_err());
        assert!(neg.factor(1) >= 0.0);
    }

    #[test]
    fn multistep_values() {
        let s = Schedule::MultiStep {
            warmup_steps: 2,
            warmup_start: 0.5,
            milestones: vec![30, 10],
            gamma: 0.1,
        };
        s.validate().unwrap();
        assert!(close(s.factor(0), 0.5));
        assert!(close(s.factor(1), 0.75));
        assert!(close(s.factor(2), 1.0));
        assert!(close(s.factor(9), 1.0));
        assert!((s.factor(10) - 0.1).abs() < 1e-12);
        assert!((s.factor(29) - 0.1).abs() < 1e-12);
        assert!((s.factor(30) - 0.01).abs() < 1e-12);
        assert!((s.factor(500) - 0.01).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(12345), 1.0);
    }

    #[test]
    fn serde_round_trip() {
        let s = Schedule::MultiStep {
            warmup_steps: 1,
            warmup_start: 0.1,
            milestones: vec![5],
            gamma: 0.3,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), s);
    }
}
