//! The control plane's integration tests, in one binary so that they link once.

mod catalog;
mod node_down;
mod storage;
