//! A model-based property test of copy sessions: random interleavings of host writes,
//! host reads, partial copy steps and session commands against a plain in-memory model of
//! the seeds' rules (what every host sees, every mirror's changed bits, every BCV's
//! target-changed bits, every volume's readiness, and which commands are refused).
//!
//! The configuration is seed 002's FIG. 9: one standard volume (`std`) and three others
//! that may become its clones or BCVs, all on one node; the model itself is in
//! `seed_model.rs`, shared with `sessions_model_remote.rs`. Before a command the copies
//! are allowed to finish (the seeds' commands are issued against resting sessions); after
//! it, host IO interleaves with partial copy steps, which is where copy before write, copy
//! on first access and pulls of restored tracks must keep every host's view exact.

use crate::seed_model::{
    check_volume, name, operation, to_command, track_bytes, Model, ModelKind, Operation,
    Repertoire, STANDARD, TRACK_BYTES, VOLUMES,
};
use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::Durability;
use node::store::{Bits, VolumeStore};
use proptest::prelude::*;
use protocol::session::{SessionKind, SessionState};
use std::sync::Arc;

/// More tracks than one copy step moves, so steps leave copies half done.
const TRACKS: u64 = 40;

/// Compares everything the model predicts with the real sessions and store.
fn check(
    sessions: &Sessions<MemoryEngine>,
    model: &Model,
    tracks: &[u64],
    settled: bool,
) -> Result<(), TestCaseError> {
    let store = sessions.store();
    for volume in 0..VOLUMES {
        check_volume(sessions, model, volume, tracks)?;
    }
    let standard = store.volume(STANDARD).unwrap();
    let real = sessions.list(None).unwrap();
    prop_assert_eq!(real.len(), model.sessions.len(), "session count");
    for session in &model.sessions {
        let kind = match session.kind {
            ModelKind::Clone => SessionKind::Clone,
            ModelKind::Mirror => SessionKind::Mirror,
        };
        let info = sessions.show(kind, name(session.target)).unwrap();
        // Unsettled, a copy may still be on its way to the resting state the model holds.
        let on_its_way = !settled
            && matches!(
                (info.state, session.state),
                (SessionState::Active, SessionState::Copied)
                    | (SessionState::Syncing, SessionState::Synchronized)
                    | (SessionState::Restoring, SessionState::Synchronized)
            );
        if !on_its_way {
            prop_assert_eq!(
                info.state,
                session.state,
                "state of {}",
                name(session.target)
            );
        }
        prop_assert!(info.percent <= 100.0);
        if session.kind == ModelKind::Mirror {
            for &track in tracks {
                prop_assert_eq!(
                    store
                        .test_bit(&standard, Bits::Session(info.slots[0]), track)
                        .unwrap(),
                    session.changed[track as usize],
                    "changed bit of {} track {}",
                    name(session.target),
                    track
                );
            }
        }
        // A created clone copies nothing until a precopy or its activation.
        if settled && session.state != SessionState::Created {
            prop_assert_eq!(info.tracks_remaining, 0, "{} settled", name(session.target));
        }
    }
    Ok(())
}

fn run_case(operations: Vec<Operation>, probe: Vec<u64>) -> Result<(), TestCaseError> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    for volume in 0..VOLUMES {
        store
            .create(name(volume), TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
            .unwrap();
    }
    let sessions = Sessions::open(store.clone(), 1 << 20, None).unwrap();
    let mut model = Model::new(TRACKS);
    for operation in &operations {
        match *operation {
            Operation::Write {
                volume,
                track,
                byte,
            } => {
                let handle = store.volume(name(volume)).unwrap();
                let accepted = model.write(volume, track, byte);
                let result = sessions.write(
                    &handle,
                    track * TRACK_BYTES,
                    TRACK_BYTES,
                    Some(&track_bytes(byte)),
                    Durability::Logged,
                );
                prop_assert_eq!(
                    result.is_ok(),
                    accepted,
                    "write {:?}: {:?}",
                    operation,
                    result
                );
                check(&sessions, &model, &[track], false)?;
            }
            Operation::Read { volume, track } => {
                check(&sessions, &model, &[track], false)?;
                let _ = volume;
            }
            Operation::Step { session } => {
                let ids = sessions.copying();
                if let Some(id) = ids.get(session % ids.len().max(1)) {
                    sessions.copy_step(*id).unwrap();
                }
                check(&sessions, &model, &probe, false)?;
            }
            Operation::Probe | Operation::WriteRange { .. } => {
                unreachable!("not in the local repertoire")
            }
            _ => {
                sessions.settle().unwrap();
                let accepted = model.command(operation);
                let result = sessions.command(to_command(operation));
                prop_assert_eq!(
                    result.is_ok(),
                    accepted,
                    "{:?} gave {:?}",
                    operation,
                    result
                );
                // A rotation splits once its reestablish has synchronized, so it is let
                // finish; every other command leaves its copy running, for host IO and
                // copy steps to meet.
                let settled = matches!(operation, Operation::Rotate);
                if settled {
                    sessions.settle().unwrap();
                }
                // Reading a track pulls it, so checking every track here would copy the
                // whole clone at once and leave nothing for host writes to race with.
                check(&sessions, &model, &probe, settled)?;
            }
        }
    }
    sessions.settle().unwrap();
    let all: Vec<u64> = (0..TRACKS).collect();
    check(&sessions, &model, &all, true)
}

fn cases() -> u32 {
    std::env::var("TANDEM_MODEL_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn sessions_follow_the_seeds_rules_under_any_interleaving(
        operations in proptest::collection::vec(operation(TRACKS, Repertoire::Local), 1..40),
        probe in proptest::collection::vec(0..TRACKS, 3),
    ) {
        run_case(operations, probe)?;
    }
}
