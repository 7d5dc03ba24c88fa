//! The catalog state machine: sites, nodes and volumes, changed only by applying
//! committed commands in log order.
//!
//! It is pure: no IO, no clock, no randomness. Every replica that applies the same
//! commands in the same order holds the same catalog, which is what lets Raft replicate
//! it. A command is validated against the whole catalog before anything changes, so a
//! refused command leaves the catalog exactly as it was.

use protocol::cluster::{
    derived_request_id, CatalogError, CatalogReply, CatalogRequest, CatalogResponse, Command,
    Health, Intent, IntentCall, IntentResult, NodeRecord, NodeReport, RequestId, SessionEntry,
    VolumeRecord, VolumeState,
};
use protocol::gsnap::{GsnapJob, GsnapStep, JobId, JobSend, JobState, Lineage, VerifyRound};
use protocol::messages::{Extent, Readiness, VOLUME_NAME_BYTES_MAX};
use protocol::session::{next_state, SessionCommand, SessionKind, SessionState, Transition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How many applied request ids the catalog remembers for deduplication. A client that
/// retries after this many newer requests were applied could see its request applied
/// twice; at a thousand commands a second that is 16 seconds, beyond the CLI's 15 s of
/// retrying. The bound also keeps snapshots (the whole catalog, one encoded value under
/// the codec's 16 MiB limit) small: a few MiB of remembered answers at most.
pub const APPLIED_REQUESTS_REMEMBERED_MAX: usize = 16_384;

/// The longest node or site name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    nodes: BTreeMap<String, NodeRecord>,
    volumes: BTreeMap<String, VolumeRecord>,
    /// Copy sessions by target volume (a volume is the target of one session at most).
    sessions: BTreeMap<String, SessionEntry>,
    /// Responses of the most recent requests, so a retried request gets the first answer.
    applied: BTreeMap<RequestId, CatalogResponse>,
    /// The same request ids in the order they were applied, oldest first, for eviction.
    applied_order: VecDeque<RequestId>,
    /// Steps of the leader's work recorded before their node is called and not finished
    /// yet, by id (the saga: intent, node call, result, reconciliation).
    intents: BTreeMap<RequestId, Intent>,
    /// Gsnap jobs by id, running and ended.
    jobs: BTreeMap<JobId, GsnapJob>,
    /// The id of the last job recorded.
    last_job: JobId,
    /// The verification rounds of each job that has run one (snapshot layout 3).
    verifications: BTreeMap<JobId, Vec<VerifyRound>>,
    /// What each job sends, once its nodes rotated their lineages (snapshot layout 4).
    sends: BTreeMap<JobId, JobSend>,
    /// The lineage of each P and S whose last job succeeded, by (P, S) (layout 4).
    lineages: BTreeMap<(String, String), Lineage>,
}

/// The catalog as snapshots of layout version 3 hold it, before sends and lineages.
/// Read only, to load such a snapshot.
#[derive(Debug, Deserialize)]
pub struct CatalogWithoutLineages {
    nodes: BTreeMap<String, NodeRecord>,
    volumes: BTreeMap<String, VolumeRecord>,
    sessions: BTreeMap<String, SessionEntry>,
    applied: BTreeMap<RequestId, CatalogResponse>,
    applied_order: VecDeque<RequestId>,
    intents: BTreeMap<RequestId, Intent>,
    jobs: BTreeMap<JobId, GsnapJob>,
    last_job: JobId,
    verifications: BTreeMap<JobId, Vec<VerifyRound>>,
}

impl From<CatalogWithoutLineages> for Catalog {
    fn from(old: CatalogWithoutLineages) -> Catalog {
        Catalog {
            nodes: old.nodes,
            volumes: old.volumes,
            sessions: old.sessions,
            applied: old.applied,
            applied_order: old.applied_order,
            intents: old.intents,
            jobs: old.jobs,
            last_job: old.last_job,
            verifications: old.verifications,
            sends: BTreeMap::new(),
            lineages: BTreeMap::new(),
        }
    }
}

/// The catalog as snapshots of layout version 2 hold it, before verification rounds.
/// Read only, to load such a snapshot.
#[derive(Debug, Deserialize)]
pub struct CatalogWithoutVerifications {
    nodes: BTreeMap<String, NodeRecord>,
    volumes: BTreeMap<String, VolumeRecord>,
    sessions: BTreeMap<String, SessionEntry>,
    applied: BTreeMap<RequestId, CatalogResponse>,
    applied_order: VecDeque<RequestId>,
    intents: BTreeMap<RequestId, Intent>,
    jobs: BTreeMap<JobId, GsnapJob>,
    last_job: JobId,
}

impl From<CatalogWithoutVerifications> for Catalog {
    fn from(old: CatalogWithoutVerifications) -> Catalog {
        Catalog {
            nodes: old.nodes,
            volumes: old.volumes,
            sessions: old.sessions,
            applied: old.applied,
            applied_order: old.applied_order,
            intents: old.intents,
            jobs: old.jobs,
            last_job: old.last_job,
            verifications: BTreeMap::new(),
            sends: BTreeMap::new(),
            lineages: BTreeMap::new(),
        }
    }
}

/// The catalog as snapshots of layout version 1 hold it, before intents. Read only, to
/// load such a snapshot.
#[derive(Debug, Deserialize)]
pub struct CatalogWithoutIntents {
    nodes: BTreeMap<String, NodeRecord>,
    volumes: BTreeMap<String, VolumeRecord>,
    sessions: BTreeMap<String, SessionEntry>,
    applied: BTreeMap<RequestId, CatalogResponse>,
    applied_order: VecDeque<RequestId>,
}

impl From<CatalogWithoutIntents> for Catalog {
    fn from(old: CatalogWithoutIntents) -> Catalog {
        Catalog {
            nodes: old.nodes,
            volumes: old.volumes,
            sessions: old.sessions,
            applied: old.applied,
            applied_order: old.applied_order,
            intents: BTreeMap::new(),
            jobs: BTreeMap::new(),
            last_job: 0,
            verifications: BTreeMap::new(),
            sends: BTreeMap::new(),
            lineages: BTreeMap::new(),
        }
    }
}

impl Catalog {
    /// The sites of the registered nodes. A site exists by having a node: it is derived,
    /// never stored, so it cannot disagree with the nodes.
    pub fn sites(&self) -> BTreeSet<String> {
        self.nodes.values().map(|node| node.site.clone()).collect()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    pub fn volumes(&self) -> impl Iterator<Item = &VolumeRecord> {
        self.volumes.values()
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.get(name)
    }

    pub fn sessions(&self) -> impl Iterator<Item = &SessionEntry> {
        self.sessions.values()
    }

    /// The session whose target is `target`.
    pub fn session(&self, target: &str) -> Option<&SessionEntry> {
        self.sessions.get(target)
    }

    /// A session `volume` takes part in, as source or target.
    fn session_of_volume(&self, volume: &str) -> Option<&SessionEntry> {
        self.sessions
            .values()
            .find(|entry| entry.source == volume || entry.target == volume)
    }

    fn session_record(&mut self, entry: &SessionEntry) -> CatalogResponse {
        for volume in [&entry.source, &entry.target] {
            self.ready_volume(volume, "used by a copy session")?;
        }
        if let Some(existing) = self.sessions.get(&entry.target) {
            if existing.source != entry.source || existing.kind != entry.kind {
                return Err(CatalogError::SessionTargetTaken {
                    kind: existing.kind,
                    source_volume: existing.source.clone(),
                    target: existing.target.clone(),
                });
            }
            if !session_state_reachable(entry.kind, existing.state, entry.state) {
                return Err(CatalogError::SessionTransition {
                    kind: entry.kind,
                    target: entry.target.clone(),
                    from: existing.state,
                    to: entry.state,
                });
            }
        }
        // The readiness column follows what the session set on the target's node: a
        // clone's destination is taken from its hosts until activated, a BCV while it is
        // a mirror (attached, synchronized or restoring) rather than a split copy.
        // A suspended session keeps the readiness it had: the target's node is not asked
        // while it does not answer, and the session resumes in the state it left.
        let readiness = match (entry.kind, entry.state) {
            (_, SessionState::Suspended) => None,
            (SessionKind::Clone, SessionState::Created | SessionState::Precopying) => {
                Some(Readiness::NotReady)
            }
            (SessionKind::Clone, _) | (SessionKind::Mirror, SessionState::Split) => {
                Some(Readiness::Ready)
            }
            (SessionKind::Mirror, _) => Some(Readiness::NotReady),
        };
        if let (Some(target), Some(readiness)) = (self.volumes.get_mut(&entry.target), readiness) {
            target.readiness = readiness;
        }
        self.sessions.insert(entry.target.clone(), entry.clone());
        Ok(CatalogReply::Done)
    }

    /// The session of `target` ended without its target's node saying what readiness
    /// it left: a cancelled synchronized mirror gives its BCV, the standard's whole
    /// image, to its hosts; other ends leave the readiness as it was.
    fn session_forget(&mut self, target: &str) {
        let ended = self.sessions.remove(target);
        if ended.is_some_and(|ended| ended.state == SessionState::Synchronized) {
            if let Some(volume) = self.volumes.get_mut(target) {
                volume.readiness = Readiness::Ready;
            }
        }
    }

    /// The session of `target` ended, and its target's node reports this readiness.
    fn session_ended(&mut self, target: &str, readiness: Readiness) {
        self.sessions.remove(target);
        if let Some(volume) = self.volumes.get_mut(target) {
            volume.readiness = readiness;
        }
    }

    /// The intents not finished yet, oldest id first.
    pub fn intents(&self) -> impl Iterator<Item = &Intent> {
        self.intents.values()
    }

    pub fn intent(&self, id: RequestId) -> Option<&Intent> {
        self.intents.get(&id)
    }

    /// Gsnap jobs, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = &GsnapJob> {
        self.jobs.values()
    }

    pub fn job(&self, id: JobId) -> Option<&GsnapJob> {
        self.jobs.get(&id)
    }

    /// The verification rounds of job `id`, first round first (none before it verified).
    pub fn verification(&self, id: JobId) -> &[VerifyRound] {
        self.verifications.get(&id).map_or(&[], Vec::as_slice)
    }

    /// What job `id` sends, once recorded.
    pub fn send(&self, id: JobId) -> Option<&JobSend> {
        self.sends.get(&id)
    }

    /// The lineage of P and S, if their last job succeeded and it was not forgotten.
    pub fn lineage(&self, source: &str, target: &str) -> Option<&Lineage> {
        self.lineages.get(&(source.to_string(), target.to_string()))
    }

    pub fn lineages(&self) -> impl Iterator<Item = &Lineage> {
        self.lineages.values()
    }

    /// The lineages that track `volume`'s hosts' writes (as their P, or as the volume
    /// their pair copies into). A volume may be in several: P of one and S of another.
    pub fn lineages_of_volume<'a>(&'a self, volume: &'a str) -> impl Iterator<Item = &'a Lineage> {
        self.lineages
            .values()
            .filter(move |lineage| lineage.source == volume || lineage.tracked() == volume)
    }

    /// Refuses a change of `volume`'s data other than its hosts' writes while a lineage
    /// tracks it: the next incremental job would miss it.
    pub fn refuse_lineage_change(&self, volume: &str) -> Result<(), CatalogError> {
        self.refuse_lineage_change_except(volume, None)
    }

    /// [`Catalog::refuse_lineage_change`], but a job of the lineage `except` (its P and
    /// S) may change it: its own copy is what that lineage follows.
    pub fn refuse_lineage_change_except(
        &self,
        volume: &str,
        except: Option<(&str, &str)>,
    ) -> Result<(), CatalogError> {
        match self.lineages_of_volume(volume).find(|lineage| {
            except
                .is_none_or(|(source, target)| lineage.source != source || lineage.target != target)
        }) {
            Some(lineage) => Err(CatalogError::VolumeInLineage {
                volume: volume.to_string(),
                source_volume: lineage.source.clone(),
                target: lineage.target.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The running job `volume` takes part in, if any.
    pub fn job_of_volume(&self, volume: &str) -> Option<&GsnapJob> {
        self.jobs.values().find(|job| {
            !job.state.is_final()
                && [
                    Some(job.spec.source.as_str()),
                    Some(job.spec.intermediate.as_str()),
                    Some(job.spec.target.as_str()),
                    job.spec.target_intermediate.as_deref(),
                ]
                .contains(&Some(volume))
        })
    }

    /// The result intent `id` finished with, while the catalog remembers the answer to
    /// its finish (committed under `derived_request_id(id, "finish")`).
    pub fn intent_result(&self, id: RequestId) -> Option<&IntentResult> {
        match self.applied_response(derived_request_id(id, "finish")) {
            Some(Ok(CatalogReply::IntentFinished(result))) => Some(result),
            _ => None,
        }
    }

    /// The open intent working on `volume`, if any.
    pub fn intent_of_volume(&self, volume: &str) -> Option<&Intent> {
        self.intents
            .values()
            .find(|intent| intent.call.owner() == volume)
    }

    /// A volume that exists and is ready, or the refusal to use it for `action`.
    fn ready_volume(&self, name: &str, action: &str) -> Result<&VolumeRecord, CatalogError> {
        let volume = self
            .volumes
            .get(name)
            .ok_or_else(|| CatalogError::UnknownVolume {
                volume: name.to_string(),
            })?;
        if volume.state != VolumeState::Ready {
            return Err(illegal(volume, action));
        }
        Ok(volume)
    }

    /// Whether the catalog has `node` up.
    pub fn node_is_up(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|record| record.health == Health::Up)
    }

    /// Refuses a change of a volume an open intent works on or reads (a snap's target or
    /// source): its node is being asked about it.
    fn refuse_intent_on(&self, volume: &str) -> Result<(), CatalogError> {
        let touching = self.intents.values().find(|intent| match &intent.call {
            IntentCall::Snap { source, target, .. }
            | IntentCall::SnapAt { source, target, .. }
            | IntentCall::SnapLineage { source, target, .. } => {
                source == volume || target == volume
            }
            IntentCall::Session { command } => {
                command.session_key() == volume
                    || matches!(command,
                        SessionCommand::CloneCreate { source, .. }
                        | SessionCommand::MirrorEstablish { standard: source, .. }
                        if source == volume)
            }
            IntentCall::VolumeCreate { name, .. } | IntentCall::VolumeDelete { name } => {
                name == volume
            }
        });
        match touching {
            Some(intent) => Err(CatalogError::IntentUnderWay {
                volume: volume.to_string(),
                call: intent.call.name().to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The answer a request id already got, if it was applied and is still remembered.
    pub fn applied_response(&self, request_id: RequestId) -> Option<&CatalogResponse> {
        self.applied.get(&request_id)
    }

    /// Applies one committed request. A request id seen before returns the first answer
    /// and changes nothing.
    pub fn apply(&mut self, request: &CatalogRequest) -> CatalogResponse {
        if let Some(response) = self.applied.get(&request.request_id) {
            return response.clone();
        }
        let response = self.apply_command(&request.command);
        self.remember(request.request_id, response.clone());
        response
    }

    fn remember(&mut self, request_id: RequestId, response: CatalogResponse) {
        if self.applied_order.len() == APPLIED_REQUESTS_REMEMBERED_MAX {
            if let Some(oldest) = self.applied_order.pop_front() {
                self.applied.remove(&oldest);
            }
        }
        self.applied_order.push_back(request_id);
        self.applied.insert(request_id, response);
    }

    fn apply_command(&mut self, command: &Command) -> CatalogResponse {
        match command {
            Command::Noop => Ok(CatalogReply::Done),
            Command::RegisterNode(report) => self.register_node(report),
            Command::SetNodeHealth { node, health } => {
                let record = self
                    .nodes
                    .get_mut(node)
                    .ok_or(CatalogError::UnknownNode { node: node.clone() })?;
                record.health = *health;
                if *health == Health::Up {
                    record.down_since_unix_seconds = None;
                }
                Ok(CatalogReply::Node(record.clone()))
            }
            Command::NodeDown {
                node,
                since_unix_seconds,
            } => {
                let record = self
                    .nodes
                    .get_mut(node)
                    .ok_or(CatalogError::UnknownNode { node: node.clone() })?;
                // A node already down keeps the time it went down.
                if record.health == Health::Up || record.down_since_unix_seconds.is_none() {
                    record.down_since_unix_seconds = Some(*since_unix_seconds);
                }
                record.health = Health::Down;
                Ok(CatalogReply::Node(record.clone()))
            }
            Command::VolumeCreateBegin {
                name,
                node,
                size_bytes,
                track_size_bytes,
            } => self.volume_create_begin(name, node, *size_bytes, *track_size_bytes),
            Command::VolumeCreateFinish { name } => {
                // An open intent owns its volume: only its finish changes it.
                self.refuse_intent_on(name)?;
                let volume = self.volume_mut(name)?;
                match volume.state {
                    // Finishing twice is harmless: the CLI path and the reconciler may race.
                    VolumeState::Creating | VolumeState::Ready => {
                        volume.state = VolumeState::Ready;
                        Ok(CatalogReply::Volume(volume.clone()))
                    }
                    VolumeState::Deleting => Err(illegal(volume, "finished creating")),
                }
            }
            Command::VolumeCreateRollback { name, .. } => {
                self.refuse_intent_on(name)?;
                let volume = self.volume_mut(name)?;
                if volume.state != VolumeState::Creating {
                    return Err(illegal(volume, "rolled back"));
                }
                self.volumes.remove(name);
                Ok(CatalogReply::Done)
            }
            Command::SessionRecord(entry) => self.session_record(entry),
            Command::SessionForget { target } => {
                self.session_forget(target);
                Ok(CatalogReply::Done)
            }
            Command::VolumeDeleteBegin { name } => {
                self.refuse_intent_on(name)?;
                self.volume_delete_begin(name)
            }
            Command::VolumeDeleteFinish { name } => {
                self.refuse_intent_on(name)?;
                let volume = self.volume_mut(name)?;
                if volume.state != VolumeState::Deleting {
                    return Err(illegal(volume, "removed without a delete"));
                }
                self.volumes.remove(name);
                Ok(CatalogReply::Done)
            }
            Command::VolumeSetReadiness { name, readiness } => {
                self.check_readiness(name)?;
                let volume = self.volume_mut(name)?;
                volume.readiness = *readiness;
                Ok(CatalogReply::Volume(volume.clone()))
            }
            Command::SessionEnded {
                target,
                target_readiness,
            } => {
                self.session_ended(target, *target_readiness);
                Ok(CatalogReply::Done)
            }
            Command::IntentBegin(intent) => self.intent_begin(intent),
            Command::IntentFinish { id, result } => self.intent_finish(*id, result),
            Command::GsnapCreate(job) => self.gsnap_create(job),
            Command::GsnapRecord(job) => self.gsnap_record(job),
            Command::GsnapVerified { job, round } => self.gsnap_verified(*job, round),
            Command::GsnapCancel { job } => self.gsnap_cancel(*job),
            Command::GsnapSend { job, send } => self.gsnap_send(*job, send),
            Command::GsnapForget { source, target } => {
                let key = (source.clone(), target.clone());
                if !self.lineages.contains_key(&key) {
                    return Err(CatalogError::UnknownLineage {
                        source_volume: source.clone(),
                        target: target.clone(),
                    });
                }
                if let Some(job) = self.job_of_volume(source) {
                    return Err(CatalogError::VolumeInJob {
                        volume: source.clone(),
                        job: job.id,
                    });
                }
                self.lineages.remove(&key);
                Ok(CatalogReply::Done)
            }
        }
    }

    /// Records an intent after checking it against the whole catalog: what its node will
    /// be asked must be legal now, and nothing else may be under way on its volume.
    fn intent_begin(&mut self, intent: &Intent) -> CatalogResponse {
        if self.intents.contains_key(&intent.id) {
            return Ok(CatalogReply::Done);
        }
        let owner = intent.call.owner();
        if let Some(other) = self.intent_of_volume(owner) {
            return Err(CatalogError::IntentUnderWay {
                volume: owner.to_string(),
                call: other.call.name().to_string(),
            });
        }
        match &intent.call {
            IntentCall::Snap {
                source,
                target,
                create,
                ..
            }
            | IntentCall::SnapAt {
                source,
                target,
                create,
                ..
            }
            | IntentCall::SnapLineage {
                source,
                target,
                create,
                ..
            } => {
                let source_record = self.ready_volume(source, "snapped")?;
                if source_record.node != intent.node {
                    return Err(CatalogError::Invalid {
                        what: "snap".into(),
                        detail: format!(
                            "'{source}' is on node '{}', not '{}'",
                            source_record.node, intent.node
                        ),
                    });
                }
                match create {
                    // Validated and recorded as a volume create is; the node makes the
                    // target in the snap's own write.
                    Some(new) => {
                        self.volume_create_begin(
                            target,
                            &intent.node,
                            new.size_bytes,
                            new.track_size_bytes,
                        )?;
                    }
                    None => {
                        // A running job snaps its S' onto its S: the lineage of its own
                        // P and S follows that; any other must not see S change.
                        let own_job = self
                            .job_of_volume(target)
                            .filter(|job| {
                                job.spec.target == *target
                                    && job.spec.target_intermediate.as_deref()
                                        == Some(source.as_str())
                            })
                            .map(|job| (job.spec.source.as_str(), target.as_str()));
                        self.refuse_lineage_change_except(target, own_job)?;
                        let target_record = self.ready_volume(target, "a snap target")?;
                        if target_record.node != intent.node {
                            return Err(CatalogError::Invalid {
                                what: "snap".into(),
                                detail: format!(
                                    "a snap works within one node: '{source}' is on '{}' but '{target}' is on '{}'",
                                    intent.node, target_record.node
                                ),
                            });
                        }
                        if let Some(entry) = self.session_of_volume(target) {
                            return Err(CatalogError::VolumeInSession {
                                volume: target.clone(),
                                kind: entry.kind,
                                source_volume: entry.source.clone(),
                                target: entry.target.clone(),
                            });
                        }
                    }
                }
            }
            // The leader checked the command against the catalog and its sessions
            // before it began the intent; the node checks it against its own state.
            IntentCall::Session { command } => {
                for volume in [Some(command.session_key()), command.target()]
                    .into_iter()
                    .flatten()
                {
                    self.ready_volume(volume, "used by a copy session")?;
                }
            }
            IntentCall::VolumeCreate {
                name,
                size_bytes,
                track_size_bytes,
            } => {
                let adopted = self.volumes.get(name).is_some_and(|volume| {
                    volume.state == VolumeState::Creating
                        && volume.node == intent.node
                        && volume.size_bytes == *size_bytes
                        && volume.track_size_bytes == *track_size_bytes
                });
                // A volume left `creating` by a leader from before volume intents is
                // taken over by one (the supervisor begins it); any other name in use
                // is refused.
                if !adopted {
                    self.volume_create_begin(name, &intent.node, *size_bytes, *track_size_bytes)?;
                }
            }
            IntentCall::VolumeDelete { name } => {
                let node = self.volume(name).map(|volume| volume.node.clone());
                if node.as_deref().is_some_and(|node| node != intent.node) {
                    return Err(CatalogError::Invalid {
                        what: "volume delete".into(),
                        detail: format!(
                            "'{name}' is on node '{}', not '{}'",
                            node.unwrap_or_default(),
                            intent.node
                        ),
                    });
                }
                self.volume_delete_begin(name)?;
            }
        }
        self.intents.insert(intent.id, intent.clone());
        Ok(CatalogReply::Done)
    }

    /// Records a new gsnap job after checking it against the whole catalog: its volumes
    /// exist where the job says, ready, with one track size; its extents fit and pair;
    /// none of its volumes is in a session or another running job; its nodes are up.
    fn gsnap_create(&mut self, job: &GsnapJob) -> CatalogResponse {
        let spec = &job.spec;
        let invalid = |detail: String| CatalogError::Invalid {
            what: "gsnap".into(),
            detail,
        };
        let mut names = vec![&spec.source, &spec.intermediate, &spec.target];
        names.extend(spec.target_intermediate.as_ref());
        let mut distinct = names.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() != names.len() {
            return Err(invalid(
                "P, P', S and S' must be four different volumes".into(),
            ));
        }
        for node in [&job.source_node, &job.target_node] {
            match self.nodes.get(node) {
                None => return Err(CatalogError::UnknownNode { node: node.clone() }),
                Some(record) if record.health == Health::Down => {
                    return Err(CatalogError::NodeDown { node: node.clone() })
                }
                Some(_) => {}
            }
        }
        let mut placed = vec![
            (&spec.source, &job.source_node, true),
            (&spec.intermediate, &job.source_node, false),
            (&spec.target, &job.target_node, true),
        ];
        if let Some(target_intermediate) = &spec.target_intermediate {
            // Made by the job when missing.
            validate_name("volume name", target_intermediate, VOLUME_NAME_BYTES_MAX)?;
            placed.push((target_intermediate, &job.target_node, false));
        }
        let source = self.ready_volume(&spec.source, "gsnapped")?.clone();
        for (volume, node, required) in placed {
            let record = match self.volumes.get(volume) {
                None if !required => continue,
                _ => self.ready_volume(volume, "used by a gsnap")?,
            };
            if record.node != *node {
                return Err(invalid(format!(
                    "'{volume}' is on node '{}'; the job needs it on '{node}'",
                    record.node
                )));
            }
            if record.track_size_bytes != source.track_size_bytes {
                return Err(invalid(format!(
                    "'{volume}' has tracks of {} bytes and '{}' of {}: a gsnap needs one track size",
                    record.track_size_bytes, spec.source, source.track_size_bytes
                )));
            }
            if let Some(entry) = self.session_of_volume(volume) {
                return Err(CatalogError::VolumeInSession {
                    volume: volume.clone(),
                    kind: entry.kind,
                    source_volume: entry.source.clone(),
                    target: entry.target.clone(),
                });
            }
            if let Some(other) = self.job_of_volume(volume) {
                return Err(CatalogError::VolumeInJob {
                    volume: volume.clone(),
                    job: other.id,
                });
            }
        }
        // The volumes the job writes (the pair's target, and S when S' takes the pair)
        // may be tracked by no other lineage than this job's own.
        for written in [job.pair_target(), spec.target.as_str()] {
            self.refuse_lineage_change_except(written, Some((&spec.source, &spec.target)))?;
        }
        protocol::gsnap::check_extents(&spec.source_extents, &spec.target_extents)
            .map_err(invalid)?;
        let target = &self.volumes[&spec.target];
        let tracks_of =
            |record: &VolumeRecord| record.size_bytes / u64::from(record.track_size_bytes);
        // P's extents within P; S's within S (without them, P's tracks land on the same
        // track numbers of S).
        let target_extents = if spec.target_extents.is_empty() {
            &spec.source_extents
        } else {
            &spec.target_extents
        };
        for (volume, record, extents) in [
            (&spec.source, &source, &spec.source_extents),
            (&spec.target, target, target_extents),
        ] {
            let tracks = tracks_of(record);
            if let Some(extent) = extents.iter().find(|extent| extent.last >= tracks) {
                return Err(invalid(format!(
                    "extent {extent} does not fit '{volume}', which has tracks 0-{}",
                    tracks.saturating_sub(1)
                )));
            }
        }
        let source_tracks = if spec.source_extents.is_empty() {
            tracks_of(&source)
        } else {
            spec.source_extents.iter().map(Extent::track_count).sum()
        };
        if !spec.target_extents.is_empty() {
            let target_tracks: u64 = spec.target_extents.iter().map(Extent::track_count).sum();
            if target_tracks != source_tracks {
                return Err(invalid(format!(
                    "'{}' has {source_tracks} tracks to copy and the target's extents hold {target_tracks}: they must hold the same number",
                    spec.source
                )));
            }
        } else if spec.source_extents.is_empty() && target.size_bytes < source.size_bytes {
            return Err(invalid(format!(
                "'{}' is smaller than '{}': name the extents to copy, or a larger target",
                spec.target, spec.source
            )));
        }
        self.last_job += 1;
        let mut recorded = job.clone();
        recorded.id = self.last_job;
        self.jobs.insert(recorded.id, recorded.clone());
        Ok(CatalogReply::Job(Box::new(recorded)))
    }

    /// Replaces the record of a running job with its next state.
    fn gsnap_record(&mut self, job: &GsnapJob) -> CatalogResponse {
        let existing = self
            .jobs
            .get(&job.id)
            .ok_or(CatalogError::UnknownJob { job: job.id })?;
        if existing.state.is_final() {
            return Err(CatalogError::JobEnded { job: job.id });
        }
        if existing.spec != job.spec || existing.request_id != job.request_id {
            return Err(CatalogError::Invalid {
                what: "gsnap".into(),
                detail: format!("job {}'s record names other volumes", job.id),
            });
        }
        // A cancel, once asked for, stays asked for: the driver records its next state
        // from a copy it read before the cancel was committed. That copy may start the
        // activation the cancel was judged to come before: refused, the driver plans
        // again and ends what the job started instead.
        let activation_started =
            |job: &GsnapJob| job.step(GsnapStep::Activate).started_unix_seconds.is_some();
        if existing.cancel_requested && !activation_started(existing) && activation_started(job) {
            return Err(CatalogError::CancelRefused {
                job: job.id,
                reason: format!("job {} was cancelled before its activation", job.id),
            });
        }
        let mut recorded = job.clone();
        recorded.cancel_requested |= existing.cancel_requested;
        // A job that rotated the lineages (its send is recorded) leaves the lineage of
        // its P and S behind when it succeeds. One that did not succeed leaves the
        // lineage as the last succeeded job left it when it is one the lineage tracks
        // (its nodes folded their frozen tracks back in), and none otherwise (its nodes
        // dropped theirs before the end was recorded, so the next job sends everything).
        let key = (job.spec.source.clone(), job.spec.target.clone());
        if recorded.state.is_final() && !existing.state.is_final() {
            if recorded.state == JobState::Succeeded && self.sends.contains_key(&job.id) {
                self.lineages.insert(
                    key,
                    Lineage {
                        source: job.spec.source.clone(),
                        target: job.spec.target.clone(),
                        intermediate: job.spec.intermediate.clone(),
                        target_intermediate: job.spec.target_intermediate.clone(),
                        source_extents: job.spec.source_extents.clone(),
                        target_extents: job.spec.target_extents.clone(),
                        source_node: job.source_node.clone(),
                        target_node: job.target_node.clone(),
                        last_job: job.id,
                        since_unix_seconds: recorded
                            .finished_unix_seconds
                            .unwrap_or(recorded.created_unix_seconds),
                    },
                );
            } else if recorded.state != JobState::Succeeded
                && crate::gsnap::touches_lineage(&recorded)
                && !crate::gsnap::keeps_lineage(&recorded, self)
            {
                self.lineages.remove(&key);
            }
        }
        self.jobs.insert(job.id, recorded.clone());
        Ok(CatalogReply::Job(Box::new(recorded)))
    }

    /// Records what a running job sends. Recorded once: a retry changes nothing.
    fn gsnap_send(&mut self, id: JobId, send: &JobSend) -> CatalogResponse {
        let job = self
            .jobs
            .get(&id)
            .ok_or(CatalogError::UnknownJob { job: id })?;
        if job.state.is_final() {
            return Err(CatalogError::JobEnded { job: id });
        }
        self.sends.entry(id).or_insert_with(|| send.clone());
        Ok(CatalogReply::Done)
    }

    /// Asks a running job to stop, judged against its record now: refused once its
    /// activation began (the target already takes the image). Only the request is
    /// recorded; asking again answers the job as it is.
    fn gsnap_cancel(&mut self, id: JobId) -> CatalogResponse {
        let job = self
            .jobs
            .get_mut(&id)
            .ok_or(CatalogError::UnknownJob { job: id })?;
        if !job.cancel_requested {
            if let Some(reason) = crate::gsnap::refuse_cancel(job) {
                return Err(CatalogError::CancelRefused { job: id, reason });
            }
            job.cancel_requested = true;
        }
        Ok(CatalogReply::Job(Box::new(job.clone())))
    }

    /// Records a verification round of a running job. A round already recorded (a retry
    /// of the same round) changes nothing; rounds are recorded in order.
    fn gsnap_verified(&mut self, id: JobId, round: &VerifyRound) -> CatalogResponse {
        let job = self
            .jobs
            .get(&id)
            .ok_or(CatalogError::UnknownJob { job: id })?;
        if job.state.is_final() {
            return Err(CatalogError::JobEnded { job: id });
        }
        let rounds = self.verifications.entry(id).or_default();
        let next = rounds.len() as u32 + 1;
        if round.round < next {
            return Ok(CatalogReply::Done);
        }
        if round.round > next {
            return Err(CatalogError::Invalid {
                what: "gsnap".into(),
                detail: format!(
                    "job {id}'s verification round {} comes before round {next}",
                    round.round
                ),
            });
        }
        rounds.push(round.clone());
        Ok(CatalogReply::Done)
    }

    /// Ends an intent with its node's answer: a snap's created target becomes ready, or
    /// goes again when the node refused (which changed nothing there).
    fn intent_finish(&mut self, id: RequestId, result: &IntentResult) -> CatalogResponse {
        let Some(intent) = self.intents.remove(&id) else {
            return Ok(CatalogReply::Done);
        };
        match (&intent.call, result) {
            (
                IntentCall::Snap { target, .. }
                | IntentCall::SnapAt { target, .. }
                | IntentCall::SnapLineage { target, .. },
                IntentResult::Snapped { .. },
            ) => {
                if let Some(volume) = self.volumes.get_mut(target) {
                    volume.state = VolumeState::Ready;
                }
            }
            (
                IntentCall::Snap {
                    target,
                    create: Some(_),
                    ..
                }
                | IntentCall::SnapAt {
                    target,
                    create: Some(_),
                    ..
                }
                | IntentCall::SnapLineage {
                    target,
                    create: Some(_),
                    ..
                },
                IntentResult::Refused { .. },
            ) => {
                if self
                    .volumes
                    .get(target)
                    .is_some_and(|volume| volume.state == VolumeState::Creating)
                {
                    self.volumes.remove(target);
                }
            }
            (
                IntentCall::Snap { create: None, .. }
                | IntentCall::SnapAt { create: None, .. }
                | IntentCall::SnapLineage { create: None, .. },
                IntentResult::Refused { .. },
            ) => {}
            // The catalog follows what the node did. A record the catalog has passed
            // already (the supervisor read the node first) changes nothing.
            (
                IntentCall::Session { command },
                IntentResult::Session {
                    entry,
                    target_readiness,
                },
            ) => match (entry, command.target()) {
                (Some(entry), _) => {
                    let _ = self.session_record(entry);
                }
                (None, Some(target)) => match target_readiness {
                    Some(readiness) => self.session_ended(target, *readiness),
                    None => self.session_forget(target),
                },
                (None, None) => {}
            },
            (IntentCall::VolumeCreate { name, .. }, IntentResult::VolumeCreated { .. }) => {
                if let Some(volume) = self.volumes.get_mut(name) {
                    volume.state = VolumeState::Ready;
                }
            }
            // The node refused the volume: it is removed as if never asked for.
            (IntentCall::VolumeCreate { name, .. }, _) => {
                if self
                    .volumes
                    .get(name)
                    .is_some_and(|volume| volume.state == VolumeState::Creating)
                {
                    self.volumes.remove(name);
                }
            }
            (IntentCall::VolumeDelete { name }, IntentResult::VolumeDeleted) => {
                self.volumes.remove(name);
            }
            // The node refused the delete (it found the volume in a session the catalog
            // does not know of): the volume stays, as it was.
            (IntentCall::VolumeDelete { name }, _) => {
                if let Some(volume) = self.volumes.get_mut(name) {
                    volume.state = VolumeState::Ready;
                }
            }
            (IntentCall::Session { .. }, _)
            | (_, IntentResult::Session { .. })
            | (_, IntentResult::VolumeCreated { .. })
            | (_, IntentResult::VolumeDeleted) => {}
        }
        Ok(CatalogReply::IntentFinished(result.clone()))
    }

    /// Whether a volume's readiness may be set by hand: it must be ready (not being
    /// created or deleted) and take part in no copy session, whose commands set the
    /// readiness of their volumes themselves (the node refuses the same; checking here
    /// too means the leader refuses before anything is asked or committed).
    pub fn check_readiness(&self, name: &str) -> Result<(), CatalogError> {
        self.ready_volume(name, "given a readiness")?;
        if let Some(entry) = self.session_of_volume(name) {
            let advice = match (entry.kind, entry.target == name) {
                (SessionKind::Clone, true) => {
                    format!("`tandem clone activate {name}` gives the destination to its hosts")
                }
                (SessionKind::Mirror, true) => {
                    format!("`tandem mirror split {name}` gives the BCV to its hosts")
                }
                (kind, _) => format!(
                    "end the session first (`tandem {kind} {} {}`)",
                    match kind {
                        SessionKind::Clone => "terminate",
                        SessionKind::Mirror => "cancel",
                    },
                    entry.target
                ),
            };
            return Err(CatalogError::ReadinessFollowsSession {
                volume: name.to_string(),
                kind: entry.kind,
                source_volume: entry.source.clone(),
                target: entry.target.clone(),
                advice,
            });
        }
        Ok(())
    }

    fn volume_mut(&mut self, name: &str) -> Result<&mut VolumeRecord, CatalogError> {
        self.volumes
            .get_mut(name)
            .ok_or_else(|| CatalogError::UnknownVolume {
                volume: name.to_string(),
            })
    }

    fn register_node(&mut self, report: &NodeReport) -> CatalogResponse {
        validate_name("node name", &report.name, NAME_BYTES_MAX)?;
        validate_name("site name", &report.site, NAME_BYTES_MAX)?;
        if report.address.is_empty() || report.nbd_address.is_empty() {
            return Err(CatalogError::Invalid {
                what: "node address".into(),
                detail: format!("node '{}' reported an empty address", report.name),
            });
        }
        if let Some(existing) = self.nodes.get(&report.name) {
            if existing.site != report.site {
                return Err(CatalogError::SiteChange {
                    node: report.name.clone(),
                    site: existing.site.clone(),
                    requested: report.site.clone(),
                });
            }
        }
        let record = NodeRecord {
            name: report.name.clone(),
            site: report.site.clone(),
            address: report.address.clone(),
            nbd_address: report.nbd_address.clone(),
            capacity_bytes: report.capacity_bytes,
            control_plane: report.control_plane,
            health: Health::Up,
            down_since_unix_seconds: None,
        };
        self.nodes.insert(report.name.clone(), record.clone());
        Ok(CatalogReply::Node(record))
    }

    /// Marks a volume `deleting` after checking that nothing uses it: no job, session
    /// or lineage.
    fn volume_delete_begin(&mut self, name: &str) -> CatalogResponse {
        self.refuse_lineage_change(name)?;
        if let Some(job) = self.job_of_volume(name) {
            return Err(CatalogError::VolumeInJob {
                volume: name.to_string(),
                job: job.id,
            });
        }
        if let Some(entry) = self.session_of_volume(name) {
            return Err(CatalogError::VolumeInSession {
                volume: name.to_string(),
                kind: entry.kind,
                source_volume: entry.source.clone(),
                target: entry.target.clone(),
            });
        }
        let volume = self.volume_mut(name)?;
        match volume.state {
            VolumeState::Ready | VolumeState::Deleting => {
                volume.state = VolumeState::Deleting;
                Ok(CatalogReply::Volume(volume.clone()))
            }
            VolumeState::Creating => Err(illegal(volume, "deleted")),
        }
    }

    fn volume_create_begin(
        &mut self,
        name: &str,
        node: &str,
        size_bytes: u64,
        track_size_bytes: u32,
    ) -> CatalogResponse {
        validate_name("volume name", name, VOLUME_NAME_BYTES_MAX)?;
        if let Some(existing) = self.volumes.get(name) {
            return Err(CatalogError::VolumeExists {
                volume: name.to_string(),
                node: existing.node.clone(),
            });
        }
        let record = self.nodes.get(node).ok_or(CatalogError::UnknownNode {
            node: node.to_string(),
        })?;
        if record.health == Health::Down {
            return Err(CatalogError::NodeDown {
                node: node.to_string(),
            });
        }
        protocol::messages::check_geometry(size_bytes, track_size_bytes).map_err(|detail| {
            CatalogError::Invalid {
                what: format!("geometry of volume '{name}'"),
                detail,
            }
        })?;
        let provisioned: u64 = self
            .volumes
            .values()
            .filter(|volume| volume.node == node)
            .map(|volume| volume.size_bytes)
            .sum();
        let free_bytes = record.capacity_bytes.saturating_sub(provisioned);
        if size_bytes > free_bytes {
            return Err(CatalogError::DoesNotFit {
                volume: name.to_string(),
                node: node.to_string(),
                size_bytes,
                free_bytes,
                capacity_bytes: record.capacity_bytes,
            });
        }
        let volume = VolumeRecord {
            name: name.to_string(),
            node: node.to_string(),
            size_bytes,
            track_size_bytes,
            state: VolumeState::Creating,
            readiness: Readiness::Ready,
        };
        self.volumes.insert(name.to_string(), volume.clone());
        Ok(CatalogReply::Volume(volume))
    }
}

fn illegal(volume: &VolumeRecord, action: &str) -> CatalogError {
    CatalogError::IllegalState {
        volume: volume.name.clone(),
        state: volume.state,
        action: action.to_string(),
    }
}

/// Names appear in paths, certificates and log lines, so they are kept to a safe alphabet.
fn validate_name(what: &str, name: &str, bytes_max: usize) -> Result<(), CatalogError> {
    let invalid = |detail: String| CatalogError::Invalid {
        what: what.to_string(),
        detail,
    };
    if name.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if name.len() > bytes_max {
        return Err(invalid(format!(
            "'{name}' is {} bytes; at most {bytes_max} are allowed",
            name.len()
        )));
    }
    if let Some(character) = name
        .chars()
        .find(|character| !(character.is_ascii_alphanumeric() || "-_.".contains(*character)))
    {
        return Err(invalid(format!(
            "'{name}' contains '{character}'; use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Whether a session can have gone from `from` to `to` by its commands and its copies
/// finishing, in at most three steps: the source node reports states, and a report can
/// miss the ones in between (a rotation passes through syncing and synchronized on its
/// way from split to split).
pub fn session_state_reachable(kind: SessionKind, from: SessionState, to: SessionState) -> bool {
    const TRANSITIONS: [Transition; 13] = [
        Transition::Precopy,
        Transition::Activate,
        Transition::Terminate,
        Transition::Establish,
        Transition::Split,
        Transition::Reestablish,
        Transition::Restore,
        Transition::Cancel,
        Transition::CopyDone,
        Transition::Suspend,
        Transition::Resume(SessionState::Syncing),
        Transition::Resume(SessionState::Precopying),
        Transition::Resume(SessionState::Active),
    ];
    let mut frontier = vec![from];
    for _ in 0..=3 {
        if frontier.contains(&to) {
            return true;
        }
        frontier = frontier
            .iter()
            .flat_map(|state| {
                TRANSITIONS.iter().filter_map(move |transition| {
                    next_state(kind, *state, *transition).ok().flatten()
                })
            })
            .collect();
    }
    frontier.contains(&to)
}
