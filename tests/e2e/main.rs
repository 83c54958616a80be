//! The end-to-end tests, one binary (each test binary links libtorch, lance and DataFusion, so
//! one link instead of five saves minutes per build). Each module is one area, as a user sees it.

mod api;
mod browser;
mod cli;
mod common;
mod faults;
mod ingest_clean;
mod kill;
mod lease;
mod nights;
mod ray;
mod review;
mod s3;
mod schedule;
mod search;
mod custom_kind;
mod streaming;
mod train_embed;
