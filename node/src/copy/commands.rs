//! Session commands, the driver's half: each checks the volumes, reads the facts the
//! session core needs under the gates of the session's volumes, asks the core
//! ([`session_core`]) what the command does, and carries out its effects — the source's
//! slots, marks and bits and the session's record in one engine batch
//! ([`VolumeChanges`]), so a crash leaves it done or not done; the target's operations
//! through the session's [`Target`] (into the same batch when it is on this node; on its
//! node first otherwise: they are idempotent, and a registration nobody uses is released
//! when the command fails). The command's gates are held throughout.

use super::session_core::{self, Effect};
use super::suspend::ReleasesInHand;
use super::*;
use crate::store::VolumeChanges;

/// What a command read of its session's target on another node before taking its gates
/// (see [`Sessions::prepare`]). Changed tracks are read only after the BCV was taken
/// from its hosts ([`session_core::detach`]), so with them that is done too.
struct Prepared {
    id: SessionId,
    state: SessionState,
    target_changed: Option<Vec<u64>>,
    target_invalid: Option<u64>,
    target_answers: Option<bool>,
}

/// The target a command on an existing session names.
fn command_target(command: &SessionCommand) -> Option<&str> {
    match command {
        SessionCommand::ClonePrecopy { target }
        | SessionCommand::CloneActivate { target }
        | SessionCommand::CloneTerminate { target }
        | SessionCommand::CloneCancel { target }
        | SessionCommand::MirrorSplit { bcv: target, .. }
        | SessionCommand::MirrorReestablish { bcv: target }
        | SessionCommand::MirrorRestore { bcv: target, .. }
        | SessionCommand::MirrorCancel { bcv: target } => Some(target),
        _ => None,
    }
}

impl<E: Engine> Sessions<E> {
    /// Carries out a session command: checks it against the state table and the volumes,
    /// then changes bits, marks, readiness and the record, with host IO held off. Returns
    /// the session as it is now, or `None` when the command ended it.
    pub fn command(&self, command: SessionCommand) -> Result<Option<SessionInfo>> {
        self.command_with(command, None)
    }

    /// [`Sessions::command`] for a session whose target lives on another node (`remote`,
    /// which the service resolved through the catalog).
    pub fn command_with(
        &self,
        command: SessionCommand,
        remote: Option<RemoteVolume>,
    ) -> Result<Option<SessionInfo>> {
        // What the command must ask the target's node, asked before the gates are held.
        let prepared = self.prepare(&command);
        // The gates of the volumes the command changes. Which those are is read before
        // the gates are held, so it is read again under them: a command that ended the
        // session or began another on the same volumes meanwhile means another round.
        let mut rounds = 0;
        let _gates = loop {
            let volumes = self.command_volumes(&command);
            let gates = self.gates.exclusive(volumes.iter().copied());
            rounds += 1;
            if self.command_volumes(&command) == volumes || rounds == COMMAND_GATE_ROUNDS_MAX {
                break gates;
            }
        };
        let (answer, releases) = self.command_under_gates(command, remote, prepared.as_ref())?;
        // A session ended on a target of another node is released there with the gates
        // released: host IO on the session's volumes never waits for that round trip.
        drop(_gates);
        releases.deliver();
        Ok(answer)
    }

    /// Reads what a command on an existing session needs of a target on another node —
    /// its hosts' changed tracks, its invalid count, whether it answers — before the
    /// command takes its gates: host IO on the session's volumes does not wait for these
    /// round trips. Under the gates they are used only if the session is still in the
    /// state they were read in (otherwise they are read again there). A target's answers
    /// could change between the read and the command in either case: its own hosts are
    /// not held off by this node's gates.
    fn prepare(&self, command: &SessionCommand) -> Option<Prepared> {
        let needs = session_core::needs(command);
        if !(needs.target_changed || needs.target_invalid || needs.target_answers) {
            return None;
        }
        let target_name = command_target(command)?;
        let record = self
            .table
            .lock()
            .find_by_target(command_kind(command), target_name)
            .map(|live| live.record.clone())?;
        record.remote.as_ref()?;
        let target = self.target_of(&record).ok()?;
        let source = self.store.volume(&record.source).ok()?;
        let mut scratch = VolumeChanges::new();
        let target_invalid = needs
            .target_invalid
            .then(|| {
                target
                    .apply(
                        &mut scratch,
                        TargetOperation::CountInvalid { session: record.id },
                    )
                    .and_then(|answer| target::count_answer(&*target, answer))
                    .inspect_err(|error| tracing::debug!(session = record.id, %error, "a target query before the command's gates failed; it is asked again under them"))
                    .ok()
            })
            .flatten();
        let target_answers = needs
            .target_answers
            .then(|| self.target_answers(&record, &*target));
        // The changed tracks only with every other fact the core refuses on: the reading
        // takes the BCV from its hosts, which a refused command must not have done.
        let target_changed = (needs.target_changed
            && (target_invalid.is_some() || !needs.target_invalid))
            .then(|| {
                let mut facts = self.base_facts(&source);
                facts.target_invalid = target_invalid.unwrap_or(0);
                self.table_facts(&record, &mut facts);
                self.target_changed(command, &record, &facts, &source, &*target)
                    .inspect_err(|error| tracing::debug!(session = record.id, %error, "reading the target's changed tracks before the command's gates failed; they are read again under them"))
                    .ok()
            })
            .flatten();
        Some(Prepared {
            id: record.id,
            state: record.state,
            target_changed,
            target_invalid,
            target_answers,
        })
    }

    /// Whether a session's target answers: a suspended session's did not; the others are
    /// asked, no longer than the session's target timeout.
    fn target_answers(&self, record: &SessionRecord, target: &dyn Target) -> bool {
        record.state != SessionState::Suspended
            && target.answers(Duration::from_millis(record.target_timeout_milliseconds))
    }

    /// The ids of the volumes of this node a command changes, sorted: its session's
    /// source and target (when they live here), and for a rotation every BCV of the
    /// standard. A name this node does not hold adds nothing (the command itself says
    /// what is missing).
    fn command_volumes(&self, command: &SessionCommand) -> Vec<u64> {
        let mut names: Vec<String> = Vec::new();
        match command {
            SessionCommand::CloneCreate { source, target, .. } => {
                names.extend([source.clone(), target.clone()]);
            }
            SessionCommand::MirrorEstablish { standard, bcv, .. } => {
                names.extend([standard.clone(), bcv.clone()]);
            }
            SessionCommand::MirrorRotate { standard } => {
                names.push(standard.clone());
                let table = self.table.lock();
                names.extend(
                    table
                        .sessions
                        .values()
                        .filter(|live| live.record.source == *standard)
                        .map(|live| live.record.target.clone()),
                );
            }
            SessionCommand::SetRate { .. } => {}
            SessionCommand::ClonePrecopy { target }
            | SessionCommand::CloneActivate { target }
            | SessionCommand::CloneTerminate { target }
            | SessionCommand::CloneCancel { target }
            | SessionCommand::MirrorSplit { bcv: target, .. }
            | SessionCommand::MirrorReestablish { bcv: target }
            | SessionCommand::MirrorRestore { bcv: target, .. }
            | SessionCommand::MirrorCancel { bcv: target } => {
                let table = self.table.lock();
                if let Some(live) = table.find_by_target(command_kind(command), target) {
                    names.extend([live.record.source.clone(), live.record.target.clone()]);
                }
            }
        }
        let mut ids: Vec<u64> = names
            .iter()
            .filter_map(|name| self.store.volume(name).ok())
            .map(|volume| volume.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Carries out a command with its gates held; returns its answer and the releases it
    /// owes a target on another node.
    fn command_under_gates(
        &self,
        command: SessionCommand,
        remote: Option<RemoteVolume>,
        prepared: Option<&Prepared>,
    ) -> Result<(Option<SessionInfo>, ReleasesInHand<'_, E>)> {
        let kind = command_kind(&command);
        let target = match &command {
            SessionCommand::CloneCreate { target, .. } => {
                self.clone_create(&command, remote)?;
                target.clone()
            }
            SessionCommand::MirrorEstablish { bcv, .. } => {
                self.mirror_establish(&command, remote)?;
                bcv.clone()
            }
            SessionCommand::MirrorRotate { standard } => self.mirror_rotate(&command, standard)?,
            SessionCommand::SetRate {
                target,
                mebibytes_per_second,
            } => {
                self.set_rate(target, *mebibytes_per_second)?;
                target.clone()
            }
            SessionCommand::ClonePrecopy { target }
            | SessionCommand::CloneActivate { target }
            | SessionCommand::CloneTerminate { target }
            | SessionCommand::CloneCancel { target }
            | SessionCommand::MirrorSplit { bcv: target, .. }
            | SessionCommand::MirrorReestablish { bcv: target }
            | SessionCommand::MirrorRestore { bcv: target, .. }
            | SessionCommand::MirrorCancel { bcv: target } => {
                let record = self
                    .table
                    .lock()
                    .find_by_target(kind, target)
                    .map(|live| live.record.clone())
                    .ok_or_else(|| Error::SessionNotFound {
                        kind: kind.to_string(),
                        volume: target.clone(),
                        role: match kind {
                            SessionKind::Clone => "destination",
                            SessionKind::Mirror => "BCV",
                        }
                        .to_string(),
                    })?;
                let (outcome, releases) =
                    self.carry_out_adjusted(&command, record, |_| {}, prepared)?;
                if outcome.is_none() {
                    return Ok((None, releases));
                }
                target.clone()
            }
        };
        let kind = match command {
            SessionCommand::SetRate { ref target, .. } => {
                let table = self.table.lock();
                table
                    .sessions
                    .values()
                    .find(|live| live.record.target == *target)
                    .map_or(kind, |live| live.record.kind)
            }
            _ => kind,
        };
        Ok((Some(self.show(kind, &target)?), ReleasesInHand::new(self)))
    }

    /// Commits a command's changes with the session's new record (or, with `None`, the
    /// record's removal), then updates the table: the table never shows what a failed
    /// commit did not store.
    fn commit(
        &self,
        mut changes: VolumeChanges<'_>,
        id: SessionId,
        record: Option<&SessionRecord>,
    ) -> Result<()> {
        match record {
            Some(record) => changes.put(Space::Meta, session_key(id), record::encode(record)?),
            None => changes.delete(Space::Meta, session_key(id)),
        }
        crate::failpoints::hit("node::session::before-commit")?;
        self.store.commit(changes)?;
        crate::failpoints::hit("node::session::after-commit")?;
        match record {
            Some(record) => self.install(record.clone()),
            None => {
                self.table.lock().sessions.remove(&id);
            }
        }
        Ok(())
    }

    /// Puts a stored record in the table; a new copy restarts its meter.
    pub(super) fn install(&self, record: SessionRecord) {
        let mut table = self.table.lock();
        match table.sessions.get_mut(&record.id) {
            Some(live) => {
                let restarted = live.record.state != record.state;
                live.record = record;
                if restarted {
                    live.rate = RecentRate::new(self.epoch.elapsed());
                    live.cursor = 0;
                }
            }
            None => {
                let governed_rate = self.governor.lock().rate();
                table
                    .sessions
                    .insert(record.id, Self::live(record, self.epoch, governed_rate));
            }
        }
    }

    fn set_rate(&self, target: &str, rate: Option<u32>) -> Result<()> {
        let mut table = self.table.lock();
        let live = table
            .sessions
            .values_mut()
            .find(|live| live.record.target == target)
            .ok_or_else(|| Error::SessionNotFound {
                kind: "clone or mirror".to_string(),
                volume: target.to_string(),
                role: "target".to_string(),
            })?;
        if rate == Some(0) {
            return Err(Error::SessionRefused {
                command: "set rate".to_string(),
                session: live.record.describe(),
                reason: "a rate of 0 MiB/s would stop the copy; give a positive rate".to_string(),
            });
        }
        live.record.rate_limit_mebibytes_per_second = rate;
        let governed_rate = self.governor.lock().rate();
        live.limit.set_rate(rate.map_or(governed_rate, mebibytes));
        let record = live.record.clone();
        drop(table);
        self.persist(&record)
    }

    fn check_pair(&self, command: &SessionCommand, source: &Volume, target: &Volume) -> Result<()> {
        let session = format!("{} -> {}", source.name, target.name);
        if source.name == target.name {
            return Err(refused(
                command,
                &session,
                "source and target are the same volume",
            ));
        }
        if source.track_size_bytes != target.track_size_bytes {
            return Err(refused(
                command,
                &session,
                format!(
                    "track sizes differ ({} and {} bytes): create the target with --track-size {}",
                    source.track_size_bytes, target.track_size_bytes, source.track_size_bytes
                ),
            ));
        }
        if let Some(registration) = self.registered(&target.name) {
            return Err(refused(
                command,
                &session,
                format!(
                    "'{}' is already the target of a session from node {}",
                    target.name, registration.source_node
                ),
            ));
        }
        self.refuse_taken_target(command, &session, None, &target.name)
    }

    /// Refuses a new session into a volume a session of this node already targets: a
    /// volume here (`node` is `None`), or one of another node. The other node cannot
    /// tell: it lets this node replace its own registration there (one whose release was
    /// lost), which would take the volume from the live session.
    fn refuse_taken_target(
        &self,
        command: &SessionCommand,
        session: &str,
        node: Option<&str>,
        volume: &str,
    ) -> Result<()> {
        let table = self.table.lock();
        let Some(other) = table.sessions.values().find(|live| {
            let record = &live.record;
            match &record.remote {
                Some(remote) => node == Some(remote.node.as_str()) && remote.volume == volume,
                None => node.is_none() && record.target == volume,
            }
        }) else {
            return Ok(());
        };
        let place = node.map_or_else(String::new, |node| format!(" on node {node}"));
        Err(refused(
            command,
            session,
            format!(
                "'{volume}'{place} is already the target of {} (state {}): end that session first or choose another volume",
                other.record.describe(),
                other.record.state
            ),
        ))
    }

    fn next_id(&self) -> SessionId {
        let mut table = self.table.lock();
        let id = table.next_id;
        table.next_id += 1;
        id
    }

    fn clone_create(&self, command: &SessionCommand, remote: Option<RemoteVolume>) -> Result<()> {
        let SessionCommand::CloneCreate {
            source,
            target,
            precopy,
            extents,
        } = command
        else {
            unreachable!("called for clone create");
        };
        let source = self.store.volume(source)?;
        let session = format!("{} -> {target}", source.name);
        if extents.len() > CLONE_EXTENTS_MAX {
            return Err(refused(
                command,
                &session,
                format!(
                    "{} extents given; at most {CLONE_EXTENTS_MAX} are allowed",
                    extents.len()
                ),
            ));
        }
        let extents = if extents.is_empty() {
            vec![source.whole()]
        } else {
            crate::layout::normalize_extents(extents)
        };
        for extent in &extents {
            if extent.first > extent.last || extent.last >= source.track_count() {
                return Err(Error::ExtentOutOfRange {
                    name: source.name.clone(),
                    extent: *extent,
                    last_track: source.track_count() - 1,
                });
            }
        }
        if let Some(restoring) = self.restoring(&source.name) {
            return Err(refused(
                command,
                &session,
                format!("{restoring} is restoring the source; clone it once that is done"),
            ));
        }
        if self.involves_as_source(target) {
            return Err(refused(
                command,
                &session,
                format!("'{target}' is the source of another session and cannot be overwritten"),
            ));
        }
        let id = self.next_id();
        let (track_size_bytes, track_count) = match &remote {
            None => {
                let target = self.store.volume(target)?;
                self.check_pair(command, &source, &target)?;
                (target.track_size_bytes, target.track_count())
            }
            // The destination's node takes the volume for this session first; it refuses
            // one that already takes part in a session there.
            Some(remote) => {
                let session = format!("{} -> {}", source.name, remote.volume);
                self.refuse_taken_target(command, &session, Some(&remote.node), &remote.volume)?;
                self.register_remote(id, SessionKind::Clone, &source, remote)?
            }
        };
        let release = |error: Error| self.release_registration(id, remote.as_ref(), error);
        let problem = if track_size_bytes != source.track_size_bytes {
            Some(format!(
                "track sizes differ ({} and {track_size_bytes} bytes): create the destination with --track-size {}",
                source.track_size_bytes, source.track_size_bytes
            ))
        } else {
            extents
                .iter()
                .find(|extent| extent.last >= track_count)
                .map(|extent| {
                    format!(
                        "the destination has {track_count} tracks; extent {}-{} does not fit",
                        extent.first, extent.last
                    )
                })
        };
        if let Some(problem) = problem {
            return Err(release(refused(command, &session, problem)));
        }
        let facts = self.base_facts(&source);
        let decision = session_core::create_clone(
            id,
            &source.name,
            target,
            extents,
            *precopy,
            remote.clone(),
            &facts,
            now_unix_seconds(),
        )
        .map_err(|refusal| release(self.refusal(command, &session, &source, refusal)))?;
        let record = self.begin(decision, &source).map_err(release)?;
        tracing::info!(session = record.id, source = %record.source, target = %record.target, precopy, "clone created");
        Ok(())
    }

    /// Carries out the core's decision for a new session; returns its record.
    fn begin(&self, decision: session_core::Decision, source: &Volume) -> Result<SessionRecord> {
        let record = decision.record.clone().expect("a new session");
        let target = self.target_of(&record)?;
        // A new session owes no target a release.
        drop(self.execute(record.id, decision, source, &*target)?);
        Ok(record)
    }

    /// A new session's command failed after its target on another node registered it:
    /// the registration nobody uses is released (best effort: the target's node also lets
    /// this node replace it with its next session there).
    fn release_registration(
        &self,
        id: SessionId,
        remote: Option<&RemoteVolume>,
        error: Error,
    ) -> Error {
        if let Some(remote) = remote {
            let _ = self.remote_call(remote, TargetOperation::release(id));
        }
        error
    }

    /// A refusal of the session core as this crate's error.
    fn refusal(
        &self,
        command: &SessionCommand,
        session: &str,
        source: &Volume,
        refusal: session_core::Refusal,
    ) -> Error {
        match refusal {
            session_core::Refusal::Reason(reason) => refused(command, session, reason),
            session_core::Refusal::SlotsExhausted => Error::SessionSlotsExhausted {
                name: source.name.clone(),
                slots_max: crate::bitmap::SESSION_SLOTS_MAX,
            },
        }
    }

    fn mirror_establish(
        &self,
        command: &SessionCommand,
        remote: Option<RemoteVolume>,
    ) -> Result<()> {
        let SessionCommand::MirrorEstablish {
            standard,
            bcv,
            mode,
            strict,
            target_timeout_milliseconds,
        } = command
        else {
            unreachable!("called for mirror establish");
        };
        let target_timeout_milliseconds =
            target_timeout_milliseconds.unwrap_or(TARGET_TIMEOUT_MILLISECONDS_DEFAULT);
        check_mirror_options(
            command,
            &format!("{standard} -> {bcv}"),
            *mode,
            *strict,
            target_timeout_milliseconds,
        )?;
        let existing = self
            .table
            .lock()
            .find_by_target(SessionKind::Mirror, bcv)
            .map(|live| live.record.clone());
        if let Some(record) = existing {
            // Seed 002: an establish of a known pair reuses its session.
            if record.source != *standard {
                return Err(refused(
                    command,
                    &record.describe(),
                    format!(
                        "'{bcv}' is already the BCV of a mirror of '{}' (state {}): cancel that mirror first (`tandem mirror cancel {bcv}`) or choose another volume as the BCV",
                        record.source, record.state
                    ),
                ));
            }
            let (mode, strict) = (*mode, *strict);
            // An establish never ends its session: it owes no release.
            drop(self.carry_out_adjusted(
                command,
                record,
                |record| {
                    record.mode = mode;
                    record.strict = strict;
                    record.target_timeout_milliseconds = target_timeout_milliseconds;
                },
                None,
            )?);
            return Ok(());
        }
        let standard = self.store.volume(standard)?;
        let id = self.next_id();
        let (bcv_name, bcv_track_size, bcv_tracks) = match &remote {
            None => {
                let bcv = self.store.volume(bcv)?;
                self.check_pair(command, &standard, &bcv)?;
                (bcv.name.clone(), bcv.track_size_bytes, bcv.track_count())
            }
            Some(remote) => {
                // The target's node takes the volume for this session first; it refuses
                // a volume that already is another session's target.
                let session = format!("{} -> {}", standard.name, remote.volume);
                self.refuse_taken_target(command, &session, Some(&remote.node), &remote.volume)?;
                let (track_size_bytes, track_count) =
                    self.register_remote(id, SessionKind::Mirror, &standard, remote)?;
                (remote.volume.clone(), track_size_bytes, track_count)
            }
        };
        let release = |error: Error| self.release_registration(id, remote.as_ref(), error);
        let session = format!("{} -> {bcv_name}", standard.name);
        let problem = if bcv_track_size != standard.track_size_bytes {
            Some(format!(
                "track sizes differ ({} and {bcv_track_size} bytes): create the BCV with --track-size {}",
                standard.track_size_bytes, standard.track_size_bytes
            ))
        } else if bcv_tracks < standard.track_count() {
            Some(format!(
                "the BCV has {bcv_tracks} tracks, fewer than the standard's {}",
                standard.track_count()
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(release(refused(command, &session, problem)));
        }
        let facts = self.base_facts(&standard);
        let decision = session_core::establish_pair(
            id,
            command,
            &standard.name,
            &bcv_name,
            *mode,
            *strict,
            target_timeout_milliseconds,
            remote.clone(),
            &facts,
            now_unix_seconds(),
        )
        .map_err(|refusal| release(self.refusal(command, &session, &standard, refusal)))?;
        let record = self.begin(decision, &standard).map_err(release)?;
        tracing::info!(session = record.id, standard = %record.source, bcv = %record.target, "mirror established");
        Ok(())
    }

    fn mirror_rotate(&self, command: &SessionCommand, standard: &str) -> Result<String> {
        self.store.volume(standard)?;
        let oldest = self
            .table
            .lock()
            .sessions
            .values()
            .filter(|live| {
                live.record.kind == SessionKind::Mirror
                    && live.record.source == standard
                    && live.record.state == SessionState::Split
            })
            .min_by_key(|live| live.record.split_sequence)
            .map(|live| live.record.clone());
        let Some(record) = oldest else {
            return Err(refused(
                command,
                standard,
                format!("'{standard}' has no split BCV to rotate: establish and split one first"),
            ));
        };
        let bcv = record.target.clone();
        let reestablish = SessionCommand::MirrorReestablish { bcv: bcv.clone() };
        // A re-establish never ends its session: it owes no release.
        drop(self.carry_out_adjusted(
            &reestablish,
            record,
            |record| {
                record.split_when_synchronized = true;
            },
            None,
        )?);
        Ok(bcv)
    }

    /// Carries out a command on an existing session: its changes and its new record (or
    /// the record's removal) in one batch, with a change of the record the command itself
    /// does not make (an establish's new options, a rotation's split to come). Returns
    /// the record as stored, `None` when the command ended the session, and the release
    /// an ended session owes a target on another node.
    fn carry_out_adjusted(
        &self,
        command: &SessionCommand,
        record: SessionRecord,
        adjust: impl FnOnce(&mut SessionRecord),
        prepared: Option<&Prepared>,
    ) -> Result<(Option<SessionRecord>, ReleasesInHand<'_, E>)> {
        let id = record.id;
        let source = self.store.volume(&record.source)?;
        let target = self.target_of(&record)?;
        // What was read before the gates holds only for the session as it was then.
        let prepared =
            prepared.filter(|prepared| prepared.id == id && prepared.state == record.state);
        let facts = self.facts(command, &record, &source, &*target, prepared)?;
        let describe = record.describe();
        let detached = session_core::detach(&record);
        let mut decision = session_core::decide(command, record, &facts)
            .map_err(|refusal| self.refusal(command, &describe, &source, refusal))?;
        // A remote BCV taken from its hosts before the gates (to read its changed tracks)
        // need not be asked again under them: no round trip holds host IO off.
        if prepared.is_some_and(|prepared| prepared.target_changed.is_some()) {
            decision.effects.retain(|effect| {
                !matches!(effect, Effect::Target(operation) if detached.contains(operation))
            });
        }
        if let Some(record) = decision.record.as_mut() {
            adjust(record);
        }
        let outcome = decision.record.clone();
        let mut releases = self.execute(id, decision, &source, &*target)?;
        if !facts.target_answers {
            // A target that did not answer the command's probe is not asked again while
            // the command waits: the copier delivers the release when it answers.
            drop(releases);
            releases = ReleasesInHand::new(self);
        }
        if outcome.is_none() {
            tracing::info!(session = id, command = command.name(), "session ended");
        }
        Ok((outcome, releases))
    }

    /// The facts every command needs: the source's extent, slots and marks.
    fn base_facts(&self, source: &Volume) -> session_core::Facts {
        let slots_all = (1u32 << crate::bitmap::SESSION_SLOTS_MAX) - 1;
        let marks = VolumeChanges::new()
            .marks(source)
            .map(|marks| marks.pending)
            .unwrap_or(0);
        session_core::Facts {
            free_slots: !self.store.session_slots(source) & slots_all as u16,
            attached_slots: marks,
            source_ready: source.readiness() != Readiness::NotReady,
            ..session_core::Facts::new(source.whole())
        }
    }

    /// What the session core needs to decide `command`, read under the session's gates:
    /// only the bitmaps and target queries the command uses.
    fn facts(
        &self,
        command: &SessionCommand,
        record: &SessionRecord,
        source: &Volume,
        target: &dyn Target,
        prepared: Option<&Prepared>,
    ) -> Result<session_core::Facts> {
        let needs = session_core::needs(command);
        let mut facts = self.base_facts(source);
        if needs.changed {
            facts.changed = self.tracks_with(source, Bits::Session(record.slot))?;
        }
        if needs.pending {
            facts.pending = self.tracks_with(source, Bits::Pending(record.slot))?;
        }
        let mut scratch = VolumeChanges::new();
        let prepared_changed = prepared.and_then(|prepared| prepared.target_changed.clone());
        let prepared_invalid = prepared.and_then(|prepared| prepared.target_invalid);
        let prepared_answers = prepared.and_then(|prepared| prepared.target_answers);
        if let (true, Some(count)) = (needs.target_invalid, prepared_invalid) {
            facts.target_invalid = count;
        } else if needs.target_invalid {
            let answer = target.apply(
                &mut scratch,
                TargetOperation::CountInvalid { session: record.id },
            )?;
            facts.target_invalid = target::count_answer(target, answer)?;
        }
        if needs.target_answers {
            facts.target_answers =
                prepared_answers.unwrap_or_else(|| self.target_answers(record, target));
        }
        self.table_facts(record, &mut facts);
        // Last: the reading may first take the target from its hosts, which it does only
        // once the core accepted the command on every other fact.
        if let (true, Some(tracks)) = (needs.target_changed, prepared_changed) {
            facts.target_changed = tracks;
        } else if needs.target_changed {
            facts.target_changed = self.target_changed(command, record, &facts, source, target)?;
        }
        Ok(facts)
    }

    /// The facts the session table holds: the other sessions of the source, and the
    /// highest split sequence.
    fn table_facts(&self, record: &SessionRecord, facts: &mut session_core::Facts) {
        let table = self.table.lock();
        facts.others = table
            .sessions
            .values()
            .filter(|live| live.record.source == record.source && live.record.id != record.id)
            .map(|live| live.record.clone())
            .collect();
        facts.split_sequence_max = table
            .sessions
            .values()
            .map(|live| live.record.split_sequence)
            .max()
            .unwrap_or(0);
    }

    /// The tracks the hosts of the session's target changed since the split. A target on
    /// another node is first taken from its hosts ([`session_core::detach`]): this
    /// node's gates do not hold them off, and a write landing after the reading would be
    /// missing from the resync. That happens only once the core accepts the command on
    /// the other facts (no refusal depends on the changed tracks), so a refused command
    /// changes nothing. A target here needs no such step: the command's gates hold its
    /// hosts off.
    fn target_changed(
        &self,
        command: &SessionCommand,
        record: &SessionRecord,
        facts: &session_core::Facts,
        source: &Volume,
        target: &dyn Target,
    ) -> Result<Vec<u64>> {
        let mut scratch = VolumeChanges::new();
        if target.remote().is_some() {
            session_core::decide(command, record.clone(), facts)
                .map_err(|refusal| self.refusal(command, &record.describe(), source, refusal))?;
            for operation in session_core::detach(record) {
                target.apply(&mut scratch, operation)?;
            }
        }
        let answer = target.apply(
            &mut scratch,
            TargetOperation::ChangedTracks { session: record.id },
        )?;
        target::tracks_answer(target, answer)
    }

    /// Carries out the session core's decision: the effects in order — a change of the
    /// source into one batch, an operation of the target through the session's
    /// [`Target`] — then the batch with the session's new record (or its removal).
    /// Returns the releases owed to a target on another node, for the command to deliver
    /// once its gates are released.
    fn execute(
        &self,
        id: SessionId,
        decision: session_core::Decision,
        source: &Volume,
        target: &dyn Target,
    ) -> Result<ReleasesInHand<'_, E>> {
        crate::failpoints::hit("node::session::change")?;
        let mut changes = VolumeChanges::new();
        let mut after_commit = Vec::new();
        let mut releases = ReleasesInHand::new(self);
        for effect in decision.effects {
            match effect {
                Effect::TargetAfterCommit(operation) => after_commit.push(operation),
                Effect::Drain => self.drain(id, source, target)?,
                Effect::TakeSlot(slot) => changes.take_slot(source, slot)?,
                Effect::FreeSlot(slot) => changes.free_slot(source, slot)?,
                Effect::SourceBits { bits, extents, set } => {
                    for extent in extents {
                        changes.change_bits(source, bits, extent, set)?;
                    }
                }
                Effect::SourceMarks {
                    slot,
                    changed,
                    pending,
                } => {
                    let mut marks = changes.marks(source)?;
                    for (mark, value) in
                        [(&mut marks.changed, changed), (&mut marks.pending, pending)]
                    {
                        match value {
                            Some(true) => *mark |= 1 << slot,
                            Some(false) => *mark &= !(1 << slot),
                            None => {}
                        }
                    }
                    changes.set_marks(source, marks)?;
                }
                Effect::TargetTakeOver => target.take_over(&mut changes)?,
                Effect::Target(operation @ TargetOperation::Release { .. }) => {
                    if let Some(owed) = target.end(&mut changes, operation)? {
                        releases.hold(owed, self.target_timeout(id));
                    }
                }
                Effect::Target(operation) => {
                    target.apply(&mut changes, operation)?;
                }
            }
        }
        self.commit(changes, id, decision.record.as_ref())?;
        for operation in after_commit {
            // The command is done; what is left over does no harm but looks stale (the
            // next split clears a BCV's changed tracks anyway).
            let mut changes = VolumeChanges::new();
            let outcome = target
                .apply(&mut changes, operation.clone())
                .and_then(|_| self.store.commit(changes));
            if let Err(error) = outcome {
                tracing::warn!(session = id, %error, ?operation, "a target's operation after the command's commit failed; the command is done");
            }
        }
        Ok(releases)
    }

    /// Copies what an async mirror has not shipped yet, with host IO held off: a split
    /// must give the BCV the standard's image at the instant of the split.
    fn drain(&self, id: SessionId, standard: &Volume, bcv: &dyn Target) -> Result<()> {
        let slot = self
            .table
            .lock()
            .sessions
            .get(&id)
            .map(|live| live.record.slot)
            .ok_or_else(|| Error::SessionNotFound {
                kind: "mirror".to_string(),
                volume: format!("session {id}"),
                role: "BCV".to_string(),
            })?;
        // The pending tracks go in groups, each group's on parallel streams to a target
        // on another node: the standard's hosts wait for the whole drain, so it costs one
        // round trip a group, not one a track. Each store is synced on the target.
        let tracks = self.tracks_with(standard, Bits::Pending(slot))?;
        for group in tracks.chunks(bcv.step_tracks_max()) {
            self.ship(id, standard, bcv, slot, group, Durability::Synced)?;
        }
        self.store.flush()
    }

    /// The session restoring `standard`, if one is.
    pub(super) fn restoring(&self, standard: &str) -> Option<String> {
        self.table
            .lock()
            .sessions
            .values()
            .find(|live| {
                live.record.source == standard && live.record.state == SessionState::Restoring
            })
            .map(|live| live.record.describe())
    }

    pub(super) fn involves_as_source(&self, name: &str) -> bool {
        self.table
            .lock()
            .sessions
            .values()
            .any(|live| live.record.source == name)
    }

    /// Every track of `volume` whose chosen bit is set, in order.
    pub(super) fn tracks_with(&self, volume: &Volume, bits: Bits) -> Result<Vec<u64>> {
        let mut tracks = Vec::new();
        self.store
            .for_each_set(volume, bits, volume.whole(), &mut |track| {
                tracks.push(track);
                true
            })?;
        Ok(tracks)
    }

    /// Marks the mirrors whose standard is `volume` changed (and pending, when attached)
    /// on `tracks`, or on every track: seed 002's BFM bits at a split of `volume`.
    pub(super) fn mark_downstream_into<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        volume: &'a Volume,
        tracks: Option<&[u64]>,
    ) -> Result<()> {
        let downstream: Vec<u8> = self
            .table
            .lock()
            .sessions
            .values()
            .filter(|live| {
                live.record.kind == SessionKind::Mirror && live.record.source == volume.name
            })
            .map(|live| live.record.slot)
            .collect();
        let marks = changes.marks(volume)?;
        let extents = match tracks {
            None => vec![volume.whole()],
            Some(tracks) => session_core::runs(tracks),
        };
        for slot in downstream {
            let attached = marks.pending & (1 << slot) != 0;
            for extent in &extents {
                changes.change_bits(volume, Bits::Session(slot), *extent, true)?;
                if attached {
                    changes.change_bits(volume, Bits::Pending(slot), *extent, true)?;
                }
            }
        }
        Ok(())
    }
}
