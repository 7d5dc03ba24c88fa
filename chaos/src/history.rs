//! What every client did and saw: an invoke event when an operation starts, then ok,
//! fail or unknown when it ends (unknown: the connection died or the answer did not come
//! in time, so it may or may not have taken effect). Times are microseconds since the
//! run's start, one clock for every client. The checkers read nothing else, so a history
//! kept as a file (JSON lines) can be checked again without the cluster.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Invoke,
    Ok,
    Fail,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Operation {
    /// `blocks` 4 KiB blocks from `first_block` of `volume`, every block's bytes naming
    /// `write_id` (see [`crate::block`]).
    Write {
        volume: String,
        first_block: u64,
        blocks: u64,
        write_id: u64,
        fua: bool,
    },
    Flush {
        volume: String,
    },
    /// A CLI command, by its arguments.
    Command {
        arguments: Vec<String>,
    },
    /// One reading of a copy's progress: a session (by kind and target) or a job.
    Progress {
        subject: String,
        /// What the percent is counted within: a new copy of the same subject (a mirror
        /// re-established, a new state) may start again from 0.
        epoch: String,
        percent: f64,
    },
    /// Waiting, after the faults healed, for a copy to reach a resting or final state.
    Settle {
        subject: String,
    },
    /// A fault started (invoke) or healed (ok).
    Fault {
        kind: crate::schedule::FaultKind,
        nodes: Vec<String>,
    },
    /// A copy's point in time was taken within this operation's invoke and end:
    /// `target`'s blocks must equal `source`'s at one instant of it.
    CopyInstant {
        source: String,
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Which operation this event belongs to: an invoke and its end share it.
    pub operation_id: u64,
    pub client: String,
    pub at_microseconds: u64,
    pub outcome: Outcome,
    pub operation: Operation,
    /// What a failure or an unknown outcome said.
    pub detail: Option<String>,
}

/// Every event of a run, shared by its clients.
#[derive(Clone)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
    started: Instant,
    /// The wall clock at `started`, to place times other processes report (unix seconds)
    /// on this history's clock.
    started_unix_microseconds: u64,
}

struct Inner {
    events: Vec<Event>,
    next_operation: u64,
}

impl Default for History {
    fn default() -> History {
        History::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            inner: Arc::new(Mutex::new(Inner {
                events: Vec::new(),
                next_operation: 1,
            })),
            started: Instant::now(),
            started_unix_microseconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_micros() as u64),
        }
    }

    /// A wall-clock time in unix seconds on this history's clock (0 if before the start).
    pub fn microseconds_of_unix_seconds(&self, unix_seconds: u64) -> u64 {
        (unix_seconds * 1_000_000).saturating_sub(self.started_unix_microseconds)
    }

    pub fn now_microseconds(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Records the start of `operation` and returns its id for [`History::end`].
    pub fn invoke(&self, client: &str, operation: Operation) -> u64 {
        let at_microseconds = self.now_microseconds();
        let mut inner = self.inner.lock().expect("history lock");
        let operation_id = inner.next_operation;
        inner.next_operation += 1;
        inner.events.push(Event {
            operation_id,
            client: client.to_string(),
            at_microseconds,
            outcome: Outcome::Invoke,
            operation,
            detail: None,
        });
        operation_id
    }

    /// Records how operation `operation_id` ended.
    pub fn end(&self, operation_id: u64, outcome: Outcome, detail: Option<String>) {
        let at_microseconds = self.now_microseconds();
        let mut inner = self.inner.lock().expect("history lock");
        let Some(invoke) = inner
            .events
            .iter()
            .rev()
            .find(|event| event.operation_id == operation_id)
            .cloned()
        else {
            return;
        };
        inner.events.push(Event {
            operation_id,
            client: invoke.client,
            at_microseconds,
            outcome,
            operation: invoke.operation,
            detail,
        });
    }

    /// An operation that has no duration (a progress reading).
    pub fn record(&self, client: &str, operation: Operation) {
        let operation_id = self.invoke(client, operation);
        self.end(operation_id, Outcome::Ok, None);
    }

    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().expect("history lock").events.clone()
    }

    /// Writes the history as JSON lines, one event per line.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        for event in self.events() {
            serde_json::to_writer(&mut file, &event)?;
            file.write_all(b"\n")?;
        }
        file.flush()
    }

    /// Reads a history [`History::save`] wrote.
    pub fn load(path: &Path) -> std::io::Result<Vec<Event>> {
        let text = std::fs::read_to_string(path)?;
        text.lines()
            .map(|line| serde_json::from_str(line).map_err(std::io::Error::other))
            .collect()
    }
}

/// An operation with its invoke and its end (`None` while it has not ended: for the
/// checkers, the same as unknown).
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub operation_id: u64,
    pub client: String,
    pub operation: Operation,
    pub invoked_at: u64,
    pub ended: Option<(u64, Outcome)>,
    pub detail: Option<String>,
}

impl Span {
    pub fn outcome(&self) -> Outcome {
        self.ended.map_or(Outcome::Unknown, |(_, outcome)| outcome)
    }

    pub fn ended_at(&self) -> Option<u64> {
        self.ended.map(|(at, _)| at)
    }
}

/// Pairs every invoke with its end, in the order of the invokes.
pub fn spans(events: &[Event]) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    for event in events {
        match event.outcome {
            Outcome::Invoke => {
                index.insert(event.operation_id, spans.len());
                spans.push(Span {
                    operation_id: event.operation_id,
                    client: event.client.clone(),
                    operation: event.operation.clone(),
                    invoked_at: event.at_microseconds,
                    ended: None,
                    detail: None,
                });
            }
            outcome => {
                if let Some(&position) = index.get(&event.operation_id) {
                    spans[position].ended = Some((event.at_microseconds, outcome));
                    spans[position].detail = event.detail.clone();
                }
            }
        }
    }
    spans
}
