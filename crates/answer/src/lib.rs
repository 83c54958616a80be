//! Answers for users: the neighbours of one photo ([`similar`]: `pipeline similar`, the HTTP
//! API's model worker) and the HTML report ([`report_data`] reads the lake, [`report`] renders
//! one self-contained page). Uses `lake`, `model` and `vision`; no stage and no engine.

pub mod local;
pub mod report;
pub mod report_data;
pub mod review;
pub mod similar;

pub use lake::{Error, Result};
pub use report_data::{ReportOptions, report};
pub use similar::*;
