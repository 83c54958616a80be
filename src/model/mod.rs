//! Models on libtorch (tch): backbones with torchvision-compatible names, augmentation on
//! tensors, metric-learning losses, samplers and retrieval metrics.

pub mod augment;
pub mod backbone;
pub mod data;
pub mod detect;
pub mod loss;
pub mod metrics;
pub mod neck;
pub mod net;
pub mod optim;
pub mod sampler;
pub mod schedule;
pub mod tensorboard;
pub mod train;
