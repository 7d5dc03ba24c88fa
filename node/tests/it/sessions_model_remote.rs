//! A model-based property test of copy sessions whose targets are on another node, reached
//! through a faulty link: the remote twin of `sessions_model.rs`, against the same model of
//! the seeds' rules (`seed_model.rs`).
//!
//! Two nodes run in this process: `alpha` holds the standard volume `std` and runs every
//! session; `beta` holds `bcv1`..`bcv3`, the sessions' targets, and serves alpha's target
//! operations (`serve_target`); beta's hosts pull a clone's missing tracks back from alpha
//! the same way. Each direction goes through a [`FaultyLink`] driven by a schedule that is
//! part of the test's input. Per call (each operation of a many-operation call, such as a
//! copy step's tracks, counts as one) the link either answers normally, or refuses (the
//! operation never reaches the other node, and the caller gets the error of a node that
//! does not answer), or loses the answer (the other node carries the operation out, and the
//! caller gets the same error). About one call in twelve meets a fault, so sessions still
//! make progress; a faulty call returns at once, so no case waits for a timeout.
//!
//! What the system around the node does is modelled as well. A session command that fails
//! because of a fault is retried, once, with the link healthy (after the copier's probe,
//! and possibly after a few copy steps), as an admin or the control plane would; the model
//! applies the command once, when it succeeds, and a command the seeds refuse must be
//! refused both times. A host IO that fails because of a fault, or because a session whose
//! target did not answer is suspended, is retried the same way, as a host retries an IO
//! error. A mirror cancel that met a fault when it asked whether the BCV's node answers
//! ends the session without the BCV, by design: the model then takes the BCV's readiness
//! and tracking from beta (see [`adopt_abandoned_bcv`]).
//!
//! Suspension: the mirrors are not strict, so a session whose target does not answer goes
//! to `suspended` (clones and async mirrors do so whatever `--strict` says, so a strict
//! mirror would not spare the test this state). The test lets suspended sessions resume
//! the way the node does, through `probe_targets`: as an operation of its own (with the
//! link faulty, so a probe may fail too), before every retry and before every command
//! (with the link healthy). Until then the checks take `suspended` for a state on its way
//! to the one the model holds.
//!
//! Before every command the copies finish with the link healthy, as in `sessions_model.rs`,
//! except that a clone's precopy is often left half done: the model's outcome of a clone
//! does not depend on it, and a precopy interrupted by a lost answer, a host write and an
//! activation is where a track must not be taken for copied. Host writes over several
//! tracks make it likely that a write meets the one track a lost answer left behind.
//!
//! The checks after every operation are those of `sessions_model.rs`: every host read
//! returns the model's image, every volume has the model's readiness, every mirror's
//! changed bits and every BCV's target-changed bits are the model's, and no slot of the
//! standard is held by no session. At rest (before every command and at the end) every
//! session is in the model's state, every synchronized BCV holds its standard's image, and
//! beta holds a registration (and invalid tracks) only for volumes in a session.
//!
//! Deterministic cases at the end lose one answer placed by hand, for the bugs the
//! property found.

use crate::seed_model::{
    check_volume, holds, name, operation, target_volume, to_command, track_bytes, Model, ModelKind,
    Operation, Repertoire, STANDARD, TARGETS, TRACK_BYTES, VOLUMES,
};
use node::copy::remote::TargetLink;
use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::Durability;
use node::store::{Bits, VolumeStore};
use proptest::prelude::*;
use protocol::messages::Readiness;
use protocol::session::{
    RemoteVolume, SessionInfo, SessionKind, SessionState, TargetAnswer, TargetOperation,
};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// More tracks than one copy step to another node moves (64), so steps leave copies half
/// done.
const TRACKS: u64 = 72;
const ALPHA: &str = "alpha";
const BETA: &str = "beta";

type Node = Sessions<MemoryEngine>;

/// What a faulty call does instead of answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The operation never reaches the other node; the caller hears that it did not
    /// answer.
    Refuse,
    /// The other node carries the operation out, and its answer is lost on the way back:
    /// the caller hears the same as for a refusal.
    LoseAnswer,
}

/// One entry of a link's schedule: `calls_before` calls are answered normally, then the
/// next one meets `fault`. The schedule starts over when it runs out, so its faults are
/// spread over the whole case however many calls the case makes.
#[derive(Debug, Clone, Copy)]
struct ScheduledFault {
    calls_before: u16,
    fault: Fault,
}

fn scheduled_fault() -> impl Strategy<Value = ScheduledFault> {
    // About one call in twelve meets a fault (half of the entries come close together): a
    // copy step of 64 tracks meets a few, and the tracks acknowledged around them still
    // count, so copies progress.
    (
        prop_oneof![0u16..8, 0u16..40],
        prop_oneof![Just(Fault::Refuse), Just(Fault::LoseAnswer)],
    )
        .prop_map(|(calls_before, fault)| ScheduledFault {
            calls_before,
            fault,
        })
}

/// A fault the deterministic tests place: the first call whose operation `selects`
/// accepts meets `fault`, whether the schedule's faults are on or not.
#[derive(Clone, Copy)]
struct Trap {
    selects: fn(&TargetOperation) -> bool,
    fault: Fault,
}

struct LinkState {
    /// The schedule applies only while faults are on: the test turns them off to let
    /// copies finish, to probe and to retry, as if the network had healed.
    on: bool,
    schedule: Vec<ScheduledFault>,
    /// How many entries of the schedule have been used.
    used: usize,
    /// Calls answered normally since the last scheduled fault.
    answered_since_fault: u16,
    trap: Option<Trap>,
    /// Every call so far, faulty or not: fault descriptions give their call's number.
    calls: u64,
    /// Every fault injected, described for failure messages; its length tells whether an
    /// operation of the test met a fault.
    injected: Vec<String>,
}

/// One direction of the network between the two nodes.
struct FaultyLink {
    this_node: &'static str,
    peer_node: &'static str,
    /// The node at the other end; weak, because that node holds the link back to this one.
    peer: OnceLock<Weak<Node>>,
    state: Mutex<LinkState>,
}

/// The name of an operation's variant, without formatting the rest (a stored track's
/// debug text holds its data).
fn operation_name(operation: &TargetOperation) -> String {
    /// Keeps the leading identifier and stops the formatting right after it.
    struct Identifier(String);
    impl std::fmt::Write for Identifier {
        fn write_str(&mut self, text: &str) -> std::fmt::Result {
            for character in text.chars() {
                if !character.is_alphanumeric() {
                    return Err(std::fmt::Error);
                }
                self.0.push(character);
            }
            Ok(())
        }
    }
    let mut identifier = Identifier(String::new());
    let _ = write!(identifier, "{operation:?}");
    identifier.0
}

impl FaultyLink {
    fn new(
        this_node: &'static str,
        peer_node: &'static str,
        schedule: Vec<ScheduledFault>,
    ) -> FaultyLink {
        FaultyLink {
            this_node,
            peer_node,
            peer: OnceLock::new(),
            state: Mutex::new(LinkState {
                on: false,
                schedule,
                used: 0,
                answered_since_fault: 0,
                trap: None,
                calls: 0,
                injected: Vec::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap()
    }

    fn set_trap(&self, trap: Trap) {
        self.state().trap = Some(trap);
    }

    fn trap_sprung(&self) -> bool {
        self.state().trap.is_none()
    }

    /// Whether this call meets a fault, and which.
    fn fault_for(&self, operation: &TargetOperation) -> Option<Fault> {
        let mut state = self.state();
        state.calls += 1;
        let mut fault = None;
        if let Some(trap) = state.trap {
            if (trap.selects)(operation) {
                state.trap = None;
                fault = Some(trap.fault);
            }
        }
        if fault.is_none() && state.on && !state.schedule.is_empty() {
            let next = state.schedule[state.used % state.schedule.len()];
            if state.answered_since_fault >= next.calls_before {
                state.used += 1;
                state.answered_since_fault = 0;
                fault = Some(next.fault);
            } else {
                state.answered_since_fault += 1;
            }
        }
        if let Some(fault) = fault {
            let description = format!(
                "{} -> {} call {}: {} {fault:?}",
                self.this_node,
                self.peer_node,
                state.calls,
                operation_name(operation)
            );
            state.injected.push(description);
        }
        fault
    }

    fn serve(&self, operation: TargetOperation) -> node::Result<TargetAnswer> {
        let peer = self
            .peer
            .get()
            .and_then(Weak::upgrade)
            .expect("both nodes live as long as the case");
        peer.serve_target(operation)
    }

    /// Carries out a call with its fault, if it meets one; `unanswered` makes the error a
    /// caller gets from a node that does not answer.
    fn carry_out(
        &self,
        operation: TargetOperation,
        unanswered: impl FnOnce() -> node::Error,
    ) -> node::Result<TargetAnswer> {
        match self.fault_for(&operation) {
            None => self.serve(operation),
            Some(Fault::Refuse) => Err(unanswered()),
            Some(Fault::LoseAnswer) => {
                // Whatever the other node answered, the caller does not hear it.
                let _ = self.serve(operation);
                Err(unanswered())
            }
        }
    }
}

/// `call_many` and `call_many_within` keep the trait's own versions, which make one call
/// per operation: each operation of a copy step meets its own fault, as each stream of the
/// QUIC link can.
impl TargetLink for FaultyLink {
    fn call(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
    ) -> node::Result<TargetAnswer> {
        self.carry_out(operation, || node::Error::Remote {
            node: remote.node.clone(),
            detail: "the connection broke (an injected fault)".to_string(),
        })
    }

    /// A fault returns at once instead of after `timeout`: the test takes the answer that
    /// never comes for one that came too late, and stays fast.
    fn call_within(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
        timeout: Duration,
    ) -> node::Result<TargetAnswer> {
        self.carry_out(operation, || node::Error::TargetUnanswered {
            node: remote.node.clone(),
            volume: remote.volume.clone(),
            timeout_milliseconds: timeout.as_millis() as u64,
        })
    }

    fn this_node(&self) -> (String, String) {
        (self.this_node.to_string(), address_of(self.this_node))
    }
}

fn address_of(node: &str) -> String {
    match node {
        ALPHA => "127.0.0.1:1".to_string(),
        _ => "127.0.0.1:2".to_string(),
    }
}

/// How alpha names a target volume of beta.
fn on_beta(volume: usize) -> RemoteVolume {
    RemoteVolume {
        node: BETA.to_string(),
        address: address_of(BETA),
        volume: name(volume).to_string(),
    }
}

/// Alpha, beta and the two directions of the network between them.
struct Cluster {
    alpha: Arc<Node>,
    beta: Arc<Node>,
    to_beta: Arc<FaultyLink>,
    to_alpha: Arc<FaultyLink>,
    /// Mirrors cancelled while their BCV's node did not answer: the BCV (by index) and
    /// the session whose release alpha owes beta.
    owed_releases: std::sync::Mutex<Vec<(usize, u64)>>,
}

impl Cluster {
    fn new(to_beta: Vec<ScheduledFault>, to_alpha: Vec<ScheduledFault>) -> Cluster {
        let to_beta = Arc::new(FaultyLink::new(ALPHA, BETA, to_beta));
        let to_alpha = Arc::new(FaultyLink::new(BETA, ALPHA, to_alpha));
        let open = |link: Arc<FaultyLink>| {
            let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
            Arc::new(Sessions::open(store, 1 << 20, Some(link as Arc<dyn TargetLink>)).unwrap())
        };
        let alpha = open(to_beta.clone());
        let beta = open(to_alpha.clone());
        let _ = to_beta.peer.set(Arc::downgrade(&beta));
        let _ = to_alpha.peer.set(Arc::downgrade(&alpha));
        let cluster = Cluster {
            alpha,
            beta,
            to_beta,
            to_alpha,
            owed_releases: std::sync::Mutex::default(),
        };
        for volume in 0..VOLUMES {
            cluster
                .node(volume)
                .store()
                .create(name(volume), TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
                .unwrap();
        }
        cluster
    }

    /// The node holding a volume of the model.
    fn node(&self, volume: usize) -> &Node {
        if volume == 0 {
            &self.alpha
        } else {
            &self.beta
        }
    }

    fn faults(&self, on: bool) {
        self.to_beta.state().on = on;
        self.to_alpha.state().on = on;
    }

    /// How many faults both links have injected so far.
    fn injected(&self) -> usize {
        self.to_beta.state().injected.len() + self.to_alpha.state().injected.len()
    }

    /// How many faults calls of the named operation met so far.
    fn faults_met_by(&self, operation: &str) -> usize {
        let needle = format!(": {operation} ");
        self.to_beta
            .state()
            .injected
            .iter()
            .filter(|entry| entry.contains(&needle))
            .count()
    }

    fn fault_log(&self) -> String {
        let mut log = self.to_beta.state().injected.clone();
        log.extend(self.to_alpha.state().injected.iter().cloned());
        log.join("\n")
    }

    fn any_suspended(&self) -> bool {
        self.alpha
            .list(None)
            .unwrap()
            .iter()
            .any(|info| info.state == SessionState::Suspended)
    }

    /// The copier's probe with the network healed: every suspended session resumes and
    /// every release owed to beta is delivered.
    fn probe_healed(&self) {
        self.faults(false);
        self.alpha.probe_targets().unwrap();
    }

    /// Lets every copy finish with the network healed, as the seeds' commands are issued
    /// against resting sessions; with `precopies` false, precopies go on where they are
    /// (their clone's outcome does not depend on how far they went).
    fn rest(&self, precopies: bool) -> Result<(), TestCaseError> {
        self.probe_healed();
        if precopies {
            let settled = self.alpha.settle();
            prop_assert!(settled.is_ok(), "copies did not finish: {:?}", settled);
            return Ok(());
        }
        // `settle` without the precopies; no rotation waits for its split here (a
        // rotation is let finish with everything else).
        loop {
            let mut worked = false;
            for info in self.alpha.list(None).unwrap() {
                if info.state == SessionState::Precopying
                    || !self.alpha.copying().contains(&info.id)
                {
                    continue;
                }
                let stepped = self.alpha.copy_step(info.id);
                prop_assert!(stepped.is_ok(), "copies did not finish: {:?}", stepped);
                worked |= !stepped.unwrap().idle;
            }
            if !worked {
                return Ok(());
            }
        }
    }

    /// Host IO with the network faulty; a failure met because of a fault, or because a
    /// session whose target did not answer is suspended, is retried once the copier's
    /// probe found the network healed, as a host retries an IO error.
    fn host_io<T>(&self, io: impl Fn() -> node::Result<T>) -> node::Result<T> {
        let injected = self.injected();
        self.faults(true);
        let first = io();
        self.faults(false);
        match first {
            Err(_) if self.injected() > injected || self.any_suspended() => {
                self.probe_healed();
                io()
            }
            result => result,
        }
    }

    /// A session command with the network faulty; when it fails and a fault was injected,
    /// it is retried once with the network healed, after `steps_before_retry` copy steps
    /// (still faulty) and the copier's probe, as an admin or the control plane retries.
    fn command(
        &self,
        operation: &Operation,
        steps_before_retry: u8,
    ) -> node::Result<Option<SessionInfo>> {
        let command = to_command(operation);
        let remote = target_volume(operation).map(on_beta);
        let injected = self.injected();
        self.faults(true);
        let first = self.alpha.command_with(command.clone(), remote.clone());
        if first.is_ok() || self.injected() == injected {
            self.faults(false);
            return first;
        }
        for step in 0..usize::from(steps_before_retry) {
            let copying = self.alpha.copying();
            if let Some(id) = copying.get(step % copying.len().max(1)) {
                let _ = self.alpha.copy_step(*id);
            }
        }
        self.probe_healed();
        self.alpha.command_with(command, remote)
    }

    /// A copy step with the network faulty: it may fail only because of a fault (and then
    /// suspends its session when it can).
    fn step(&self, index: usize) -> Result<(), TestCaseError> {
        let copying = self.alpha.copying();
        let Some(id) = copying.get(index % copying.len().max(1)) else {
            return Ok(());
        };
        let injected = self.injected();
        self.faults(true);
        let result = self.alpha.copy_step(*id);
        self.faults(false);

        prop_assert!(
            result.is_ok() || self.injected() > injected,
            "a copy step failed without a fault: {:?}",
            result
        );
        Ok(())
    }
}

/// The model's image of a volume as its node stores it, read without host IO's rules
/// (no readiness check, no pulls).
fn stored_track(cluster: &Cluster, volume: usize, track: u64) -> Vec<u8> {
    let store = cluster.node(volume).store();
    let handle = store.volume(name(volume)).unwrap();
    store
        .read(&handle, track * TRACK_BYTES, TRACK_BYTES)
        .unwrap()
}

/// Compares everything the model predicts with the two nodes. `settled`: the copies have
/// finished with the network healed, so the states are exact and what the copies wrote
/// can be compared too.
fn check(
    cluster: &Cluster,
    model: &Model,
    tracks: &[u64],
    settled: bool,
) -> Result<(), TestCaseError> {
    cluster.faults(false);
    for volume in 0..VOLUMES {
        let node = cluster.node(volume);
        check_volume(node, model, volume, tracks)?;
    }
    let alpha = &cluster.alpha;
    let standard = alpha.store().volume(STANDARD).unwrap();
    let real = alpha.list(None).unwrap();
    prop_assert_eq!(real.len(), model.sessions.len(), "session count");
    let mut slots_held = 0u16;
    for session in &model.sessions {
        let kind = match session.kind {
            ModelKind::Clone => SessionKind::Clone,
            ModelKind::Mirror => SessionKind::Mirror,
        };
        let info = alpha.show(kind, name(session.target));
        prop_assert!(info.is_ok(), "{}: {:?}", name(session.target), info);
        let info = info.unwrap();
        for slot in &info.slots {
            slots_held |= 1 << slot;
        }
        // Unsettled, a copy may still be on its way to the resting state the model holds,
        // and a session whose target did not answer waits for the copier's probe.
        let on_its_way = !settled
            && matches!(
                (info.state, session.state),
                (SessionState::Active, SessionState::Copied)
                    | (SessionState::Syncing, SessionState::Synchronized)
                    | (SessionState::Restoring, SessionState::Synchronized)
                    | (
                        SessionState::Suspended,
                        SessionState::Copied
                            | SessionState::Synchronized
                            | SessionState::Precopying
                    )
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
                    alpha
                        .store()
                        .test_bit(&standard, Bits::Session(info.slots[0]), track)
                        .unwrap(),
                    session.changed[track as usize],
                    "changed bit of {} track {}",
                    name(session.target),
                    track
                );
            }
        }
        if settled {
            // A created clone copies nothing until a precopy or its activation, and a
            // precopy may be left half done.
            if !matches!(
                session.state,
                SessionState::Created | SessionState::Precopying
            ) {
                prop_assert_eq!(info.tracks_remaining, 0, "{} settled", name(session.target));
            }
            // A synchronized BCV holds its standard's image, though its hosts cannot read
            // it.
            if session.kind == ModelKind::Mirror && session.state == SessionState::Synchronized {
                for &track in tracks {
                    let stored = stored_track(cluster, session.target, track);
                    prop_assert!(
                        holds(model.images[0][track as usize], &stored),
                        "synchronized {} track {} holds {:#04x}.., not the standard's {:02x?}",
                        name(session.target),
                        track,
                        stored[0],
                        model.images[0][track as usize]
                    );
                }
            }
        }
    }
    prop_assert_eq!(
        alpha.store().session_slots(&standard),
        slots_held,
        "slots of {} in use, and those its sessions hold",
        STANDARD
    );
    if settled {
        for volume in 0..VOLUMES {
            let in_session = model.any_session_of(volume).is_some();
            let store = cluster.node(volume).store();
            let handle = store.volume(name(volume)).unwrap();
            // A volume in no session owes no track to anybody; the standard's restores
            // have finished.
            if !in_session {
                prop_assert_eq!(
                    store.count_set(&handle, Bits::Invalid).unwrap(),
                    0,
                    "invalid tracks of {}, in no session",
                    name(volume)
                );
            }
            if volume != 0 {
                prop_assert_eq!(
                    cluster.beta.involves(name(volume)),
                    in_session,
                    "beta's registration of {}",
                    name(volume)
                );
            }
        }
    }
    Ok(())
}

/// A mirror cancel that found its BCV's node not answering (a fault met its probe) ends
/// the session at once and leaves the BCV as the attempts left it: the first attempt may
/// have given it to its hosts and stopped its tracking, or not. The model takes the BCV's
/// readiness and tracking from beta; its image is the standard's when the mirror was
/// synchronized (the copies had finished before the command), its own otherwise.
fn adopt_abandoned_bcv(cluster: &Cluster, model: &mut Model, volume: usize) {
    let store = cluster.beta.store();
    let handle = store.volume(name(volume)).unwrap();
    model.readiness[volume] = handle.readiness();
    model.tracking[volume] = store.write_marks(&handle).target_changed;
    for track in 0..TRACKS {
        model.target_changed[volume][track as usize] =
            store.test_bit(&handle, Bits::TargetChanged, track).unwrap();
    }
}

/// Lets the copier's probe deliver the releases alpha owes beta, before the next turn:
/// a delivered release ends the tracking of the BCV's hosts and forgets what they
/// changed, as a cancel that reached the BCV does.
fn deliver_owed_releases(cluster: &Cluster, model: &mut Model) {
    let mut owed = cluster.owed_releases.lock().unwrap();
    if owed.is_empty() {
        return;
    }
    cluster.probe_healed();
    let pending = cluster.alpha.owed_releases().unwrap();
    owed.retain(|(volume, id)| {
        let delivered = !pending.iter().any(|release| release.session == *id);
        if delivered {
            model.tracking[*volume] = false;
            model.target_changed[*volume].fill(false);
        }
        !delivered
    });
}

/// The BCV's target-changed bits as beta holds them (see the caller).
fn adopt_target_changed(cluster: &Cluster, model: &mut Model, volume: usize) {
    let store = cluster.beta.store();
    let handle = store.volume(name(volume)).unwrap();
    for track in 0..TRACKS {
        model.target_changed[volume][track as usize] =
            store.test_bit(&handle, Bits::TargetChanged, track).unwrap();
    }
}

/// One host write of tracks `first..=last` of a volume, all filled with `byte`: it lands
/// whole or not at all.
fn host_write(
    cluster: &Cluster,
    model: &mut Model,
    volume: usize,
    first: u64,
    last: u64,
    byte: u8,
) -> Result<(), TestCaseError> {
    let node = cluster.node(volume);
    let handle = node.store().volume(name(volume)).unwrap();
    let mut accepted = true;
    for track in first..=last {
        accepted &= model.write(volume, track, byte);
    }
    let tracks = last - first + 1;
    let data = vec![byte; (tracks * TRACK_BYTES) as usize];
    let result = cluster.host_io(|| {
        node.write(
            &handle,
            first * TRACK_BYTES,
            tracks * TRACK_BYTES,
            Some(&data),
            Durability::Logged,
        )
    });
    prop_assert_eq!(
        result.is_ok(),
        accepted,
        "write of {} tracks {}..={}: {:?}",
        name(volume),
        first,
        last,
        result
    );
    Ok(())
}

/// One operation of a case, with how the test carries out a command.
#[derive(Debug, Clone)]
struct Turn {
    operation: Operation,
    /// Whether precopies finish too when the copies finish before a command. The model
    /// gives a clone's outcome whatever its precopy did, and a precopy left half done is
    /// where a track it sent and a host rewrote must not be taken for copied at the
    /// activation.
    finish_precopies: bool,
    /// How many copy steps come between a command's failure and its retry.
    steps_before_retry: u8,
}

fn turn() -> impl Strategy<Value = Turn> {
    // Precopies are left half done three times in four.
    let finish_precopies = prop_oneof![1 => Just(true), 3 => Just(false)];
    (
        operation(TRACKS, Repertoire::Remote),
        finish_precopies,
        0u8..3,
    )
        .prop_map(|(operation, finish_precopies, steps_before_retry)| Turn {
            operation,
            finish_precopies,
            steps_before_retry,
        })
}

fn drive(cluster: &Cluster, turns: &[Turn], probe: &[u64]) -> Result<(), TestCaseError> {
    let mut model = Model::new(TRACKS);
    for turn in turns {
        deliver_owed_releases(cluster, &mut model);
        let operation = &turn.operation;
        match *operation {
            Operation::Write {
                volume,
                track,
                byte,
            } => {
                host_write(cluster, &mut model, volume, track, track, byte)?;
                check(cluster, &model, &[track], false)?;
            }
            Operation::WriteRange {
                volume,
                first,
                last,
                byte,
            } => {
                host_write(cluster, &mut model, volume, first, last, byte)?;
                check(cluster, &model, &[first, last], false)?;
            }
            Operation::Read { volume, track } => {
                let node = cluster.node(volume);
                let handle = node.store().volume(name(volume)).unwrap();
                let result =
                    cluster.host_io(|| node.read(&handle, track * TRACK_BYTES, TRACK_BYTES));
                let readable = model.readiness[volume] != Readiness::NotReady;
                prop_assert_eq!(
                    result.is_ok(),
                    readable,
                    "read {:?}: {:?}",
                    operation,
                    result.as_ref().map(|data| data[0])
                );
                if let Ok(data) = result {
                    prop_assert!(
                        holds(model.images[volume][track as usize], &data),
                        "read {:?} gave {:#04x}..",
                        operation,
                        data[0]
                    );
                }
                check(cluster, &model, &[track], false)?;
            }
            Operation::Step { session } => {
                cluster.step(session)?;
                check(cluster, &model, probe, false)?;
            }
            Operation::Probe => {
                cluster.faults(true);
                let probed = cluster.alpha.probe_targets();
                cluster.faults(false);
                prop_assert!(probed.is_ok(), "probe: {:?}", probed);
                check(cluster, &model, probe, false)?;
            }
            _ => {
                cluster.rest(turn.finish_precopies)?;
                check(cluster, &model, probe, true)?;
                // A cancel that finds the BCV's node not answering owes it a release.
                let cancelled = match operation {
                    Operation::Cancel { target } => cluster
                        .alpha
                        .show(SessionKind::Mirror, TARGETS[*target])
                        .ok()
                        .map(|info| info.id),
                    _ => None,
                };
                let forgets_failed = cluster.faults_met_by("ForgetChanges");
                let result = cluster.command(operation, turn.steps_before_retry);
                let accepted = model.command(operation);
                prop_assert_eq!(
                    result.is_ok(),
                    accepted,
                    "{:?} gave {:?}",
                    operation,
                    result
                );
                if let Some(id) = cancelled.filter(|_| accepted) {
                    let owed = cluster.alpha.owed_releases().unwrap();
                    if owed.iter().any(|release| release.session == id) {
                        let volume = target_volume(operation).expect("a cancel names its BCV");
                        adopt_abandoned_bcv(cluster, &mut model, volume);
                        cluster.owed_releases.lock().unwrap().push((volume, id));
                    }
                }
                // Forgetting the BCV's changed tracks comes after the command's commit
                // and may fail without undoing it: they stay until the next split clears
                // them, and nothing reads them before that.
                if accepted && cluster.faults_met_by("ForgetChanges") > forgets_failed {
                    // The BCVs whose hosts are not tracked: a rotation names none.
                    for volume in 1..=TARGETS.len() {
                        if !model.tracking[volume] {
                            adopt_target_changed(cluster, &mut model, volume);
                        }
                    }
                }
                // A rotation splits once its reestablish has synchronized, so it is let
                // finish; every other command leaves its copy running, for host IO and
                // copy steps to meet.
                let settled = matches!(operation, Operation::Rotate);
                if settled {
                    cluster.rest(true)?;
                }
                // Reading a track pulls it, so checking every track here would copy the
                // whole clone at once and leave nothing for host writes to race with.
                check(cluster, &model, probe, settled)?;
            }
        }
    }
    // The last turn's owed releases are delivered by the final rest's probe, as at the
    // start of a turn.
    deliver_owed_releases(cluster, &mut model);
    cluster.rest(true)?;
    let all: Vec<u64> = (0..TRACKS).collect();
    check(cluster, &model, &all, true)
}

fn run_case(
    turns: Vec<Turn>,
    probe: Vec<u64>,
    to_beta: Vec<ScheduledFault>,
    to_alpha: Vec<ScheduledFault>,
) -> Result<(), TestCaseError> {
    let cluster = Cluster::new(to_beta, to_alpha);
    drive(&cluster, &turns, &probe).map_err(|error| match error {
        TestCaseError::Fail(reason) => TestCaseError::fail(format!(
            "{}\nfaults injected:\n{}",
            reason.message(),
            cluster.fault_log()
        )),
        rejected => rejected,
    })
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
    fn remote_sessions_follow_the_seeds_rules_through_a_faulty_link(
        turns in proptest::collection::vec(turn(), 1..40),
        probe in proptest::collection::vec(0..TRACKS, 3),
        to_beta in proptest::collection::vec(scheduled_fault(), 0..16),
        to_alpha in proptest::collection::vec(scheduled_fault(), 0..4),
    ) {
        run_case(turns, probe, to_beta, to_alpha)?;
    }
}

// Deterministic cases: one lost answer placed by hand, for bugs the property found. The
// target operations they lose are chosen by the selectors below, by name, so that a change
// of the protocol only needs these functions adapted.

/// The operation that ends a session on the target's node and releases its volume.
fn releases_the_target(operation: &TargetOperation) -> bool {
    matches!(operation_name(operation).as_str(), "Unregister" | "Release")
}

/// The operation that stops a BCV tracking its hosts' writes (and clears what it
/// tracked).
fn stops_tracking(operation: &TargetOperation) -> bool {
    operation_name(operation) == "TrackChanges"
        && format!("{operation:?}").contains("tracking: false")
}

/// The operation that stores a copied track on the target.
fn stores_a_track(operation: &TargetOperation) -> bool {
    operation_name(operation) == "PutTrack"
}

/// Fills every track of the standard with `byte`.
fn fill_standard(cluster: &Cluster, byte: u8) {
    let handle = cluster.alpha.store().volume(STANDARD).unwrap();
    for track in 0..TRACKS {
        cluster
            .alpha
            .write(
                &handle,
                track * TRACK_BYTES,
                TRACK_BYTES,
                Some(&track_bytes(byte)),
                Durability::Logged,
            )
            .unwrap();
    }
}

/// A host write of one track of a volume, with the network healthy.
fn write_track(cluster: &Cluster, volume: usize, track: u64, byte: u8) {
    let node = cluster.node(volume);
    let handle = node.store().volume(name(volume)).unwrap();
    node.write(
        &handle,
        track * TRACK_BYTES,
        TRACK_BYTES,
        Some(&track_bytes(byte)),
        Durability::Logged,
    )
    .unwrap();
}

/// A volume's whole image as its node stores it.
fn stored_image(cluster: &Cluster, volume: usize) -> Vec<u8> {
    let store = cluster.node(volume).store();
    let handle = store.volume(name(volume)).unwrap();
    store.read(&handle, 0, TRACKS * TRACK_BYTES).unwrap()
}

/// The first track where two images differ.
fn first_difference(left: &[u8], right: &[u8]) -> Option<u64> {
    left.chunks(TRACK_BYTES as usize)
        .zip(right.chunks(TRACK_BYTES as usize))
        .position(|(left, right)| left != right)
        .map(|track| track as u64)
}

/// Carries out `operation`'s command on alpha (with no other fault) and retries it as
/// the control plane would.
fn command(cluster: &Cluster, operation: &Operation) -> node::Result<Option<SessionInfo>> {
    cluster.command(operation, 0)
}

/// Carries out `operation`'s command with the answer of the first target operation that
/// `selects` accepts lost, and retries it with the network healed when it fails.
fn command_losing_an_answer(
    cluster: &Cluster,
    operation: &Operation,
    selects: fn(&TargetOperation) -> bool,
) -> node::Result<Option<SessionInfo>> {
    cluster.to_beta.set_trap(Trap {
        selects,
        fault: Fault::LoseAnswer,
    });
    let outcome = cluster.command(operation, 0);
    assert!(
        cluster.to_beta.trap_sprung(),
        "{operation:?} made no target operation the selector accepts: adapt the selector"
    );
    outcome
}

#[test]
fn a_clone_cancel_whose_release_answer_was_lost_succeeds_when_retried() {
    let cluster = Cluster::new(Vec::new(), Vec::new());
    fill_standard(&cluster, 0x11);
    let clone = Operation::CloneCreate {
        target: 0,
        precopy: false,
        extent: None,
    };
    command(&cluster, &clone).unwrap();
    let cancelled = command_losing_an_answer(
        &cluster,
        &Operation::CloneCancel { target: 0 },
        releases_the_target,
    );
    assert!(
        cancelled.is_ok(),
        "the retried cancel failed: {cancelled:?}"
    );
    cluster.probe_healed();
    assert!(cluster.alpha.list(None).unwrap().is_empty());
    let standard = cluster.alpha.store().volume(STANDARD).unwrap();
    assert_eq!(cluster.alpha.store().session_slots(&standard), 0);
    assert!(!cluster.beta.involves(name(1)), "beta still holds bcv1");
    let bcv = cluster.beta.store().volume(name(1)).unwrap();
    assert_eq!(
        cluster.beta.store().count_set(&bcv, Bits::Invalid).unwrap(),
        0,
        "bcv1 keeps invalid tracks no session owes it"
    );
}

/// A split mirror whose BCV's hosts wrote track 5.
fn split_mirror_with_a_written_bcv(cluster: &Cluster) {
    fill_standard(cluster, 0x11);
    command(
        cluster,
        &Operation::Establish {
            target: 0,
            asynchronous: false,
        },
    )
    .unwrap();
    cluster.alpha.settle().unwrap();
    command(
        cluster,
        &Operation::Split {
            target: 0,
            differential: false,
        },
    )
    .unwrap();
    write_track(cluster, 1, 5, 0xb5);
}

#[test]
fn a_reestablish_whose_stop_tracking_answer_was_lost_still_copies_what_the_bcv_hosts_wrote() {
    let cluster = Cluster::new(Vec::new(), Vec::new());
    split_mirror_with_a_written_bcv(&cluster);
    let reestablished = command_losing_an_answer(
        &cluster,
        &Operation::Reestablish { target: 0 },
        stops_tracking,
    );
    assert!(reestablished.is_ok(), "{reestablished:?}");
    cluster.alpha.settle().unwrap();
    let info = cluster.alpha.show(SessionKind::Mirror, name(1)).unwrap();
    assert_eq!(info.state, SessionState::Synchronized);
    let difference = first_difference(&stored_image(&cluster, 1), &stored_image(&cluster, 0));
    assert_eq!(
        difference, None,
        "the synchronized BCV differs from the standard at this track"
    );
}

#[test]
fn an_incremental_restore_whose_stop_tracking_answer_was_lost_still_restores_what_the_bcv_hosts_wrote(
) {
    let cluster = Cluster::new(Vec::new(), Vec::new());
    split_mirror_with_a_written_bcv(&cluster);
    let restored = command_losing_an_answer(
        &cluster,
        &Operation::Restore {
            target: 0,
            incremental: true,
        },
        stops_tracking,
    );
    assert!(restored.is_ok(), "{restored:?}");
    cluster.alpha.settle().unwrap();
    let difference = first_difference(&stored_image(&cluster, 0), &stored_image(&cluster, 1));
    assert_eq!(
        difference, None,
        "the restored standard differs from the BCV at this track"
    );
}

#[test]
fn a_precopied_track_whose_answer_was_lost_reaches_the_clone_as_hosts_rewrote_it_before_activation()
{
    let cluster = Cluster::new(Vec::new(), Vec::new());
    fill_standard(&cluster, 0x11);
    command(
        &cluster,
        &Operation::CloneCreate {
            target: 0,
            precopy: true,
            extent: None,
        },
    )
    .unwrap();
    // The first precopy step stores every track on beta; the answer for one is lost, so
    // the step fails and the clone is suspended until the copier's probe.
    cluster.to_beta.set_trap(Trap {
        selects: stores_a_track,
        fault: Fault::LoseAnswer,
    });
    let id = cluster.alpha.copying()[0];
    let _ = cluster.alpha.copy_step(id);
    assert!(
        cluster.to_beta.trap_sprung(),
        "the precopy stored no track: adapt `stores_a_track`"
    );
    cluster.probe_healed();
    // Hosts rewrite every track of the standard before the point in time, the lost one
    // among them.
    fill_standard(&cluster, 0x22);
    command(&cluster, &Operation::CloneActivate { target: 0 }).unwrap();
    cluster.alpha.settle().unwrap();
    let info = cluster.alpha.show(SessionKind::Clone, name(1)).unwrap();
    assert_eq!(info.state, SessionState::Copied);
    let difference = first_difference(&stored_image(&cluster, 1), &stored_image(&cluster, 0));
    assert_eq!(
        difference, None,
        "the clone differs from the standard at its point in time at this track"
    );
}

#[test]
fn a_new_session_into_a_remote_volume_another_session_of_this_node_holds_is_refused() {
    let cluster = Cluster::new(Vec::new(), Vec::new());
    fill_standard(&cluster, 0x11);
    let clone = Operation::CloneCreate {
        target: 0,
        precopy: false,
        extent: None,
    };
    let mirror = Operation::Establish {
        target: 1,
        asynchronous: false,
    };
    command(&cluster, &clone).unwrap();
    command(&cluster, &mirror).unwrap();
    cluster.alpha.settle().unwrap();
    // Each target is taken: a second session into it must be refused, as it is when the
    // target is on alpha, and not take the volume's registration on beta from the first.
    let second_sessions = [
        clone.clone(),
        Operation::Establish {
            target: 0,
            asynchronous: false,
        },
        Operation::CloneCreate {
            target: 1,
            precopy: false,
            extent: None,
        },
    ];
    for operation in second_sessions {
        let outcome = command(&cluster, &operation);
        assert!(
            outcome.is_err(),
            "{operation:?} was accepted into a volume another session holds: {outcome:?}"
        );
    }
    assert_eq!(cluster.alpha.list(None).unwrap().len(), 2);
    // The first sessions still own their targets on beta.
    command(&cluster, &Operation::CloneCancel { target: 0 }).unwrap();
    command(&cluster, &Operation::Cancel { target: 1 }).unwrap();
    assert!(!cluster.beta.involves(name(1)) && !cluster.beta.involves(name(2)));
}

fn makes_ready(operation: &TargetOperation) -> bool {
    matches!(
        operation,
        TargetOperation::SetReadiness {
            readiness: Readiness::Ready,
            ..
        }
    )
}

#[test]
fn a_destination_readied_by_an_activation_whose_answer_was_lost_gives_hosts_nothing_older_than_the_instant(
) {
    let cluster = Cluster::new(Vec::new(), Vec::new());
    fill_standard(&cluster, 0x11);
    command(
        &cluster,
        &Operation::CloneCreate {
            target: 0,
            precopy: false,
            extent: None,
        },
    )
    .unwrap();
    // Beta makes the destination ready, alpha does not hear it and does not commit the
    // activation: the destination is ready before the point in time.
    let activate = Operation::CloneActivate { target: 0 };
    cluster.to_beta.set_trap(Trap {
        selects: makes_ready,
        fault: Fault::LoseAnswer,
    });
    assert!(cluster
        .alpha
        .command_with(to_command(&activate), Some(on_beta(1)))
        .is_err());
    assert!(cluster.to_beta.trap_sprung(), "adapt `makes_ready`");
    // A host of the destination reads a track the clone has not copied: there is no
    // point-in-time image to pull yet, so the read fails rather than give today's.
    let destination = cluster.beta.store().volume(name(1)).unwrap();
    let read = cluster
        .beta
        .read(&destination, 3 * TRACK_BYTES, TRACK_BYTES);
    assert!(
        read.is_err(),
        "a pull before the activation gave a track of {:?}",
        read.map(|data| data[0])
    );
    // The standard is rewritten, then the activation is retried: that is the instant.
    fill_standard(&cluster, 0x22);
    command(&cluster, &activate).unwrap();
    cluster.alpha.settle().unwrap();
    let difference = first_difference(&stored_image(&cluster, 1), &stored_image(&cluster, 0));
    assert_eq!(
        difference, None,
        "the clone differs from the standard at this track"
    );
}
