//! Typed errors of the zq library. Every message is one line naming the file, node or flag at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a readable ONNX model (bad protobuf, truncated, missing graph...).
    #[error("{}: {msg}", path.display())]
    Model { path: PathBuf, msg: String },
    /// A node is malformed or inconsistent.
    #[error("node '{node}' ({op}): {msg}")]
    Node {
        node: String,
        op: String,
        msg: String,
    },
    #[error("node '{node}': unsupported {what} (op {op}, opset {opset}); zq supports CNN classifier ops at opsets {}-{}", crate::onnx::read::MIN_OPSET, crate::onnx::read::MAX_OPSET)]
    Unsupported {
        node: String,
        op: String,
        opset: i64,
        what: String,
    },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Bad user input that is not a file (flags, mismatched tensors).
    #[error("{0}")]
    Usage(String),
    /// A numeric backend failure.
    #[error("execution failed: {0}")]
    Exec(String),
    /// A goal the user asked for cannot be met (an infeasible size or BOPs budget); nothing is
    /// written. Exit code 1, like a failed quality gate.
    #[error("infeasible budget: {0}")]
    Infeasible(String),
    /// A broken invariant inside zq, never the user's fault.
    #[error("internal error: {0} (please report this)")]
    Internal(String),
}

/// What a run's outcome means to a script: the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: done.
    Success,
    /// 1: a goal the user set was not met (quality gate, infeasible budget); nothing written.
    GoalNotMet,
    /// 2: bad input, or an error (internal faults included).
    Error,
}

impl ExitStatus {
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::GoalNotMet => 1,
            ExitStatus::Error => 2,
        }
    }
}

impl Error {
    /// The exit code this error ends the process with (decided by its type, never its text).
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Error::Infeasible(_) => ExitStatus::GoalNotMet,
            Error::Io { .. }
            | Error::Model { .. }
            | Error::Node { .. }
            | Error::Unsupported { .. }
            | Error::Data(_)
            | Error::Usage(_)
            | Error::Exec(_)
            | Error::Internal(_) => ExitStatus::Error,
        }
    }

    pub fn node(node: &str, op: &str, msg: impl Into<String>) -> Error {
        Error::Node {
            node: node.to_string(),
            op: op.to_string(),
            msg: msg.into(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        // candle errors can carry multi-line backtraces; keep the first line.
        let s = e.to_string();
        Error::Exec(s.lines().next().unwrap_or("").to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
