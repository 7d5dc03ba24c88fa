//! The control plane's integration tests, in one binary so that they link once.

mod catalog;
mod gsnap;
mod node_down;
mod storage;
