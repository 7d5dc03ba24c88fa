//! The checkers: pure functions of a history (and of bytes read back or views of the
//! catalog and the nodes) to findings. Each can fail; the tests below show each failing.

use crate::block::{self, BLOCK_BYTES, INITIAL_WRITE};
use crate::history::{Operation, Outcome, Span};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Checker {
    /// An acknowledged write that does not read back, or a block no write put there.
    Writes,
    /// A copy that does not equal its source's image at the copy's instant.
    Copies,
    /// A percent above 100 or lower than an earlier reading of the same copy.
    Progress,
    /// A command or a copy that did not answer or settle within its bound.
    Liveness,
    /// The catalog and a node disagree, or a slot is held by nothing.
    Catalog,
}

impl fmt::Display for Checker {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Checker::Writes => "writes",
            Checker::Copies => "copies",
            Checker::Progress => "progress",
            Checker::Liveness => "liveness",
            Checker::Catalog => "catalog",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub checker: Checker,
    pub message: String,
}

impl Finding {
    fn new(checker: Checker, message: String) -> Finding {
        Finding { checker, message }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.checker, self.message)
    }
}

/// One write as it touched one block.
#[derive(Debug, Clone, PartialEq)]
struct BlockWrite {
    write_id: u64,
    invoked_at: u64,
    /// When it was acknowledged; `None` when it failed or its outcome is unknown, so it
    /// may have taken effect at any time after its invoke.
    acknowledged_at: Option<u64>,
    durable: bool,
}

/// The writes of one volume, block by block, from a history.
#[derive(Debug, Clone, Default)]
pub struct VolumeWrites {
    blocks: BTreeMap<u64, Vec<BlockWrite>>,
    acknowledged: u64,
    durable: u64,
}

impl VolumeWrites {
    /// The writes to `volume` in `spans`. A write counts as durable (promised to survive
    /// a power loss) when it had FUA or a flush of the volume acknowledged after it.
    pub fn from_spans(spans: &[Span], volume: &str) -> VolumeWrites {
        let flushes: Vec<(u64, u64)> = spans
            .iter()
            .filter(|span| matches!(&span.operation, Operation::Flush { volume: flushed } if flushed == volume))
            .filter(|span| span.outcome() == Outcome::Ok)
            .filter_map(|span| Some((span.invoked_at, span.ended_at()?)))
            .collect();
        let mut writes = VolumeWrites::default();
        for span in spans {
            let Operation::Write {
                volume: written,
                first_block,
                blocks,
                write_id,
                fua,
            } = &span.operation
            else {
                continue;
            };
            if written != volume {
                continue;
            }
            let acknowledged_at = (span.outcome() == Outcome::Ok)
                .then(|| span.ended_at())
                .flatten();
            let durable = acknowledged_at.is_some_and(|at| {
                *fua || flushes
                    .iter()
                    .any(|(flush_invoked, _)| *flush_invoked >= at)
            });
            if acknowledged_at.is_some() {
                writes.acknowledged += 1;
            }
            if durable {
                writes.durable += 1;
            }
            for block in *first_block..first_block + blocks {
                writes.blocks.entry(block).or_default().push(BlockWrite {
                    write_id: *write_id,
                    invoked_at: span.invoked_at,
                    acknowledged_at,
                    durable,
                });
            }
        }
        writes
    }

    /// Writes acknowledged, and of them those promised durable.
    pub fn acknowledged(&self) -> (u64, u64) {
        (self.acknowledged, self.durable)
    }

    /// What `block` may hold once every write has ended: an acknowledged write no later
    /// acknowledged write started after, or any write whose outcome is not known.
    fn allowed_final(&self, block: u64) -> BTreeSet<u64> {
        self.allowed_at(block, u64::MAX, u64::MAX)
    }

    /// What `block` may hold at some instant within `[from, to]` (microseconds): an
    /// acknowledged write that ended before `from` and that no write acknowledged before
    /// `from` started after, or a write that started before `to` and did not end (with
    /// an acknowledgement) before `from`.
    fn allowed_at(&self, block: u64, from: u64, to: u64) -> BTreeSet<u64> {
        let mut allowed = BTreeSet::new();
        let writes = self.blocks.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        let done_before: Vec<&BlockWrite> = writes
            .iter()
            .filter(|write| write.acknowledged_at.is_some_and(|at| at < from))
            .collect();
        for write in &done_before {
            let ended = write.acknowledged_at.unwrap_or(0);
            if !done_before.iter().any(|later| later.invoked_at > ended) {
                allowed.insert(write.write_id);
            }
        }
        if done_before.is_empty() {
            allowed.insert(INITIAL_WRITE);
        }
        for write in writes {
            let settled_before = write.acknowledged_at.is_some_and(|at| at < from);
            if write.invoked_at <= to && !settled_before {
                allowed.insert(write.write_id);
            }
        }
        allowed
    }

    /// Checks `image` (the whole volume, read back after every write ended) against the
    /// writes; returns the acknowledged writes it checked and what it found.
    pub fn check_final(&self, volume: &str, image: &[u8]) -> (u64, Vec<Finding>) {
        let mut findings = Vec::new();
        let mut checked: BTreeSet<u64> = BTreeSet::new();
        for (index, bytes) in image.chunks(BLOCK_BYTES as usize).enumerate() {
            let block = index as u64;
            let allowed = self.allowed_final(block);
            match block::decode(block, bytes) {
                None => findings.push(Finding::new(
                    Checker::Writes,
                    format!("{volume} block {block} holds bytes no write wrote (torn or corrupted); it may hold {allowed:?}"),
                )),
                Some(found) if !allowed.contains(&found) => {
                    let lost = self.blocks.get(&block).and_then(|writes| {
                        writes.iter().rev().find(|write| write.acknowledged_at.is_some())
                    });
                    findings.push(Finding::new(
                        Checker::Writes,
                        format!(
                            "{volume} block {block} lost acknowledged{} write {}: it holds write {found}, it may hold {allowed:?}",
                            if lost.is_some_and(|write| write.durable) { " and flushed" } else { "" },
                            lost.map_or(0, |write| write.write_id),
                        ),
                    ))
                }
                Some(_) => {}
            }
            if let Some(writes) = self.blocks.get(&block) {
                checked.extend(
                    writes
                        .iter()
                        .filter(|write| write.acknowledged_at.is_some())
                        .map(|write| write.write_id),
                );
            }
        }
        (checked.len() as u64, findings)
    }

    /// Checks a copy of this volume taken at one instant within `[from, to]`: every
    /// block of `image` must hold what the source may have held then.
    pub fn check_copy(&self, copy: &str, image: &[u8], from: u64, to: u64) -> Vec<Finding> {
        let mut findings = Vec::new();
        for (index, bytes) in image.chunks(BLOCK_BYTES as usize).enumerate() {
            let block = index as u64;
            let allowed = self.allowed_at(block, from, to);
            match block::decode(block, bytes) {
                Some(found) if allowed.contains(&found) => {}
                found => findings.push(Finding::new(
                    Checker::Copies,
                    format!(
                        "{copy} block {block} holds {} but its source held one of {allowed:?} at the copy's instant",
                        found.map_or("bytes no write wrote".to_string(), |id| format!("write {id}")),
                    ),
                )),
            }
        }
        findings
    }
}

/// Every percent above 100, and every percent lower than the one before it within the
/// same subject and epoch.
pub fn check_progress(spans: &[Span]) -> (u64, Vec<Finding>) {
    let mut last: HashMap<(&str, &str), f64> = HashMap::new();
    let mut findings = Vec::new();
    let mut readings = 0;
    for span in spans {
        let Operation::Progress {
            subject,
            epoch,
            percent,
        } = &span.operation
        else {
            continue;
        };
        readings += 1;
        if *percent > 100.0 || percent.is_nan() || *percent < 0.0 {
            findings.push(Finding::new(
                Checker::Progress,
                format!("{subject} ({epoch}) showed {percent} %"),
            ));
        }
        if let Some(previous) = last.insert((subject, epoch), *percent) {
            if *percent < previous {
                findings.push(Finding::new(
                    Checker::Progress,
                    format!("{subject} ({epoch}) went back from {previous} % to {percent} %"),
                ));
            }
        }
    }
    (readings, findings)
}

/// Every command that took longer than `command_microseconds_max` or never answered, and
/// every copy that did not settle.
pub fn check_liveness(spans: &[Span], command_microseconds_max: u64) -> Vec<Finding> {
    let mut findings = Vec::new();
    for span in spans {
        match &span.operation {
            Operation::Command { arguments } => match span.ended_at() {
                None => findings.push(Finding::new(
                    Checker::Liveness,
                    format!("`tandem {}` never answered", arguments.join(" ")),
                )),
                Some(at) if at - span.invoked_at > command_microseconds_max => {
                    findings.push(Finding::new(
                        Checker::Liveness,
                        format!(
                            "`tandem {}` took {} ms (bound {} ms)",
                            arguments.join(" "),
                            (at - span.invoked_at) / 1000,
                            command_microseconds_max / 1000
                        ),
                    ))
                }
                Some(_) => {}
            },
            Operation::Settle { subject } if span.outcome() != Outcome::Ok => {
                findings.push(Finding::new(
                    Checker::Liveness,
                    format!(
                        "{subject} did not settle: {}",
                        span.detail.as_deref().unwrap_or("no answer")
                    ),
                ))
            }
            _ => {}
        }
    }
    findings
}

/// A volume as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogVolume {
    pub name: String,
    pub node: String,
    pub size_bytes: u64,
    pub state: String,
}

/// A volume as its node stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeVolume {
    pub node: String,
    pub name: String,
    pub size_bytes: u64,
    pub slots_used: u8,
}

/// Catalog and nodes agree: every ready volume of the catalog is on its node with its
/// size, every volume of a node is in the catalog, and each volume's slots in use are the
/// ones its sessions and lineages hold (`slots_expected`, by volume; absent: none).
pub fn check_catalog(
    catalog: &[CatalogVolume],
    nodes: &[NodeVolume],
    slots_expected: &HashMap<String, u8>,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for volume in catalog {
        if volume.state != "ready" {
            findings.push(Finding::new(
                Checker::Catalog,
                format!(
                    "volume {} is left {} in the catalog",
                    volume.name, volume.state
                ),
            ));
            continue;
        }
        match nodes
            .iter()
            .find(|stored| stored.name == volume.name && stored.node == volume.node)
        {
            None => findings.push(Finding::new(
                Checker::Catalog,
                format!(
                    "volume {} is in the catalog on node {} but that node does not hold it",
                    volume.name, volume.node
                ),
            )),
            Some(stored) if stored.size_bytes != volume.size_bytes => findings.push(Finding::new(
                Checker::Catalog,
                format!(
                    "volume {} is {} bytes in the catalog and {} on node {}",
                    volume.name, volume.size_bytes, stored.size_bytes, stored.node
                ),
            )),
            Some(_) => {}
        }
    }
    for stored in nodes {
        if !catalog
            .iter()
            .any(|volume| volume.name == stored.name && volume.node == stored.node)
        {
            findings.push(Finding::new(
                Checker::Catalog,
                format!(
                    "node {} holds volume {} that the catalog does not record there",
                    stored.node, stored.name
                ),
            ));
        }
        let expected = slots_expected.get(&stored.name).copied().unwrap_or(0);
        if stored.slots_used != expected {
            findings.push(Finding::new(
                Checker::Catalog,
                format!(
                    "volume {} on node {} has {} session slots in use; its sessions and lineages hold {expected}",
                    stored.name, stored.node, stored.slots_used
                ),
            ));
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::write_content;
    use crate::history::{spans, History};

    fn write(history: &History, write_id: u64, first_block: u64, outcome: Outcome) {
        // Writes within one microsecond count as concurrent (the clock cannot order
        // them), so each scenario write starts strictly after the one before ended.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let id = history.invoke(
            "writer",
            Operation::Write {
                volume: "p".into(),
                first_block,
                blocks: 1,
                write_id,
                fua: false,
            },
        );
        if outcome != Outcome::Invoke {
            history.end(id, outcome, None);
        }
    }

    fn image(blocks: &[u64]) -> Vec<u8> {
        blocks
            .iter()
            .enumerate()
            .flat_map(|(block, write_id)| write_content(*write_id, block as u64, 1))
            .collect()
    }

    #[test]
    fn an_acknowledged_write_must_read_back_and_an_unknown_one_may_or_may_not() {
        let history = History::new();
        write(&history, 1, 0, Outcome::Ok);
        write(&history, 2, 0, Outcome::Ok);
        write(&history, 3, 1, Outcome::Ok);
        write(&history, 4, 1, Outcome::Unknown);
        let writes = VolumeWrites::from_spans(&spans(&history.events()), "p");
        assert_eq!(writes.acknowledged(), (3, 0));
        for good in [[2, 3, 0], [2, 4, 0]] {
            let (checked, findings) = writes.check_final("p", &image(&good));
            assert!(findings.is_empty(), "{good:?}: {findings:?}");
            assert_eq!(checked, 3);
        }
        // Write 2 lost: block 0 went back to write 1.
        let (_, findings) = writes.check_final("p", &image(&[1, 3, 0]));
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(findings[0].message.contains("lost acknowledged write 2"));
        // A block no write wrote.
        let mut torn = image(&[2, 3, 0]);
        torn[BLOCK_BYTES as usize * 2 + 5] = 1;
        let (_, findings) = writes.check_final("p", &torn);
        assert_eq!(findings[0].checker, Checker::Writes);
        assert!(findings[0].message.contains("no write wrote"));
    }

    #[test]
    fn a_copy_holds_its_source_at_one_instant_of_its_window() {
        let history = History::new();
        write(&history, 1, 0, Outcome::Ok);
        let from = history.now_microseconds() + 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
        write(&history, 2, 1, Outcome::Ok);
        let to = history.now_microseconds();
        std::thread::sleep(std::time::Duration::from_millis(2));
        write(&history, 3, 0, Outcome::Ok);
        let writes = VolumeWrites::from_spans(&spans(&history.events()), "p");
        // Write 2 ran within the window: either side of it is an instant of the window.
        assert!(writes.check_copy("s", &image(&[1, 2]), from, to).is_empty());
        assert!(writes.check_copy("s", &image(&[1, 0]), from, to).is_empty());
        // Write 3 came after the window; write 1 was acknowledged before it.
        let findings = writes.check_copy("s", &image(&[3, 2]), from, to);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].checker, Checker::Copies);
        assert_eq!(writes.check_copy("s", &image(&[0, 2]), from, to).len(), 1);
    }

    #[test]
    fn progress_never_goes_back_within_an_epoch_nor_above_100() {
        let history = History::new();
        for (epoch, percent) in [("a", 10.0), ("a", 50.0), ("b", 0.0), ("b", 100.0)] {
            history.record(
                "poller",
                Operation::Progress {
                    subject: "job 1".into(),
                    epoch: epoch.into(),
                    percent,
                },
            );
        }
        assert_eq!(check_progress(&spans(&history.events())).1, vec![]);
        for percent in [99.0, 100.5] {
            history.record(
                "poller",
                Operation::Progress {
                    subject: "job 1".into(),
                    epoch: "b".into(),
                    percent,
                },
            );
        }
        let (readings, findings) = check_progress(&spans(&history.events()));
        assert_eq!(readings, 6);
        assert_eq!(findings.len(), 2, "{findings:?}");
    }

    #[test]
    fn a_command_over_its_bound_or_without_answer_is_a_hang() {
        let history = History::new();
        let quick = history.invoke(
            "cli",
            Operation::Command {
                arguments: vec!["status".into()],
            },
        );
        history.end(quick, Outcome::Fail, None);
        history.invoke(
            "cli",
            Operation::Command {
                arguments: vec!["volume".into()],
            },
        );
        let settle = history.invoke(
            "runner",
            Operation::Settle {
                subject: "mirror b".into(),
            },
        );
        history.end(settle, Outcome::Fail, Some("still syncing".into()));
        let findings = check_liveness(&spans(&history.events()), 1_000_000);
        assert_eq!(findings.len(), 2, "{findings:?}");
        assert!(findings
            .iter()
            .all(|finding| finding.checker == Checker::Liveness));
    }

    #[test]
    fn catalog_and_nodes_agree_on_volumes_and_slots() {
        let catalog = vec![CatalogVolume {
            name: "p".into(),
            node: "a1".into(),
            size_bytes: 4096,
            state: "ready".into(),
        }];
        let mut nodes = vec![NodeVolume {
            node: "a1".into(),
            name: "p".into(),
            size_bytes: 4096,
            slots_used: 1,
        }];
        let slots = HashMap::from([("p".to_string(), 1)]);
        assert!(check_catalog(&catalog, &nodes, &slots).is_empty());
        // A slot nothing holds is a leak.
        assert_eq!(check_catalog(&catalog, &nodes, &HashMap::new()).len(), 1);
        // A volume only a node has.
        nodes.push(NodeVolume {
            node: "b1".into(),
            name: "orphan".into(),
            size_bytes: 4096,
            slots_used: 0,
        });
        assert_eq!(check_catalog(&catalog, &nodes, &slots).len(), 1);
    }
}
