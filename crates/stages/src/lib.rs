//! The stage kinds, one file each: its options (parsed from the pipeline file with spans), its
//! static check, and its run, behind [`engine::stage::Stage`]. What two kinds share lives in
//! `lake`, `model` or `vision`; no kind imports another.
//!
//! Adding a kind is one file here and one line in [`registry`].

pub mod detect;
pub mod embed;
pub mod ensemble;
pub mod evaluate;
pub mod index;
pub mod ingest;
pub mod pseudo_label;
pub mod report;
pub mod sql;
pub mod submit;
pub mod train;
pub mod vacuum;
mod shared;

#[cfg(test)]
mod config_tests;

use engine::stage::{Registry, stage};

pub use lake::{Error, Result};

/// Every kind a pipeline file may use.
pub fn registry() -> Registry {
    Registry::new()
        .kind("ingest", |k, cx| ingest::IngestConfig::parse(k, cx).map(stage))
        .kind("sql", |k, cx| sql::SqlConfig::parse(k, cx).map(stage))
        .kind("detect", |k, cx| detect::DetectStage::parse(k, cx).map(stage))
        .kind("train", |k, cx| train::TrainStage::parse(k, cx).map(stage))
        .kind("embed", |k, _| embed::EmbedStage::parse(k).map(stage))
        .kind("evaluate", |k, _| evaluate::EvaluateStage::parse(k).map(stage))
        .kind("ensemble", |k, _| ensemble::EnsembleStage::parse(k).map(stage))
        .kind("pseudo_label", |k, _| pseudo_label::PseudoLabelStage::parse(k).map(stage))
        .kind("index", |k, _| index::IndexStage::parse(k).map(stage))
        .kind("submit", |k, cx| submit::SubmitStage::parse(k, cx).map(stage))
        .kind("report", |k, cx| report::ReportStage::parse(k, cx).map(stage))
        .kind("vacuum", |k, _| vacuum::VacuumStage::parse(k).map(stage))
}
