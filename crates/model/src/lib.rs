//! Models on libtorch (tch): backbones with torchvision-compatible names, augmentation on
//! tensors, metric-learning losses, samplers and retrieval metrics.

pub use lake::{Error, Result};

pub mod augment;
pub mod backbone;
pub mod data;
pub mod detect;
pub mod loss;
pub mod neck;
pub mod net;
pub mod optim;
pub mod sampler;
pub mod schedule;
pub mod tensorboard;
pub mod train;
