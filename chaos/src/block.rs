//! The bytes the writers put on a volume: every 4 KiB block names the write that put it
//! there, so a block read back tells which write it holds, and a block that belongs to no
//! write (torn, corrupted, or from another block) is told apart from every write's bytes.

/// The unit of every write and check.
pub const BLOCK_BYTES: u64 = 4096;

/// The write id of a block no write has touched: a new volume reads as zeros.
pub const INITIAL_WRITE: u64 = 0;

/// The content write `write_id` puts at block `block`: the id, the block, then words
/// drawn from both, so no two (write, block) pairs share a block's bytes.
pub fn content(write_id: u64, block: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_BYTES as usize];
    if write_id == INITIAL_WRITE {
        return bytes;
    }
    bytes[..8].copy_from_slice(&write_id.to_le_bytes());
    bytes[8..16].copy_from_slice(&block.to_le_bytes());
    let mut state = write_id.rotate_left(17) ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in bytes[16..].chunks_mut(8) {
        // xorshift64: cheap, and enough to make every block's tail its own.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    bytes
}

/// The content of `blocks` blocks from `first` written by one write.
pub fn write_content(write_id: u64, first: u64, blocks: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity((blocks * BLOCK_BYTES) as usize);
    for block in first..first + blocks {
        bytes.extend_from_slice(&content(write_id, block));
    }
    bytes
}

/// Which write a block read back at `block` holds: `Some(id)` when its bytes are exactly
/// that write's (`INITIAL_WRITE` for zeros), `None` when they are no write's at all.
pub fn decode(block: u64, bytes: &[u8]) -> Option<u64> {
    if bytes.len() != BLOCK_BYTES as usize {
        return None;
    }
    let write_id = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    (content(write_id, block) == bytes).then_some(write_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_names_its_write_and_a_changed_byte_names_none() {
        let bytes = content(42, 7);
        assert_eq!(decode(7, &bytes), Some(42));
        assert_eq!(
            decode(7, &vec![0; BLOCK_BYTES as usize]),
            Some(INITIAL_WRITE)
        );
        // The same write's block from elsewhere is not this block's.
        assert_eq!(decode(8, &bytes), None);
        let mut torn = bytes.clone();
        torn[4000] ^= 1;
        assert_eq!(decode(7, &torn), None);
        let write = write_content(9, 3, 2);
        assert_eq!(decode(4, &write[BLOCK_BYTES as usize..]), Some(9));
    }
}
