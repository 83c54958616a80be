//! Models on libtorch (tch): backbones with torchvision-compatible names, augmentation on
//! tensors, metric-learning losses, samplers and retrieval metrics.

pub mod augment;
pub mod backbone;
pub mod loss;
pub mod metrics;
pub mod sampler;
