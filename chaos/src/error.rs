//! The chaos library's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node {node} is not part of this cluster")]
    UnknownNode { node: String },
    #[error("could not start node {node}: {detail}")]
    Start { node: String, detail: String },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("the cluster did not become ready: {detail}")]
    NotReady { detail: String },
    #[error("the call to node {node} failed: {detail}")]
    Call { node: String, detail: String },
    #[error("{what} is not possible on the {backend} backend")]
    Unsupported { backend: &'static str, what: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
