//! Change bitmaps for copy sessions, as pure chunk arithmetic and a merge function.
//!
//! A volume has [`SESSION_SLOTS_MAX`] session slots; each is a changed bit per track
//! (seed 002's PB table), stored as one 16-bit word per track, so 16 slots cost exactly
//! 2 bytes per track. A volume also has a target-changed bit per track (seed 002's M4b),
//! stored one bit per track. Each slot also has a pending bit per track (seed 002's moving
//! mirror bits: the track must still be copied to the session's target), stored like the
//! changed bits, and a volume has an invalid bit per track (seed 001's indirect list: the
//! track is not valid here yet and must first be pulled from its source), stored like the
//! target-changed bits. All are split into chunks of [`TRACKS_PER_CHUNK`] tracks,
//! one key each, and changed only through merge operands, so a host write marks its
//! tracks in the same write batch as its data without reading anything first.

/// Session slots per volume (seed 002: 16 sessions per standard volume).
pub const SESSION_SLOTS_MAX: usize = 16;
/// Tracks covered by one stored bitmap chunk.
pub const TRACKS_PER_CHUNK: u64 = 4096;
/// Bytes of a session chunk: one 16-bit word per track.
pub const SESSION_CHUNK_BYTES: usize = TRACKS_PER_CHUNK as usize * 2;
/// Bytes of a target-changed chunk: one bit per track.
pub const TARGET_CHUNK_BYTES: usize = TRACKS_PER_CHUNK as usize / 8;

/// Which of a volume's bitmaps a chunk belongs to; the key's kind byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapKind {
    /// A changed bit per slot per track (seed 002's PB table; seed 001's clone lists).
    Sessions,
    /// A pending bit per slot per track: still to be copied to the slot's target.
    Pending,
    /// One bit per track: written by a host since the volume was split from its standard.
    TargetChanged,
    /// One bit per track: not valid yet, to be pulled from the session's source first.
    Invalid,
}

impl BitmapKind {
    fn tag(self) -> u8 {
        match self {
            BitmapKind::Sessions => b'S',
            BitmapKind::Pending => b'P',
            BitmapKind::TargetChanged => b'T',
            BitmapKind::Invalid => b'I',
        }
    }

    fn chunk_bytes(self) -> usize {
        if self.per_slot() {
            SESSION_CHUNK_BYTES
        } else {
            TARGET_CHUNK_BYTES
        }
    }

    /// Whether the kind holds a 16-bit word of slots per track, or a single bit.
    pub fn per_slot(self) -> bool {
        matches!(self, BitmapKind::Sessions | BitmapKind::Pending)
    }
}

/// The key of one chunk: volume, kind, chunk index — big-endian so a volume's chunks sort
/// together and in track order.
pub fn chunk_key(volume: u64, kind: BitmapKind, chunk: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[..8].copy_from_slice(&volume.to_be_bytes());
    key[8] = kind.tag();
    key[9..].copy_from_slice(&chunk.to_be_bytes());
    key
}

/// The key range holding every chunk of a volume, for deletion.
pub fn volume_key_range(volume: u64) -> ([u8; 8], [u8; 8]) {
    (volume.to_be_bytes(), (volume + 1).to_be_bytes())
}

/// One change to a chunk: set or clear `mask` on the tracks `first..=last` (chunk-relative).
/// For the target-changed kind the mask is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkChange {
    pub set: bool,
    pub first: u16,
    pub last: u16,
    pub mask: u16,
}

const CHANGE_BYTES: usize = 7;

/// Encodes changes as a merge operand: a plain sequence, so concatenation is a valid
/// partial merge and the full merge applies them in order.
pub fn encode_changes(changes: &[ChunkChange]) -> Vec<u8> {
    let mut operand = Vec::with_capacity(changes.len() * CHANGE_BYTES);
    for change in changes {
        operand.push(u8::from(change.set));
        operand.extend_from_slice(&change.first.to_be_bytes());
        operand.extend_from_slice(&change.last.to_be_bytes());
        operand.extend_from_slice(&change.mask.to_be_bytes());
    }
    operand
}

fn decode_changes(operand: &[u8]) -> Option<impl Iterator<Item = ChunkChange> + '_> {
    if !operand.len().is_multiple_of(CHANGE_BYTES) {
        return None;
    }
    Some(
        operand
            .chunks_exact(CHANGE_BYTES)
            .map(|record| ChunkChange {
                set: record[0] != 0,
                first: u16::from_be_bytes([record[1], record[2]]),
                last: u16::from_be_bytes([record[3], record[4]]),
                mask: u16::from_be_bytes([record[5], record[6]]),
            }),
    )
}

fn kind_of_key(key: &[u8]) -> Option<BitmapKind> {
    match key.get(8) {
        Some(b'S') => Some(BitmapKind::Sessions),
        Some(b'P') => Some(BitmapKind::Pending),
        Some(b'T') => Some(BitmapKind::TargetChanged),
        Some(b'I') => Some(BitmapKind::Invalid),
        _ => None,
    }
}

/// Applies one change to a chunk value of the given kind.
fn apply(kind: BitmapKind, chunk: &mut [u8], change: ChunkChange) {
    let last = (change.last as usize).min(TRACKS_PER_CHUNK as usize - 1);
    for track in change.first as usize..=last {
        if kind.per_slot() {
            let word = u16::from_le_bytes([chunk[track * 2], chunk[track * 2 + 1]]);
            let word = if change.set {
                word | change.mask
            } else {
                word & !change.mask
            };
            chunk[track * 2..track * 2 + 2].copy_from_slice(&word.to_le_bytes());
        } else if change.set {
            chunk[track / 8] |= 1 << (track % 8);
        } else {
            chunk[track / 8] &= !(1 << (track % 8));
        }
    }
}

/// The full merge: start from the stored chunk (or all clear) and apply every operand.
/// Returns `None` (a merge failure RocksDB reports) only for a key or operand this code
/// did not write, which means corruption.
pub fn full_merge<'a>(
    key: &[u8],
    existing: Option<&[u8]>,
    operands: impl IntoIterator<Item = &'a [u8]>,
) -> Option<Vec<u8>> {
    let kind = kind_of_key(key)?;
    let mut chunk = match existing {
        Some(bytes) if bytes.len() == kind.chunk_bytes() => bytes.to_vec(),
        Some(_) => return None,
        None => vec![0u8; kind.chunk_bytes()],
    };
    for operand in operands {
        for change in decode_changes(operand)? {
            apply(kind, &mut chunk, change);
        }
    }
    Some(chunk)
}

/// The partial merge: operands are sequences, so joining them keeps their order.
pub fn partial_merge<'a>(operands: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut joined = Vec::new();
    for operand in operands {
        if operand.len() % CHANGE_BYTES != 0 {
            return None;
        }
        joined.extend_from_slice(operand);
    }
    Some(joined)
}

/// Reads one track's bit for `slot` (sessions) or its target-changed bit from a chunk.
pub fn test_bit(kind: BitmapKind, chunk: &[u8], track_in_chunk: usize, slot: u8) -> bool {
    if kind.per_slot() {
        let word = u16::from_le_bytes([chunk[track_in_chunk * 2], chunk[track_in_chunk * 2 + 1]]);
        word & (1 << slot) != 0
    } else {
        chunk[track_in_chunk / 8] & (1 << (track_in_chunk % 8)) != 0
    }
}

/// Where a chunk key points: its volume, kind and chunk index; `None` for a key this
/// module did not make.
pub fn parse_chunk_key(key: &[u8]) -> Option<(u64, BitmapKind, u64)> {
    if key.len() != 17 {
        return None;
    }
    let kind = kind_of_key(key)?;
    let volume = u64::from_be_bytes(key[..8].try_into().ok()?);
    let chunk = u64::from_be_bytes(key[9..].try_into().ok()?);
    Some((volume, kind, chunk))
}

/// Set bits per slot in one stored chunk (a single-bit kind counts in slot 0). A chunk of
/// the wrong size counts as empty: the merge refuses to produce one.
pub fn count_chunk(kind: BitmapKind, chunk: &[u8]) -> [u32; SESSION_SLOTS_MAX] {
    let mut counts = [0u32; SESSION_SLOTS_MAX];
    if chunk.len() != kind.chunk_bytes() {
        return counts;
    }
    if kind.per_slot() {
        for pair in chunk.chunks_exact(2) {
            let mut word = u16::from_le_bytes([pair[0], pair[1]]);
            while word != 0 {
                counts[word.trailing_zeros() as usize] += 1;
                word &= word - 1;
            }
        }
    } else {
        counts[0] = chunk.iter().map(|byte| byte.count_ones()).sum();
    }
    counts
}

/// Splits the inclusive track range `first..=last` into per-chunk changes.
pub fn changes_by_chunk(first: u64, last: u64, set: bool, mask: u16) -> Vec<(u64, ChunkChange)> {
    let mut changes = Vec::new();
    let mut track = first;
    while track <= last {
        let chunk = track / TRACKS_PER_CHUNK;
        let chunk_last = (chunk + 1) * TRACKS_PER_CHUNK - 1;
        let end = last.min(chunk_last);
        changes.push((
            chunk,
            ChunkChange {
                set,
                first: (track % TRACKS_PER_CHUNK) as u16,
                last: (end % TRACKS_PER_CHUNK) as u16,
                mask,
            },
        ));
        track = end + 1;
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_sets_exactly_its_tracks_and_mask() {
        let key = chunk_key(1, BitmapKind::Sessions, 0);
        let operand = encode_changes(&[ChunkChange {
            set: true,
            first: 3,
            last: 5,
            mask: 0b101,
        }]);
        let chunk = full_merge(&key, None, [operand.as_slice()]).unwrap();
        for track in 0..10 {
            let inside = (3..=5).contains(&track);
            assert_eq!(test_bit(BitmapKind::Sessions, &chunk, track, 0), inside);
            assert!(!test_bit(BitmapKind::Sessions, &chunk, track, 1));
            assert_eq!(test_bit(BitmapKind::Sessions, &chunk, track, 2), inside);
        }
    }

    #[test]
    fn partial_merge_then_full_merge_equals_full_merge_of_all() {
        let key = chunk_key(9, BitmapKind::TargetChanged, 2);
        let first = encode_changes(&[ChunkChange {
            set: true,
            first: 0,
            last: 100,
            mask: 1,
        }]);
        let second = encode_changes(&[ChunkChange {
            set: false,
            first: 50,
            last: 60,
            mask: 1,
        }]);
        let joined = partial_merge([first.as_slice(), second.as_slice()]).unwrap();
        let direct = full_merge(&key, None, [first.as_slice(), second.as_slice()]).unwrap();
        let staged = full_merge(&key, None, [joined.as_slice()]).unwrap();
        assert_eq!(direct, staged);
        assert!(test_bit(BitmapKind::TargetChanged, &direct, 49, 0));
        assert!(!test_bit(BitmapKind::TargetChanged, &direct, 55, 0));
        assert!(test_bit(BitmapKind::TargetChanged, &direct, 61, 0));
    }

    #[test]
    fn ranges_split_at_chunk_boundaries() {
        let changes = changes_by_chunk(4090, 8200, true, 1);
        let chunks: Vec<u64> = changes.iter().map(|(chunk, _)| *chunk).collect();
        assert_eq!(chunks, vec![0, 1, 2]);
        assert_eq!((changes[0].1.first, changes[0].1.last), (4090, 4095));
        assert_eq!((changes[1].1.first, changes[1].1.last), (0, 4095));
        assert_eq!((changes[2].1.first, changes[2].1.last), (0, 8));
    }

    #[test]
    fn a_chunk_counts_each_slots_bits_and_a_key_reads_back() {
        let key = chunk_key(42, BitmapKind::Pending, 3);
        assert_eq!(parse_chunk_key(&key), Some((42, BitmapKind::Pending, 3)));
        assert_eq!(parse_chunk_key(b"short"), None);
        let operand = encode_changes(&[
            ChunkChange {
                set: true,
                first: 0,
                last: 99,
                mask: 0b101,
            },
            ChunkChange {
                set: false,
                first: 10,
                last: 19,
                mask: 0b1,
            },
            ChunkChange {
                set: true,
                first: 4095,
                last: 4095,
                mask: 1 << 15,
            },
        ]);
        let chunk = full_merge(&key, None, [operand.as_slice()]).unwrap();
        let counts = count_chunk(BitmapKind::Pending, &chunk);
        assert_eq!(
            (counts[0], counts[1], counts[2], counts[15]),
            (90, 0, 100, 1)
        );
        let single = chunk_key(42, BitmapKind::Invalid, 0);
        let operand = encode_changes(&[ChunkChange {
            set: true,
            first: 7,
            last: 4000,
            mask: 1,
        }]);
        let chunk = full_merge(&single, None, [operand.as_slice()]).unwrap();
        assert_eq!(count_chunk(BitmapKind::Invalid, &chunk)[0], 3994);
        assert_eq!(count_chunk(BitmapKind::Invalid, &[1, 2, 3])[0], 0);
    }

    #[test]
    fn foreign_operands_and_keys_fail_the_merge() {
        let key = chunk_key(1, BitmapKind::Sessions, 0);
        assert!(full_merge(&key, None, [&[1u8, 2, 3][..]]).is_none());
        assert!(full_merge(b"short", None, [&[][..]]).is_none());
        assert!(full_merge(&key, Some(&[0u8; 3]), [&[][..]]).is_none());
    }
}
