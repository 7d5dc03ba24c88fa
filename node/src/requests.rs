//! Calls the leader makes with a request id — volume creates and deletes, session
//! commands, snaps and lineage steps — carried out at most once per id.
//!
//! The leader passes the id of the cluster request with each such call. A leader can die
//! after this node carried a call out and before the catalog recorded it; the CLI then
//! retries under the same id and a new leader asks again. This node remembers the answer
//! it gave to each id (durably, beside the volumes) and answers the retry with it instead
//! of carrying the call out again, so the new leader records what was done instead of
//! meeting "already split", and a retried snap keeps the image of its first instant.
//!
//! The answer is stored right after the call, not in the call's own batch: a crash in
//! between leaves a call done but not remembered, and the leader's supervisor then brings
//! the catalog to the node's state (see `refresh_sessions` in the control plane).

use crate::engine::{Batch, Durability, Engine, Space};
use crate::store::VolumeStore;
use crate::{Error, Result};
use parking_lot::Mutex;
use protocol::cluster::RequestId;
use protocol::messages::{Extent, VolumeInfo};
use protocol::session::{SessionCommand, SessionInfo};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// How many answers a node remembers; the oldest is dropped first. The CLI retries for
/// 15 s, so a few thousand calls cover any retry with a wide margin, and the answers
/// (a session's or a volume's description each, a few hundred bytes) stay well under a
/// MiB.
pub const REQUESTS_REMEMBERED_MAX: usize = 4096;

const REQUEST_KEY_PREFIX: &[u8] = b"r/";
const REQUEST_KEY_END: &[u8] = b"r0";
/// The first byte of a stored answer: the layout version of what follows.
const REQUEST_FORMAT_VERSION: u8 = 2;
/// The layout of issue 11: session commands only.
const REQUEST_FORMAT_VERSION_SESSIONS_ONLY: u8 = 1;

/// Keys sort in the order answers were remembered, so the oldest is the first key.
fn request_key(sequence: u64) -> Vec<u8> {
    let mut key = REQUEST_KEY_PREFIX.to_vec();
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// A call the leader makes with a request id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeCall {
    Session(SessionCommand),
    Snap {
        source: String,
        target: String,
        extents: Vec<Extent>,
        overwrite: bool,
    },
    /// A snap landing the source's extents on other tracks of the target (appended, so
    /// answers remembered before it still decode).
    SnapAt {
        source: String,
        target: String,
        extents: Vec<Extent>,
        target_extents: Vec<Extent>,
        overwrite: bool,
        target_size_bytes: Option<u64>,
    },
    /// A gsnap's snap of P, which rotates P's lineage in its own write (appended).
    SnapLineage {
        source: String,
        target: String,
        extents: Vec<Extent>,
        target_extents: Vec<Extent>,
        overwrite: bool,
        target_size_bytes: Option<u64>,
        lineage: String,
    },
    /// A step of a volume's lineage (appended).
    Lineage {
        volume: String,
        lineage: String,
        step: protocol::gsnap::LineageStep,
    },
    /// A volume created for the catalog's intent (appended).
    VolumeCreate {
        name: String,
        size_bytes: u64,
        track_size_bytes: u32,
    },
    /// A volume deleted for the catalog's intent (appended).
    VolumeDelete {
        name: String,
    },
}

impl NodeCall {
    pub fn name(&self) -> &'static str {
        match self {
            NodeCall::Session(command) => command.name(),
            NodeCall::Snap { .. } | NodeCall::SnapAt { .. } | NodeCall::SnapLineage { .. } => {
                "snap"
            }
            NodeCall::Lineage { .. } => "lineage",
            NodeCall::VolumeCreate { .. } => "volume create",
            NodeCall::VolumeDelete { .. } => "volume delete",
        }
    }
}

/// What a call answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeAnswer {
    /// The session as the command left it; `None` when the command ended it.
    Session(Option<SessionInfo>),
    Snapped {
        target_info: VolumeInfo,
        elapsed_micros: u64,
    },
    /// The volume after a lineage step (appended).
    Lineage(VolumeInfo),
    /// The volume a create made (appended).
    Volume(VolumeInfo),
    /// The volume is gone (appended).
    Deleted,
}

/// One carried-out call and the answer it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Remembered {
    request_id: RequestId,
    call: NodeCall,
    answer: NodeAnswer,
}

/// The layout of issue 11, which remembered session commands only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RememberedSessionCommand {
    request_id: RequestId,
    command: SessionCommand,
    answer: Option<SessionInfo>,
}

fn encode(remembered: &Remembered) -> Result<Vec<u8>> {
    let mut bytes = vec![REQUEST_FORMAT_VERSION];
    bytes.extend(protocol::codec::encode(remembered)?);
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<Remembered> {
    match bytes {
        [REQUEST_FORMAT_VERSION, rest @ ..] => Ok(protocol::codec::decode(rest)?),
        [REQUEST_FORMAT_VERSION_SESSIONS_ONLY, rest @ ..] => {
            let old: RememberedSessionCommand = protocol::codec::decode(rest)?;
            Ok(Remembered {
                request_id: old.request_id,
                call: NodeCall::Session(old.command),
                answer: NodeAnswer::Session(old.answer),
            })
        }
        _ => Err(Error::Metadata {
            what: "a remembered call".to_string(),
            detail: format!(
                "stored in layout version {:?}, which this build does not know (it reads {REQUEST_FORMAT_VERSION})",
                bytes.first()
            ),
        }),
    }
}

#[derive(Default)]
struct Memory {
    /// Each remembered request id with the sequence number its answer is stored under.
    answers: HashMap<RequestId, (u64, Remembered)>,
    /// Sequence numbers and ids, oldest first, for eviction.
    order: VecDeque<(u64, RequestId)>,
    next_sequence: u64,
}

/// The answers this node gave to the leader's calls, by request id.
pub struct NodeRequests<E: Engine> {
    store: Arc<VolumeStore<E>>,
    memory: Mutex<Memory>,
    /// One lock per request id being carried out, so that a retry arriving while the first
    /// attempt still runs (the old leader's call is still in flight) waits for its answer
    /// instead of carrying the command out a second time.
    in_progress: Mutex<HashMap<RequestId, Arc<Mutex<()>>>>,
}

impl<E: Engine> NodeRequests<E> {
    /// Loads the remembered answers stored with the volumes. An answer this build cannot
    /// read is dropped with a log line: it only makes one old retry meet the node's state.
    pub fn open(store: Arc<VolumeStore<E>>) -> Result<Self> {
        let mut memory = Memory::default();
        let mut unreadable = Vec::new();
        store.engine().scan(
            Space::Meta,
            REQUEST_KEY_PREFIX,
            REQUEST_KEY_END,
            &mut |key, value| {
                let Some(sequence) = key
                    .get(REQUEST_KEY_PREFIX.len()..)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(u64::from_be_bytes)
                else {
                    unreadable.push((key.to_vec(), "malformed key".to_string()));
                    return true;
                };
                memory.next_sequence = memory.next_sequence.max(sequence + 1);
                match decode(value) {
                    Ok(remembered) => {
                        memory.order.push_back((sequence, remembered.request_id));
                        memory
                            .answers
                            .insert(remembered.request_id, (sequence, remembered));
                    }
                    Err(error) => unreadable.push((key.to_vec(), error.to_string())),
                }
                true
            },
        )?;
        if !unreadable.is_empty() {
            let mut batch = Batch::default();
            for (key, reason) in unreadable {
                tracing::warn!(key = ?key, %reason, "dropping a remembered answer this build cannot read");
                batch.delete(Space::Meta, key);
            }
            store.engine().write(batch, Durability::Synced)?;
        }
        Ok(NodeRequests {
            store,
            memory: Mutex::new(memory),
            in_progress: Mutex::new(HashMap::new()),
        })
    }

    /// The answer given to `request_id`, if a session command under it was carried out
    /// and is still remembered: `Some(None)` when that command ended its session.
    pub fn answer(&self, request_id: RequestId) -> Option<Option<SessionInfo>> {
        match self.memory.lock().answers.get(&request_id) {
            Some((
                _,
                Remembered {
                    answer: NodeAnswer::Session(answer),
                    ..
                },
            )) => Some(answer.clone()),
            _ => None,
        }
    }

    /// Whether a call under `request_id` was carried out and is still remembered.
    pub fn remembers(&self, request_id: RequestId) -> bool {
        self.memory.lock().answers.contains_key(&request_id)
    }

    /// How many answers are remembered now.
    pub fn remembered_count(&self) -> usize {
        self.memory.lock().answers.len()
    }

    /// Carries out a session command with `work` (see [`NodeRequests::carry_out_call`]).
    pub fn carry_out(
        &self,
        request_id: RequestId,
        command: &SessionCommand,
        work: impl FnOnce() -> Result<Option<SessionInfo>>,
    ) -> Result<Option<SessionInfo>> {
        let call = NodeCall::Session(command.clone());
        match self.carry_out_call(request_id, &call, || work().map(NodeAnswer::Session))? {
            NodeAnswer::Session(answer) => Ok(answer),
            other => Err(wrong_answer(request_id, &call, &other)),
        }
    }

    /// Carries out `call` with `work` unless a call under `request_id` was carried out
    /// before, in which case its first answer is returned and nothing is done. A refused
    /// call is not remembered (it changed nothing, so a retry may be carried out). The
    /// same id with another call is refused: ids are random, so that is a caller's
    /// mistake, never a retry.
    pub fn carry_out_call(
        &self,
        request_id: RequestId,
        call: &NodeCall,
        work: impl FnOnce() -> Result<NodeAnswer>,
    ) -> Result<NodeAnswer> {
        let lock = self
            .in_progress
            .lock()
            .entry(request_id)
            .or_default()
            .clone();
        let outcome = {
            let _carrying_out = lock.lock();
            self.carry_out_locked(request_id, call, work)
        };
        let mut in_progress = self.in_progress.lock();
        // The entry goes once no other attempt holds or waits for it.
        if Arc::strong_count(&lock) == 2 {
            in_progress.remove(&request_id);
        }
        outcome
    }

    fn carry_out_locked(
        &self,
        request_id: RequestId,
        call: &NodeCall,
        work: impl FnOnce() -> Result<NodeAnswer>,
    ) -> Result<NodeAnswer> {
        if let Some((_, remembered)) = self.memory.lock().answers.get(&request_id) {
            if remembered.call != *call {
                return Err(Error::RequestReused {
                    request_id: format!("{request_id:032x}"),
                    first: remembered.call.name().to_string(),
                    now: call.name().to_string(),
                });
            }
            tracing::info!(
                request = %format!("{request_id:032x}"),
                call = call.name(),
                "call retried; answering with its first answer"
            );
            metrics::counter!(crate::metrics::NODE_CALLS_REPLAYED_TOTAL, "call" => call.name())
                .increment(1);
            return Ok(remembered.answer.clone());
        }
        let answer = work()?;
        metrics::counter!(crate::metrics::NODE_CALLS_CARRIED_OUT_TOTAL, "call" => call.name())
            .increment(1);
        self.remember(Remembered {
            request_id,
            call: call.clone(),
            answer: answer.clone(),
        })?;
        Ok(answer)
    }

    /// Stores an answer and drops the oldest beyond [`REQUESTS_REMEMBERED_MAX`],
    /// in one batch.
    fn remember(&self, remembered: Remembered) -> Result<()> {
        let value = encode(&remembered)?;
        let mut memory = self.memory.lock();
        let sequence = memory.next_sequence;
        let mut batch = Batch::default();
        batch.put(Space::Meta, request_key(sequence), value);
        let mut evicted = Vec::new();
        while memory.order.len() + 1 - evicted.len() > REQUESTS_REMEMBERED_MAX {
            let Some(&(oldest_sequence, oldest_id)) = memory.order.get(evicted.len()) else {
                break;
            };
            batch.delete(Space::Meta, request_key(oldest_sequence));
            evicted.push(oldest_id);
        }
        self.store.engine().write(batch, Durability::Synced)?;
        for request_id in evicted {
            memory.order.pop_front();
            memory.answers.remove(&request_id);
        }
        memory.next_sequence = sequence + 1;
        memory.order.push_back((sequence, remembered.request_id));
        memory
            .answers
            .insert(remembered.request_id, (sequence, remembered));
        Ok(())
    }
}

/// A remembered answer of the wrong kind for its call: only a store written by another
/// build could hold one.
pub fn wrong_answer(request_id: RequestId, call: &NodeCall, answer: &NodeAnswer) -> Error {
    Error::Metadata {
        what: format!("the remembered answer to request {request_id:032x}"),
        detail: format!("a {} was answered {answer:?}", call.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_stored_in_the_layout_of_session_commands_only_is_still_read() {
        let command = SessionCommand::MirrorCancel {
            bcv: "bcv".to_string(),
        };
        let mut stored = vec![REQUEST_FORMAT_VERSION_SESSIONS_ONLY];
        stored.extend(
            protocol::codec::encode(&RememberedSessionCommand {
                request_id: 5,
                command: command.clone(),
                answer: None,
            })
            .unwrap(),
        );
        assert_eq!(
            decode(&stored).unwrap(),
            Remembered {
                request_id: 5,
                call: NodeCall::Session(command),
                answer: NodeAnswer::Session(None),
            }
        );
        let remembered = Remembered {
            request_id: 6,
            call: NodeCall::Snap {
                source: "a".to_string(),
                target: "b".to_string(),
                extents: Vec::new(),
                overwrite: true,
            },
            answer: NodeAnswer::Session(None),
        };
        assert_eq!(decode(&encode(&remembered).unwrap()).unwrap(), remembered);
        assert!(decode(&[9, 1, 2]).is_err());
    }
}
