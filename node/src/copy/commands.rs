//! Session commands: each checks the state table and the volumes, then changes slots,
//! write marks, readiness, bits and the session's record in one engine batch
//! ([`VolumeChanges`]), so a crash leaves it done or not done. Calls to a target on another
//! node come first (they are idempotent, and a registration nobody uses is released when
//! the command fails); the command's gates are held throughout.

use super::*;
use crate::store::VolumeChanges;
use std::collections::BTreeSet;

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
        self.command_under_gates(command, remote)
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

    fn command_under_gates(
        &self,
        command: SessionCommand,
        remote: Option<RemoteVolume>,
    ) -> Result<Option<SessionInfo>> {
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
                if self.carry_out(&command, record)?.is_none() {
                    return Ok(None);
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
        self.show(kind, &target).map(Some)
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
        let table = self.table.lock();
        if let Some(other) = table
            .sessions
            .values()
            .find(|live| live.record.target == target.name)
        {
            return Err(refused(
                command,
                &session,
                format!(
                    "'{}' is already the target of {} (state {}): end that session first or choose another volume",
                    target.name,
                    other.record.describe(),
                    other.record.state
                ),
            ));
        }
        Ok(())
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
        let partner = match &remote {
            None => {
                let target = self.store.volume(target)?;
                self.check_pair(command, &source, &target)?;
                for extent in &extents {
                    if extent.last >= target.track_count() {
                        return Err(Error::ExtentOutOfRange {
                            name: target.name.clone(),
                            extent: *extent,
                            last_track: target.track_count() - 1,
                        });
                    }
                }
                Partner::Local(target)
            }
            Some(remote) => {
                // The destination's node takes the volume for this session first; it
                // refuses one that already takes part in a session there.
                let (track_size_bytes, track_count) =
                    self.register_remote(id, SessionKind::Clone, &source, remote)?;
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
                    let _ = self.remote_call(remote, TargetOperation::Unregister { session: id });
                    return Err(refused(command, &session, problem));
                }
                Partner::Remote(remote.clone())
            }
        };
        let release = |error: Error| {
            if let Some(remote) = &remote {
                let _ = self.remote_call(remote, TargetOperation::Unregister { session: id });
            }
            error
        };
        let mut changes = VolumeChanges::new();
        // Slots first: a 17th session fails here, before anything else changes. A clone's
        // slots are not marked by host writes: its driver moves their bits itself.
        let slot = changes.allocate_slot(&source).map_err(release)?;
        let precopy_slot = if *precopy {
            Some(changes.allocate_slot(&source).map_err(release)?)
        } else {
            None
        };
        // The destination's lists before the source's: a copy must never find a source
        // bit whose destination track is not marked missing. Here that holds by the one
        // batch; a destination on another node marks them before the batch is written.
        match &partner {
            Partner::Local(target) => {
                for extent in &extents {
                    changes.change_bits(target, Bits::Invalid, *extent, true)?;
                }
                changes.set_readiness(target, Readiness::NotReady)?;
                // The clone replaces the destination's data: it is no longer a snapshot.
                changes.forget_snapshot_origin(target)?;
            }
            Partner::Remote(remote) => {
                crate::failpoints::hit("node::clone-create::before-mark-invalid")
                    .map_err(release)?;
                self.remote_call(
                    remote,
                    TargetOperation::MarkInvalid {
                        session: id,
                        extents: extents.clone(),
                    },
                )
                .map_err(release)?;
                self.remote_call(
                    remote,
                    TargetOperation::SetReadiness {
                        session: id,
                        readiness: Readiness::NotReady,
                    },
                )
                .map_err(release)?;
            }
        }
        for extent in &extents {
            changes.change_bits(&source, Bits::Session(slot), *extent, true)?;
        }
        let tracks_total = extents
            .iter()
            .map(|extent| extent.last - extent.first + 1)
            .sum();
        let record = SessionRecord {
            id,
            kind: SessionKind::Clone,
            source: source.name.clone(),
            target: target.clone(),
            state: if *precopy {
                SessionState::Precopying
            } else {
                SessionState::Created
            },
            mode: MirrorMode::default(),
            slot,
            precopy_slot,
            extents,
            created_unix_seconds: now_unix_seconds(),
            split_sequence: 0,
            split_when_synchronized: false,
            progress: Progress::start(tracks_total),
            tracks_copied_last: 0,
            rate_limit_mebibytes_per_second: None,
            error: None,
            remote: remote.clone(),
            last_error: None,
            strict: false,
            target_timeout_milliseconds: TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
            resume_state: None,
        };
        self.commit(changes, id, Some(&record)).map_err(release)?;
        tracing::info!(session = record.id, source = %record.source, target = %record.target, precopy, "clone created");
        Ok(())
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
        if let Some(mut record) = existing {
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
            record.mode = *mode;
            record.strict = *strict;
            record.target_timeout_milliseconds = target_timeout_milliseconds;
            self.carry_out(command, record)?;
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
                let (track_size_bytes, track_count) =
                    self.register_remote(id, SessionKind::Mirror, &standard, remote)?;
                (remote.volume.clone(), track_size_bytes, track_count)
            }
        };
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
        let release = |error: Error| {
            if let Some(remote) = &remote {
                let _ = self.remote_call(remote, TargetOperation::Unregister { session: id });
            }
            error
        };
        if let Some(problem) = problem {
            return Err(release(refused(
                command,
                &format!("{} -> {bcv_name}", standard.name),
                problem,
            )));
        }
        let partner = match &remote {
            None => Partner::Local(self.store.volume(bcv)?),
            Some(remote) => Partner::Remote(remote.clone()),
        };
        let mut changes = VolumeChanges::new();
        let slot = changes.allocate_slot(&standard).map_err(release)?;
        let record = SessionRecord {
            id,
            kind: SessionKind::Mirror,
            source: standard.name.clone(),
            target: bcv_name,
            state: SessionState::Split,
            mode: *mode,
            slot,
            precopy_slot: None,
            extents: vec![standard.whole()],
            created_unix_seconds: now_unix_seconds(),
            split_sequence: 0,
            split_when_synchronized: false,
            progress: Progress::default(),
            tracks_copied_last: 0,
            rate_limit_mebibytes_per_second: None,
            error: None,
            remote: remote.clone(),
            last_error: None,
            strict: *strict,
            target_timeout_milliseconds,
            resume_state: None,
        };
        if let Partner::Local(bcv) = &partner {
            // The mirror replaces the BCV's data: it is no longer a snapshot.
            changes.forget_snapshot_origin(bcv)?;
        }
        // A new pair starts as if split with everything changed: establishing it is then
        // the same path as re-establishing a known pair.
        let record = self
            .change(&mut changes, command, record, &standard, &partner)
            .map_err(release)?
            .expect("establish keeps the session");
        self.commit(changes, id, Some(&record)).map_err(release)?;
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
        let source = self.store.volume(&record.source)?;
        let partner = self.partner(&record)?;
        let mut changes = VolumeChanges::new();
        let mut record = self
            .change(&mut changes, &reestablish, record, &source, &partner)?
            .expect("reestablish keeps the session");
        record.split_when_synchronized = true;
        self.commit(changes, record.id, Some(&record))?;
        Ok(bcv)
    }

    /// Carries out a command on an existing session: its changes and its new record (or
    /// the record's removal) in one batch. Returns the record as stored, `None` when the
    /// command ended the session.
    pub(super) fn carry_out(
        &self,
        command: &SessionCommand,
        record: SessionRecord,
    ) -> Result<Option<SessionRecord>> {
        let id = record.id;
        let source = self.store.volume(&record.source)?;
        let partner = self.partner(&record)?;
        let mut changes = VolumeChanges::new();
        let outcome = self.change(&mut changes, command, record, &source, &partner)?;
        self.commit(changes, id, outcome.as_ref())?;
        Ok(outcome)
    }

    /// The effects of a command on an existing session, added to `changes` (a target on
    /// another node is told first); `None` when it ends the session.
    fn change<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        command: &SessionCommand,
        mut record: SessionRecord,
        source: &'a Volume,
        partner: &'a Partner,
    ) -> Result<Option<SessionRecord>> {
        let transition = match command {
            SessionCommand::ClonePrecopy { .. } => Transition::Precopy,
            SessionCommand::CloneActivate { .. } => Transition::Activate,
            SessionCommand::CloneTerminate { .. } => Transition::Terminate,
            SessionCommand::CloneCancel { .. } => Transition::Cancel,
            SessionCommand::MirrorEstablish { .. } => Transition::Establish,
            SessionCommand::MirrorSplit { .. } => Transition::Split,
            SessionCommand::MirrorReestablish { .. } => Transition::Reestablish,
            SessionCommand::MirrorRestore { .. } => Transition::Restore,
            SessionCommand::MirrorCancel { .. } => Transition::Cancel,
            SessionCommand::CloneCreate { .. }
            | SessionCommand::MirrorRotate { .. }
            | SessionCommand::SetRate { .. } => unreachable!("handled by command"),
        };
        let next = next_state(record.kind, record.state, transition)
            .map_err(|reason| refused(command, &record.describe(), reason))?;
        let whole = source.whole();
        crate::failpoints::hit("node::session::change")?;
        match command {
            SessionCommand::ClonePrecopy { .. } => {
                if record.precopy_slot.is_none() {
                    record.precopy_slot = Some(changes.allocate_slot(source)?);
                }
                // The clone's total stays: a precopy moves the tracks it counted.
            }
            SessionCommand::CloneActivate { .. } => {
                // Seed 001 FIG. 8: a precopied track needs no further copy.
                if let Some(slot) = record.precopy_slot {
                    changes.change_bits(source, Bits::Session(slot), whole, false)?;
                }
                self.target_readiness(changes, record.id, partner, Readiness::Ready)?;
                record.tracks_copied_last = 0;
                // The clone's total stays: what the precopy moved counts as copied.
            }
            SessionCommand::CloneTerminate { .. } => {
                if let Partner::Remote(remote) = partner {
                    self.remote_call(remote, TargetOperation::Unregister { session: record.id })?;
                }
                changes.free_slot(source, record.slot)?;
                if let Some(slot) = record.precopy_slot {
                    changes.free_slot(source, slot)?;
                }
                tracing::info!(session = record.id, "clone terminated");
                return Ok(None);
            }
            SessionCommand::CloneCancel { .. } => {
                self.cancel_clone(changes, &record, source, partner)?;
                return Ok(None);
            }
            SessionCommand::MirrorEstablish { .. } => {
                // Seed 002 step 114: every track changed; step 110: every track to copy.
                changes.change_bits(source, Bits::Session(record.slot), whole, true)?;
                changes.change_bits(source, Bits::Pending(record.slot), whole, true)?;
                self.attach(changes, &record, source, partner)?;
                record.progress = Progress::start(source.track_count());
                record.tracks_copied_last = 0;
                record.split_when_synchronized = false;
            }
            SessionCommand::MirrorReestablish { .. } => {
                // Seed 002 FIG. 6: copy what changed on either side. A track the BCV's
                // hosts changed also counts as changed since the split, so a cascade
                // below the BCV gets it at the next differential split.
                let mut bcv_changed = self.partner_changed_tracks(record.id, partner)?;
                bcv_changed.retain(|track| *track <= whole.last);
                let changed: BTreeSet<u64> = self
                    .tracks_with(source, Bits::Session(record.slot))?
                    .into_iter()
                    .chain(bcv_changed.iter().copied())
                    .collect();
                let pending: BTreeSet<u64> = self
                    .tracks_with(source, Bits::Pending(record.slot))?
                    .into_iter()
                    .chain(changed.iter().copied())
                    .collect();
                for run in runs(&bcv_changed) {
                    changes.change_bits(source, Bits::Session(record.slot), run, true)?;
                }
                for run in runs(&changed.iter().copied().collect::<Vec<_>>()) {
                    changes.change_bits(source, Bits::Pending(record.slot), run, true)?;
                }
                self.attach(changes, &record, source, partner)?;
                // Host IO is held off: these are exactly the tracks this copy moves.
                record.progress = Progress::start(pending.len() as u64);
                record.tracks_copied_last = 0;
                record.split_when_synchronized = false;
            }
            SessionCommand::MirrorSplit { differential, .. } => {
                if let Some(restoring) = self.restoring(&record.source) {
                    return Err(refused(
                        command,
                        &record.describe(),
                        format!("{restoring} is restoring the standard; split once it is done"),
                    ));
                }
                self.drain(&record, source, partner)?;
                self.split(changes, &record, source, partner, *differential)?;
                let sequence = self
                    .table
                    .lock()
                    .sessions
                    .values()
                    .map(|live| live.record.split_sequence)
                    .max()
                    .unwrap_or(0)
                    + 1;
                record.split_sequence = sequence;
                record.split_when_synchronized = false;
            }
            SessionCommand::MirrorRestore { incremental, .. } => {
                let total =
                    self.restore(changes, command, &record, source, partner, *incremental)?;
                record.progress = Progress::start(total);
                record.tracks_copied_last = 0;
            }
            SessionCommand::MirrorCancel { .. } => {
                if self.cancel_unanswered(changes, &record, source)? {
                    return Ok(None);
                }
                self.target_tracking(changes, record.id, partner, false)?;
                if record.state == SessionState::Synchronized {
                    // The BCV holds the standard's whole image: give it to its hosts.
                    self.target_readiness(changes, record.id, partner, Readiness::Ready)?;
                }
                if let Partner::Remote(remote) = partner {
                    self.remote_call(remote, TargetOperation::Unregister { session: record.id })?;
                }
                changes.free_slot(source, record.slot)?;
                tracing::info!(session = record.id, "mirror cancelled");
                return Ok(None);
            }
            _ => unreachable!("handled above"),
        }
        record.state = next.expect("only terminate and cancel end a session");
        record.error = None;
        Ok(Some(record))
    }

    /// The target's readiness: in the command's batch when the target is here, at once
    /// on its node otherwise.
    fn target_readiness<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        session: SessionId,
        target: &'a Partner,
        readiness: Readiness,
    ) -> Result<()> {
        match target {
            Partner::Local(volume) => changes.set_readiness(volume, readiness),
            Partner::Remote(remote) => self
                .remote_call(remote, TargetOperation::SetReadiness { session, readiness })
                .map(drop),
        }
    }

    /// Turns the tracking of the target's host writes on or off, clearing what it held:
    /// in the command's batch when the target is here, at once on its node otherwise.
    fn target_tracking<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        session: SessionId,
        target: &'a Partner,
        tracking: bool,
    ) -> Result<()> {
        match target {
            Partner::Local(volume) => changes.set_target_tracking(volume, tracking),
            Partner::Remote(remote) => self
                .remote_call(remote, TargetOperation::TrackChanges { session, tracking })
                .map(drop),
        }
    }

    /// Undoes a clone that was never activated: its destination never went to hosts, so
    /// nothing depends on what it holds. The destination's invalid bits stood for tracks
    /// this clone owed it; owed by nobody now, they are cleared, so no later session takes
    /// them for a clone's missing tracks. The destination stays not-ready with partial
    /// contents until something overwrites it or it is deleted; the source's slots (and
    /// their bits) are freed.
    fn cancel_clone<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        record: &SessionRecord,
        source: &'a Volume,
        destination: &'a Partner,
    ) -> Result<()> {
        match destination {
            Partner::Local(destination) => {
                for extent in &record.extents {
                    changes.change_bits(destination, Bits::Invalid, *extent, false)?;
                }
            }
            Partner::Remote(remote) => {
                self.remote_call(
                    remote,
                    TargetOperation::ClearInvalid {
                        session: record.id,
                        extents: record.extents.clone(),
                    },
                )?;
                self.remote_call(remote, TargetOperation::Unregister { session: record.id })?;
            }
        }
        changes.free_slot(source, record.slot)?;
        if let Some(slot) = record.precopy_slot {
            changes.free_slot(source, slot)?;
        }
        tracing::info!(session = record.id, source = %record.source, target = %record.target, "clone cancelled; the destination stays not-ready with partial contents");
        Ok(())
    }

    /// Connects a BCV to its standard: host writes mark the session changed and pending,
    /// the BCV is not ready to its own hosts, and its own writes are no longer tracked.
    fn attach<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        record: &SessionRecord,
        standard: &'a Volume,
        bcv: &'a Partner,
    ) -> Result<()> {
        let mut marks = changes.marks(standard)?;
        marks.changed |= 1 << record.slot;
        marks.pending |= 1 << record.slot;
        self.target_readiness(changes, record.id, bcv, Readiness::NotReady)?;
        self.target_tracking(changes, record.id, bcv, false)?;
        changes.set_marks(standard, marks)
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

    /// Copies what an async mirror has not shipped yet, with host IO held off: a split
    /// must give the BCV the standard's image at the instant of the split.
    fn drain(&self, record: &SessionRecord, standard: &Volume, bcv: &Partner) -> Result<()> {
        for track in self.tracks_with(standard, Bits::Pending(record.slot))? {
            self.ship(
                record.id,
                standard,
                bcv,
                track,
                &[BitChange {
                    volume: standard,
                    bits: Bits::Pending(record.slot),
                    track,
                    set: false,
                }],
                Durability::Synced,
            )?;
        }
        self.store.flush()
    }

    /// Seed 002 FIG. 5: detach the BCV with the image of this instant, mark its own
    /// downstream sessions (all tracks, or with `differential` those changed since the
    /// last split), clear the session's changed bits and give the BCV to its hosts.
    fn split<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        record: &SessionRecord,
        standard: &'a Volume,
        bcv: &'a Partner,
        differential: bool,
    ) -> Result<()> {
        let tracks = if differential {
            Some(self.tracks_with(standard, Bits::Session(record.slot))?)
        } else {
            None
        };
        match bcv {
            Partner::Local(volume) => {
                self.mark_downstream_into(changes, volume, tracks.as_deref())?
            }
            Partner::Remote(remote) => {
                self.remote_call(
                    remote,
                    TargetOperation::MarkDownstream {
                        session: record.id,
                        tracks,
                    },
                )?;
            }
        }
        changes.change_bits(
            standard,
            Bits::Session(record.slot),
            standard.whole(),
            false,
        )?;
        let mut marks = changes.marks(standard)?;
        marks.pending &= !(1 << record.slot);
        changes.set_marks(standard, marks)?;
        self.target_tracking(changes, record.id, bcv, true)?;
        self.target_readiness(changes, record.id, bcv, Readiness::Ready)?;
        Ok(())
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
            Some(tracks) => runs(tracks),
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

    /// Seed 002 FIGS. 7 and 8: the standard's tracks to restore become invalid (a host
    /// access pulls them from the BCV first), this session's changed bits clear, and every
    /// other mirror of the standard gets the restored tracks marked changed. Returns the
    /// number of tracks to restore.
    fn restore<'a>(
        &self,
        changes: &mut VolumeChanges<'a>,
        command: &SessionCommand,
        record: &SessionRecord,
        standard: &'a Volume,
        bcv: &'a Partner,
        incremental: bool,
    ) -> Result<u64> {
        let invalid = self.partner_invalid_count(record.id, bcv)?;
        if invalid > 0 {
            return Err(refused(
                command,
                &record.describe(),
                format!("the BCV has {invalid} invalid tracks (it is still being filled by a clone); restore from a complete BCV"),
            ));
        }
        if standard.readiness() == Readiness::NotReady {
            return Err(refused(
                command,
                &record.describe(),
                "the standard volume is not ready; make it ready first",
            ));
        }
        let others: Vec<SessionRecord> = self
            .table
            .lock()
            .sessions
            .values()
            .filter(|live| live.record.source == standard.name && live.record.id != record.id)
            .map(|live| live.record.clone())
            .collect();
        if let Some(clone) = others
            .iter()
            .find(|other| other.kind == SessionKind::Clone && other.state != SessionState::Copied)
        {
            return Err(refused(
                command,
                &record.describe(),
                format!(
                    "the standard is the source of {}, which still needs its point-in-time data; let it finish first",
                    clone.describe()
                ),
            ));
        }
        if let Some(restoring) = others
            .iter()
            .find(|other| other.state == SessionState::Restoring)
        {
            return Err(refused(
                command,
                &record.describe(),
                format!(
                    "the standard is already being restored by {}",
                    restoring.describe()
                ),
            ));
        }
        let extents = if incremental {
            // Seed 002 FIG. 8, steps 202-203: changed on the BCV or on the standard.
            let mut tracks: BTreeSet<u64> = self
                .partner_changed_tracks(record.id, bcv)?
                .into_iter()
                .filter(|track| *track <= standard.whole().last)
                .collect();
            tracks.extend(self.tracks_with(standard, Bits::Session(record.slot))?);
            runs(&tracks.into_iter().collect::<Vec<_>>())
        } else {
            vec![standard.whole()]
        };
        // No track of a ready standard is invalid, so these are the tracks to restore.
        let total = extents
            .iter()
            .map(|extent| extent.last - extent.first + 1)
            .sum();
        let standard_marks = changes.marks(standard)?;
        for extent in &extents {
            changes.change_bits(standard, Bits::Invalid, *extent, true)?;
        }
        for other in others
            .iter()
            .filter(|other| other.kind == SessionKind::Mirror)
        {
            let attached = standard_marks.pending & (1 << other.slot) != 0;
            for extent in &extents {
                changes.change_bits(standard, Bits::Session(other.slot), *extent, true)?;
                if attached {
                    changes.change_bits(standard, Bits::Pending(other.slot), *extent, true)?;
                }
            }
        }
        // The changed bit of this session stays clear after the restore (seed: the
        // restored session is "unchanged"), but host writes during the restore set it.
        changes.change_bits(
            standard,
            Bits::Session(record.slot),
            standard.whole(),
            false,
        )?;
        // The BCV goes back to being the standard's mirror: not ready to its own hosts,
        // host writes to the standard reach it once the restore is done.
        self.attach(changes, record, standard, bcv)?;
        Ok(total)
    }
}

/// The runs of consecutive tracks in `tracks` (sorted, without repeats), as extents: a
/// command marks a run with one bitmap operand per chunk instead of one per track.
fn runs(tracks: &[u64]) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for track in tracks {
        match extents.last_mut() {
            Some(run) if run.last + 1 == *track => run.last = *track,
            _ => extents.push(Extent {
                first: *track,
                last: *track,
            }),
        }
    }
    extents
}

#[cfg(test)]
mod tests {
    use super::runs;
    use protocol::messages::Extent;

    #[test]
    fn runs_join_consecutive_tracks() {
        let extent = |first, last| Extent { first, last };
        assert_eq!(runs(&[]), Vec::<Extent>::new());
        assert_eq!(
            runs(&[1, 2, 3, 7, 9, 10]),
            vec![extent(1, 3), extent(7, 7), extent(9, 10)]
        );
    }
}
