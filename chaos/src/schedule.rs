//! Seed → what each round does: the copy it runs beside the host writes and the faults
//! it injects, at which millisecond and for how long. Pure: the same seed gives the same
//! plans on every machine (ChaCha8, whose stream is fixed by its own crate version), and
//! a plan prints on one line, so any run can be read back and replayed with `--seed`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The faults a schedule draws from. Roles (source, target, leader) are resolved when the
/// fault starts, since the leader is only known then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FaultKind {
    /// kill -9 of the node holding the round's source volume, restarted when it heals.
    KillSourceNode,
    /// kill -9 of the node holding the round's copy target.
    KillTargetNode,
    /// kill -9 of the control plane's leader.
    KillLeader,
    /// kill -9 of a control-plane member that is not the leader.
    KillFollowerMember,
    /// SIGSTOP of one node (a long garbage-collection pause, a stuck disk).
    PauseNode,
    /// SIGSTOP of the leader.
    PauseLeader,
    /// Every call between one node and all others dropped.
    PartitionNode,
    /// Every call between the two sites dropped.
    PartitionSites,
    /// Every call between the leader and the other members dropped.
    PartitionLeader,
    /// Every call between one node and the others delayed.
    DelayCalls,
    /// A share of the calls between one node and the others lost.
    LoseCalls,
    /// Every process killed at once, then all started again.
    RestartCluster,
    /// A follower member removed from the control plane, then added back.
    ChangeMembership,
}

impl FaultKind {
    pub const ALL: [FaultKind; 13] = [
        FaultKind::KillSourceNode,
        FaultKind::KillTargetNode,
        FaultKind::KillLeader,
        FaultKind::KillFollowerMember,
        FaultKind::PauseNode,
        FaultKind::PauseLeader,
        FaultKind::PartitionNode,
        FaultKind::PartitionSites,
        FaultKind::PartitionLeader,
        FaultKind::DelayCalls,
        FaultKind::LoseCalls,
        FaultKind::RestartCluster,
        FaultKind::ChangeMembership,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillSourceNode => "kill-source",
            FaultKind::KillTargetNode => "kill-target",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillFollowerMember => "kill-follower",
            FaultKind::PauseNode => "pause-node",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PartitionNode => "partition-node",
            FaultKind::PartitionSites => "partition-sites",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::DelayCalls => "delay",
            FaultKind::LoseCalls => "loss",
            FaultKind::RestartCluster => "restart-cluster",
            FaultKind::ChangeMembership => "membership",
        }
    }

    pub fn from_name(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The copy a round runs while its host writes, besides the writes themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CopyKind {
    /// A pointer snapshot on the source's node.
    Snap,
    /// A clone to another node, activated at once (copy before write, copy on access).
    Clone,
    /// A synchronous mirror to another node, split at the end of the round.
    SyncMirror,
    /// An asynchronous mirror to another node, split at the end of the round.
    AsyncMirror,
    /// A gsnap to the other site, then an incremental one after more writes.
    Gsnap,
}

impl CopyKind {
    pub const ALL: [CopyKind; 5] = [
        CopyKind::Snap,
        CopyKind::Clone,
        CopyKind::SyncMirror,
        CopyKind::AsyncMirror,
        CopyKind::Gsnap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CopyKind::Snap => "snap",
            CopyKind::Clone => "clone",
            CopyKind::SyncMirror => "sync-mirror",
            CopyKind::AsyncMirror => "async-mirror",
            CopyKind::Gsnap => "gsnap",
        }
    }
}

/// One fault of a round: what, when after the round's start, for how long, and which
/// node when the kind leaves the choice open (an index into the candidates, modulo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    pub at_milliseconds: u64,
    pub duration_milliseconds: u64,
    pub pick: u32,
    /// Delay faults: the delay; loss faults: the percent of calls lost.
    pub amount: u32,
}

/// Everything a round does, drawn from the seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub seed: u64,
    pub round: u64,
    pub copy: CopyKind,
    /// Which node holds the source (an index into the site's nodes, modulo).
    pub source_pick: u32,
    /// Which other node holds the copy target.
    pub target_pick: u32,
    /// When the copy starts, after the round's start.
    pub copy_at_milliseconds: u64,
    pub faults: Vec<Fault>,
    /// The seed of the round's writers.
    pub writer_seed: u64,
}

/// What a schedule may draw: the backend's fault kinds, how long a round's faults last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    pub kinds: Vec<FaultKind>,
    pub copies: Vec<CopyKind>,
    /// The part of a round in which faults start; every fault has healed at its end.
    pub round_milliseconds: u64,
    pub faults_per_round_max: u32,
}

impl Default for ScheduleConfig {
    fn default() -> ScheduleConfig {
        ScheduleConfig {
            kinds: FaultKind::ALL.to_vec(),
            copies: CopyKind::ALL.to_vec(),
            round_milliseconds: 3_000,
            faults_per_round_max: 2,
        }
    }
}

/// The plan of round `round` of the run seeded `seed`: each round has its own stream of
/// the seed, so a round is replayed alone with the same plan.
pub fn plan(seed: u64, round: u64, config: &ScheduleConfig) -> RoundPlan {
    assert!(!config.copies.is_empty(), "a schedule needs a copy kind");
    let mut random = ChaCha8Rng::seed_from_u64(seed);
    random.set_stream(round);
    let copy = config.copies[random.random_range(0..config.copies.len())];
    let source_pick = random.random();
    let target_pick = random.random();
    let round_milliseconds = config.round_milliseconds.max(100);
    let copy_at_milliseconds = random.random_range(0..round_milliseconds / 3);
    let fault_count = if config.kinds.is_empty() {
        0
    } else {
        random.random_range(1..=config.faults_per_round_max.max(1))
    };
    let mut faults = Vec::new();
    for _ in 0..fault_count {
        let kind = config.kinds[random.random_range(0..config.kinds.len())];
        let at_milliseconds = random.random_range(0..round_milliseconds * 2 / 3);
        let left = round_milliseconds - at_milliseconds;
        let duration_milliseconds = random.random_range(left / 4..=left);
        let amount = match kind {
            FaultKind::DelayCalls => random.random_range(5..=200),
            FaultKind::LoseCalls => random.random_range(10..=60),
            _ => 0,
        };
        faults.push(Fault {
            kind,
            at_milliseconds,
            duration_milliseconds,
            pick: random.random(),
            amount,
        });
    }
    faults.sort_by_key(|fault| fault.at_milliseconds);
    RoundPlan {
        seed,
        round,
        copy,
        source_pick,
        target_pick,
        copy_at_milliseconds,
        faults,
        writer_seed: random.random(),
    }
}

impl fmt::Display for RoundPlan {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "round {} (seed {}): {} at {} ms",
            self.round,
            self.seed,
            self.copy.name(),
            self.copy_at_milliseconds
        )?;
        for fault in &self.faults {
            write!(
                formatter,
                "; {} at {} ms for {} ms",
                fault.kind, fault.at_milliseconds, fault.duration_milliseconds
            )?;
            match fault.kind {
                FaultKind::DelayCalls => write!(formatter, " ({} ms)", fault.amount)?,
                FaultKind::LoseCalls => write!(formatter, " ({} %)", fault.amount)?,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_same_seed_gives_the_same_plans_and_another_seed_others() {
        let config = ScheduleConfig::default();
        let first: Vec<RoundPlan> = (0..20).map(|round| plan(7, round, &config)).collect();
        let again: Vec<RoundPlan> = (0..20).map(|round| plan(7, round, &config)).collect();
        assert_eq!(first, again);
        let other: Vec<RoundPlan> = (0..20).map(|round| plan(8, round, &config)).collect();
        assert_ne!(first, other);
        // A round replayed alone has the plan it had in the run.
        assert_eq!(plan(7, 13, &config), first[13]);
    }

    #[test]
    fn a_plan_is_pinned_to_its_seed_across_versions() {
        // If this changes, seeds printed by earlier runs no longer replay: a change of the
        // generator or of the drawing order must be deliberate.
        assert_eq!(
            plan(1, 0, &ScheduleConfig::default()).to_string(),
            "round 0 (seed 1): sync-mirror at 211 ms; partition-node at 1420 ms for 444 ms; \
             pause-leader at 1664 ms for 1250 ms"
        );
    }

    proptest! {
        #[test]
        fn every_fault_starts_and_heals_within_its_round(seed: u64, round in 0u64..1000, milliseconds in 100u64..20_000) {
            let config = ScheduleConfig { round_milliseconds: milliseconds, ..ScheduleConfig::default() };
            let plan = plan(seed, round, &config);
            prop_assert!(!plan.faults.is_empty());
            prop_assert!(plan.faults.len() <= config.faults_per_round_max as usize);
            for fault in &plan.faults {
                prop_assert!(fault.at_milliseconds + fault.duration_milliseconds <= milliseconds);
                prop_assert!(config.kinds.contains(&fault.kind));
            }
            prop_assert!(plan.faults.windows(2).all(|pair| pair[0].at_milliseconds <= pair[1].at_milliseconds));
        }
    }
}
