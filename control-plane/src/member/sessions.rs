//! Session commands on the leader, and how it keeps the catalog's sessions and their nodes
//! on one state. A command is checked against the catalog, carried out by the source
//! volume's node and its outcome committed, as an intent (the saga): retried commands
//! drive the same intent and get its result, the node answering a repeated call under the
//! intent's id from memory; list and show ask each session's node and fall back on the
//! catalog's checkpoint; and a supervisor makes the catalog follow the node for every
//! session, resting ones included.

use super::*;
use protocol::cluster::{Intent, IntentCall, IntentResult};

/// How often the supervisor compares resting sessions (created, copied, synchronized,
/// split) with their nodes. Running copies are compared at every supervision round; a
/// resting session differs from its node only after a command whose recording was lost,
/// so a slower pace spares nodes a bitmap scan per session twice a second.
pub const RESTING_SESSION_RECONCILE_INTERVAL_MILLISECONDS: u64 = 2_000;
/// How long a session must be missing from its node, as seen by the supervisor, before
/// the catalog forgets it. A command that ended it and lost its leader is retried by the
/// CLI within a second or two of the new election; that retry, finding the session still
/// in the catalog, gets the node's first answer instead of "no such session".
pub const SESSION_GONE_GRACE_MILLISECONDS: u64 = 5_000;
/// How far a running copy moves between two progress checkpoints in the catalog.
pub const SESSION_CHECKPOINT_TRACKS: u64 = 4096;

/// What a session's node says of it.
pub(super) enum NodeSession {
    /// The node runs it and reports it so.
    Live(Box<SessionInfo>),
    /// The node answered that it has no such session.
    Gone(String),
    /// The node did not answer (down, unreachable, not registered), for this reason.
    Silent(String),
}

/// The volume a command's session is known by: its target, or for a rotation the
/// standard (whose split BCV the node picks).
pub(super) fn session_lock_key(command: &SessionCommand) -> String {
    match command {
        SessionCommand::MirrorRotate { standard } => standard.clone(),
        _ => target_of(command).unwrap_or_default(),
    }
}

/// The target volume a command names, if it names one.
pub(super) fn target_of(command: &SessionCommand) -> Option<String> {
    match command {
        SessionCommand::CloneCreate { target, .. }
        | SessionCommand::ClonePrecopy { target }
        | SessionCommand::CloneActivate { target }
        | SessionCommand::CloneTerminate { target }
        | SessionCommand::CloneCancel { target }
        | SessionCommand::SetRate { target, .. } => Some(target.clone()),
        SessionCommand::MirrorEstablish { bcv, .. }
        | SessionCommand::MirrorSplit { bcv, .. }
        | SessionCommand::MirrorReestablish { bcv }
        | SessionCommand::MirrorRestore { bcv, .. }
        | SessionCommand::MirrorCancel { bcv } => Some(bcv.clone()),
        SessionCommand::MirrorRotate { .. } => None,
    }
}

pub(super) fn session_response(info: Option<SessionInfo>) -> Response {
    Response::Cluster(ClusterResponse::Session(info.map(Box::new)))
}

/// Sessions whose highest shown percent a member remembers at most.
const SHOWN_PERCENT_SESSIONS_MAX: usize = 4096;

/// A session as the catalog last recorded it, with `error` saying why it is shown so.
pub(super) fn checkpoint_info(entry: &SessionEntry, error: Option<String>) -> SessionInfo {
    let total = entry.tracks_copied + entry.tracks_remaining;
    SessionInfo {
        id: entry.id,
        kind: entry.kind,
        source: entry.source.clone(),
        target: entry.target.clone(),
        state: entry.state,
        mode: None,
        slots: entry.slots.clone(),
        extents: Vec::new(),
        tracks_total: total,
        tracks_copied: entry.tracks_copied,
        tracks_remaining: entry.tracks_remaining,
        percent: protocol::session::checkpoint_percent(
            entry.state,
            entry.tracks_copied,
            entry.tracks_remaining,
        ),
        rate_bytes_per_second: 0,
        eta_seconds: None,
        rate_limit_mebibytes_per_second: None,
        tracks_copied_last: 0,
        lag_tracks: 0,
        lag_seconds: 0,
        error,
        created_unix_seconds: 0,
        split_sequence: 0,
        last_error: None,
        strict: false,
        target_timeout_milliseconds: 0,
    }
}

/// The catalog's record of a session as its node reported it.
pub(super) fn entry_of(node: &str, info: &SessionInfo) -> SessionEntry {
    SessionEntry {
        id: info.id,
        node: node.to_string(),
        kind: info.kind,
        source: info.source.clone(),
        target: info.target.clone(),
        state: info.state,
        slots: info.slots.clone(),
        tracks_copied: info.tracks_copied,
        tracks_remaining: info.tracks_remaining,
        error: info.error.clone(),
    }
}

/// The transition a command asks of an existing session.
fn transition_of(command: &SessionCommand) -> Option<Transition> {
    match command {
        SessionCommand::ClonePrecopy { .. } => Some(Transition::Precopy),
        SessionCommand::CloneActivate { .. } => Some(Transition::Activate),
        SessionCommand::CloneTerminate { .. } => Some(Transition::Terminate),
        SessionCommand::CloneCancel { .. } => Some(Transition::Cancel),
        SessionCommand::MirrorEstablish { .. } => Some(Transition::Establish),
        SessionCommand::MirrorSplit { .. } => Some(Transition::Split),
        SessionCommand::MirrorReestablish { .. } => Some(Transition::Reestablish),
        SessionCommand::MirrorRestore { .. } => Some(Transition::Restore),
        SessionCommand::MirrorCancel { .. } => Some(Transition::Cancel),
        SessionCommand::CloneCreate { .. }
        | SessionCommand::MirrorRotate { .. }
        | SessionCommand::SetRate { .. } => None,
    }
}

impl ControlPlane {
    /// A session command: the catalog refuses an illegal transition of a resting session
    /// before any node is asked; otherwise the source volume's node carries it out (and
    /// checks it against its own, newer, state), and the outcome is committed.
    ///
    /// Retries are harmless: a request the catalog recorded gets its first answer from the
    /// catalog, calling no node; the node is called with the request id and answers a
    /// request it carried out before with its first answer, without carrying it out again.
    pub(super) async fn session_command(
        &self,
        request_id: RequestId,
        command: SessionCommand,
    ) -> Outcome<Response> {
        self.read_barrier().await?;
        // Begun before (a retry, or a job's driver again): its intent is finished, or
        // driven on now.
        let begun = self
            .catalog
            .read(|catalog| catalog.intent(request_id).is_some())
            || self.intent_result(request_id).is_some();
        if begun {
            return self.session_intent_answer(request_id, &command).await;
        }
        if let Some(applied) = self
            .catalog
            .read(|catalog| catalog.applied_response(request_id).cloned())
        {
            // A request recorded before session intents (or whose intent's finish the
            // catalog no longer remembers): its first answer, from the catalog.
            applied.map_err(Refusal::from)?;
            return Ok(session_response(self.recorded_session(&command)));
        }
        // One command or reconciliation of a session at a time on this leader.
        let lock = self.session_lock(&session_lock_key(&command));
        let _one_at_a_time = lock.lock().await;
        let (node, _address, _source, _target) = self.session_command_checks(&command).await?;
        // The saga: the intent is recorded before the node is asked, so whatever fails
        // after this point, the command is finished under the same id (by a retry, or by
        // the supervisor after a leader change or the node's return).
        self.begin_intent(Intent {
            id: request_id,
            node,
            call: IntentCall::Session {
                command: command.clone(),
            },
            begun_unix_seconds: now_unix_seconds(),
        })
        .await?;
        self.session_intent_answer(request_id, &command).await
    }

    /// Drives the intent of a session command and answers with what came of it: the
    /// session as the node left it (live when this drive called the node, else the
    /// catalog's record), or the node's refusal.
    async fn session_intent_answer(
        &self,
        request_id: RequestId,
        command: &SessionCommand,
    ) -> Outcome<Response> {
        match self.drive_intent_answer(request_id).await? {
            (IntentResult::Refused { code, message }, _) => Err(Refusal::new(code, message)),
            (IntentResult::Session { .. }, Some(live)) => Ok(session_response(live)),
            (IntentResult::Session { .. }, None) => {
                Ok(session_response(self.recorded_session(command)))
            }
            (other, _) => Err(Refusal::new(
                ErrorCode::Internal,
                format!("a session command's intent finished with {other:?}"),
            )),
        }
    }

    /// Refuses a session command that would change the data of a volume a gsnap lineage
    /// tracks other than through its hosts (the next incremental job would miss it): a
    /// session into it, or a restore of it from its BCV. The pair of the lineage's own
    /// jobs (from its intermediate into the volume it tracks) is theirs.
    fn refuse_lineage_change(
        &self,
        command: &SessionCommand,
        source: &str,
        target: Option<&str>,
    ) -> Outcome<()> {
        let written = match command {
            SessionCommand::CloneCreate { .. }
            | SessionCommand::MirrorEstablish { .. }
            | SessionCommand::MirrorReestablish { .. } => target,
            SessionCommand::MirrorRestore { .. } => Some(source),
            _ => None,
        };
        let Some(written) = written else {
            return Ok(());
        };
        self.catalog.read(|catalog| {
            // The pair of a running job, from its P' into the volume it tracks.
            let own_job = catalog
                .job_of_volume(written)
                .filter(|job| job.spec.intermediate == source && job.pair_target() == written)
                .map(|job| (job.spec.source.as_str(), job.spec.target.as_str()));
            catalog
                .refuse_lineage_change_except(written, own_job)
                .map_err(Refusal::from)
        })
    }

    /// The checks before a session command reaches its node, and where it goes: the
    /// source volume's node, its address, the source and the target.
    async fn session_command_checks(
        &self,
        command: &SessionCommand,
    ) -> Outcome<(String, String, String, Option<String>)> {
        self.refuse_taken_target(command).await?;
        let (source, target, entry) = match command {
            SessionCommand::CloneCreate { source, target, .. } => {
                (source.clone(), Some(target.clone()), None)
            }
            SessionCommand::MirrorEstablish { standard, bcv, .. } => (
                standard.clone(),
                Some(bcv.clone()),
                self.catalog.read(|catalog| catalog.session(bcv).cloned()),
            ),
            SessionCommand::MirrorRotate { standard } => (standard.clone(), None, None),
            SessionCommand::ClonePrecopy { target }
            | SessionCommand::CloneActivate { target }
            | SessionCommand::CloneTerminate { target }
            | SessionCommand::CloneCancel { target } => {
                let entry = self.known_session(SessionKind::Clone, target)?;
                (entry.source.clone(), Some(target.clone()), Some(entry))
            }
            SessionCommand::MirrorSplit { bcv: target, .. }
            | SessionCommand::MirrorReestablish { bcv: target }
            | SessionCommand::MirrorRestore { bcv: target, .. }
            | SessionCommand::MirrorCancel { bcv: target } => {
                let entry = self.known_session(SessionKind::Mirror, target)?;
                (entry.source.clone(), Some(target.clone()), Some(entry))
            }
            SessionCommand::SetRate { target, .. } => {
                let entry = self
                    .catalog
                    .read(|catalog| catalog.session(target).cloned())
                    .ok_or_else(|| {
                        Refusal::new(
                            ErrorCode::NotFound,
                            format!("no session has '{target}' as its target"),
                        )
                    })?;
                (entry.source.clone(), Some(target.clone()), Some(entry))
            }
        };
        if let (Some(entry), Some(transition)) = (&entry, transition_of(command)) {
            if entry.state.is_resting() {
                if let Err(reason) = next_state(entry.kind, entry.state, transition) {
                    return Err(Refusal::new(
                        ErrorCode::IllegalState,
                        format!(
                            "{} refused for {} {} -> {}: {reason}",
                            command.name(),
                            entry.kind,
                            entry.source,
                            entry.target
                        ),
                    ));
                }
            }
        }
        self.refuse_lineage_change(command, &source, target.as_deref())?;
        let volume = self.known_volume(&source)?;
        if let Some(target) = &target {
            self.known_volume(target)?;
        }
        self.ensure_node_up(&volume.node)?;
        let address = self.node_address(&volume.node).ok_or_else(|| {
            Refusal::new(
                ErrorCode::Unavailable,
                format!("node {} is not registered", volume.node),
            )
        })?;
        Ok((volume.node, address, source, target))
    }

    fn known_session(&self, kind: SessionKind, target: &str) -> Outcome<SessionEntry> {
        self.catalog
            .read(|catalog| catalog.session(target).cloned())
            .filter(|entry| entry.kind == kind)
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::NotFound,
                    format!(
                        "no {kind} session has '{target}' as its {} (see `tandem {kind} list`)",
                        match kind {
                            SessionKind::Clone => "destination",
                            SessionKind::Mirror => "BCV",
                        }
                    ),
                )
            })
    }

    /// A session as its node reports it now, or the catalog's checkpoint when the node
    /// does not answer.
    pub(super) async fn session_live(&self, entry: &SessionEntry) -> SessionInfo {
        let mut info = match self.node_session(entry).await {
            NodeSession::Live(info) => *info,
            NodeSession::Gone(reason) | NodeSession::Silent(reason) => checkpoint_info(
                entry,
                Some(format!(
                    "node {} did not answer ({reason}); this is the catalog's last checkpoint",
                    entry.node
                )),
            ),
        };
        self.hold_shown_percent(&mut info);
        info
    }

    /// Progress never goes back in what this member shows of one copy: a checkpoint is
    /// older than the node's last reading, and a restarted node may read less than it
    /// reported. Within one state of a session the percent shown is the highest shown so
    /// far; it is 100 only when nothing remains. (A new leader starts without this
    /// memory; it shows what the node or the catalog says.)
    fn hold_shown_percent(&self, info: &mut SessionInfo) {
        let mut shown = self.shown_percent.lock();
        if shown.len() >= SHOWN_PERCENT_SESSIONS_MAX && !shown.contains_key(&info.id) {
            // Ended sessions are not removed one by one; a full memory starts again.
            shown.clear();
        }
        match shown.get(&info.id) {
            Some((state, percent))
                if *state == info.state && *percent > info.percent && info.tracks_remaining > 0 =>
            {
                info.percent = percent.min(protocol::session::PERCENT_UNFINISHED_MAX);
            }
            _ => {}
        }
        shown.insert(info.id, (info.state, info.percent));
    }

    /// Every session of `kind` (or of every kind), as its node reports it now.
    pub(super) async fn session_list(&self, kind: Option<SessionKind>) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        let entries: Vec<SessionEntry> = self.catalog.read(|catalog| {
            catalog
                .sessions()
                .filter(|entry| kind.is_none_or(|kind| entry.kind == kind))
                .cloned()
                .collect()
        });
        let mut infos = Vec::new();
        for entry in &entries {
            infos.push(self.session_live(entry).await);
        }
        infos.sort_by_key(|info| (info.source.clone(), info.target.clone()));
        Ok(ClusterResponse::Sessions(infos))
    }

    /// One session of `kind`, by its target, as its node reports it now.
    pub(super) async fn session_show(
        &self,
        kind: SessionKind,
        target: String,
    ) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        let entry = self.known_session(kind, &target)?;
        let info = self.session_live(&entry).await;
        Ok(ClusterResponse::Session(Some(Box::new(info))))
    }

    pub(super) fn session_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.session_locks
            .lock()
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// The answer to a retried command the catalog recorded: the session as recorded, or
    /// none when the command ended it.
    pub(super) fn recorded_session(&self, command: &SessionCommand) -> Option<SessionInfo> {
        self.catalog
            .read(|catalog| match command {
                SessionCommand::MirrorRotate { standard } => catalog
                    .sessions()
                    .find(|entry| entry.kind == SessionKind::Mirror && entry.source == *standard)
                    .cloned(),
                _ => target_of(command).and_then(|target| catalog.session(&target).cloned()),
            })
            .map(|entry| checkpoint_info(&entry, entry.error.clone()))
    }

    /// Asks a session's node for the session.
    pub(super) async fn node_session(&self, entry: &SessionEntry) -> NodeSession {
        let Some(address) = self.node_address(&entry.node) else {
            return NodeSession::Silent("the node is not registered".to_string());
        };
        if let Err(down) = self.ensure_node_up(&entry.node) {
            return NodeSession::Silent(down.message);
        }
        let answer = self
            .call(
                &entry.node,
                &address,
                Request::SessionShow {
                    kind: entry.kind,
                    target: entry.target.clone(),
                },
            )
            .await;
        match answer {
            Ok(Response::Session(Some(info))) => NodeSession::Live(Box::new(info)),
            Ok(Response::Error {
                code: ErrorCode::NotFound,
                message,
            }) => NodeSession::Gone(message),
            Ok(Response::Error { message, .. }) => NodeSession::Silent(message),
            Ok(other) => NodeSession::Silent(format!("unexpected answer {other:?}")),
            Err(reason) => NodeSession::Silent(reason),
        }
    }

    /// Brings the catalog's sessions to their nodes' state: a copy finishes on its node
    /// and the catalog learns it here; a command the node carried out whose recording was
    /// lost (its leader died in between) is recorded here; a session the node no longer
    /// has leaves the catalog. Resting sessions are compared every
    /// [`RESTING_SESSION_RECONCILE_INTERVAL_MILLISECONDS`], running copies every round.
    pub(super) async fn refresh_sessions(&self) {
        let now = Instant::now();
        let resting_due = {
            let mut reconciled = self.resting_sessions_reconciled.lock();
            let due = reconciled.is_none_or(|at| {
                now.duration_since(at)
                    >= Duration::from_millis(RESTING_SESSION_RECONCILE_INTERVAL_MILLISECONDS)
            });
            if due {
                *reconciled = Some(now);
            }
            due
        };
        let targets: Vec<String> = self.catalog.read(|catalog| {
            catalog
                .sessions()
                .filter(|entry| {
                    resting_due
                        || !entry.state.is_resting()
                        || entry.state == SessionState::Precopying
                })
                .map(|entry| entry.target.clone())
                .collect()
        });
        self.gone_sessions
            .lock()
            .retain(|target, _| targets.contains(target) || !resting_due);
        for target in targets {
            let lock = self.session_lock(&target);
            // A command on the session is under way: it records its own outcome.
            let Ok(_one_at_a_time) = lock.try_lock() else {
                continue;
            };
            // Read again under the lock: a command may have just recorded a new state.
            let Some(entry) = self
                .catalog
                .read(|catalog| catalog.session(&target).cloned())
            else {
                continue;
            };
            match self.node_session(&entry).await {
                NodeSession::Silent(_) => {}
                NodeSession::Gone(reason) => self.forget_gone_session(&entry, &reason).await,
                NodeSession::Live(info) => {
                    self.gone_sessions.lock().remove(&target);
                    self.follow_live_session(&entry, &info).await;
                }
            }
        }
    }

    /// Brings the catalog's record of a session to its node's view when its state, its
    /// error or its progress (by a checkpoint's worth of tracks) changed. The caller holds
    /// the session's lock, so no command records the session meanwhile. Says whether the
    /// state changed.
    pub(super) async fn follow_live_session(
        &self,
        entry: &SessionEntry,
        info: &SessionInfo,
    ) -> bool {
        let fresh = entry_of(&entry.node, info);
        let progressed = fresh.tracks_copied >= entry.tracks_copied + SESSION_CHECKPOINT_TRACKS;
        let state_changed = fresh.state != entry.state;
        if state_changed && entry.state.is_resting() {
            tracing::warn!(
                target = %entry.target,
                node = %entry.node,
                catalog = %entry.state,
                node_state = %fresh.state,
                "the catalog's session differs from its node's; the catalog follows the node"
            );
        }
        if state_changed || progressed || fresh.error != entry.error {
            if let Err(refusal) = self
                .commit(random_request_id(), Command::SessionRecord(fresh))
                .await
            {
                tracing::debug!(target = %entry.target, reason = %refusal.message, "session checkpoint not recorded");
                return false;
            }
        }
        state_changed
    }

    /// A session its node says it does not have: once that has lasted
    /// [`SESSION_GONE_GRACE_MILLISECONDS`], the catalog records its end.
    async fn forget_gone_session(&self, entry: &SessionEntry, reason: &str) {
        let first_seen = *self
            .gone_sessions
            .lock()
            .entry(entry.target.clone())
            .or_insert_with(Instant::now);
        if first_seen.elapsed() < Duration::from_millis(SESSION_GONE_GRACE_MILLISECONDS) {
            return;
        }
        tracing::warn!(
            target = %entry.target,
            node = %entry.node,
            %reason,
            "the session's node no longer has it; the catalog records its end"
        );
        let ended = self.session_end_record(entry.target.clone()).await;
        match self.commit(random_request_id(), ended).await {
            Ok(_) => {
                self.gone_sessions.lock().remove(&entry.target);
            }
            Err(refusal) => {
                tracing::debug!(target = %entry.target, reason = %refusal.message, "session end not recorded")
            }
        }
    }
}
