//! The self-verifying block format (seed 004, claims 2, 19 and 24).
//!
//! A volume's tracks are stored as 4 KiB blocks. Every stored block carries a header with
//! its own address (the layer it belongs to, its track and its block within the track), the
//! volume that wrote it, a generation, a checksum of the data alone (carried end to end by
//! copies, which rewrite the address but never the data) and a checksum of the header
//! itself. Reads verify all of it, so a misdirected, torn or rotten block is reported
//! instead of served. This module is pure: bytes in, bytes or a verdict out.

/// Blocks are the unit of storage inside a track; a track is a whole number of blocks.
pub const BLOCK_BYTES: usize = 4096;
/// Marks the start of every stored block.
pub const HEADER_MAGIC: u16 = 0x544b; // "TK"
pub const HEADER_FORMAT_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 48;

/// Set when the block reads as zeros and stores no data: a zero write or a trim over a
/// block that a lower layer still holds, so the lower data must not show through.
const FLAG_ZERO: u8 = 1;

/// Where a stored block belongs; a read checks the stored address against the one asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockAddress {
    pub layer: u64,
    pub track: u64,
    pub block_in_track: u32,
}

/// The decoded header of a stored block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    pub address: BlockAddress,
    /// The volume that wrote the block (shared layers keep their writer's id).
    pub writer_volume: u64,
    pub generation: u64,
    pub zero: bool,
    /// CRC-32C of the data alone, so copies can carry it to another address unchanged.
    pub data_checksum: u32,
}

/// What a verified stored block holds.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockContent<'a> {
    Zero,
    Data(&'a [u8]),
}

/// Why a stored block failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockDefect {
    TooShort {
        stored_bytes: usize,
    },
    BadMagic {
        found: u16,
    },
    UnknownFormat {
        version: u8,
    },
    HeaderChecksum {
        stored: u32,
        computed: u32,
    },
    Misdirected {
        expected: BlockAddress,
        found: BlockAddress,
    },
    WrongLength {
        stored_bytes: usize,
    },
    DataChecksum {
        stored: u32,
        computed: u32,
    },
}

impl std::fmt::Display for BlockDefect {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockDefect::TooShort { stored_bytes } => {
                write!(formatter, "stored block is only {stored_bytes} bytes long")
            }
            BlockDefect::BadMagic { found } => write!(formatter, "bad header magic {found:#06x}"),
            BlockDefect::UnknownFormat { version } => {
                write!(formatter, "unknown block format version {version}")
            }
            BlockDefect::HeaderChecksum { stored, computed } => write!(
                formatter,
                "header checksum {stored:#010x} does not match {computed:#010x}"
            ),
            BlockDefect::Misdirected { expected, found } => write!(
                formatter,
                "misdirected block: expected layer {} track {} block {}, found layer {} track {} block {}",
                expected.layer,
                expected.track,
                expected.block_in_track,
                found.layer,
                found.track,
                found.block_in_track
            ),
            BlockDefect::WrongLength { stored_bytes } => write!(
                formatter,
                "block data is {stored_bytes} bytes, expected {BLOCK_BYTES}"
            ),
            BlockDefect::DataChecksum { stored, computed } => write!(
                formatter,
                "data checksum {stored:#010x} does not match {computed:#010x}"
            ),
        }
    }
}

/// Encodes a data block: header followed by the 4 KiB of data.
pub fn encode_data(
    address: BlockAddress,
    writer_volume: u64,
    generation: u64,
    data: &[u8],
) -> Vec<u8> {
    debug_assert_eq!(data.len(), BLOCK_BYTES);
    let mut stored = Vec::with_capacity(HEADER_BYTES + BLOCK_BYTES);
    write_header(
        &mut stored,
        &BlockHeader {
            address,
            writer_volume,
            generation,
            zero: false,
            data_checksum: crc32c::crc32c(data),
        },
    );
    stored.extend_from_slice(data);
    stored
}

/// Encodes a zero marker: a header alone that reads as a block of zeros.
pub fn encode_zero(address: BlockAddress, writer_volume: u64, generation: u64) -> Vec<u8> {
    let mut stored = Vec::with_capacity(HEADER_BYTES);
    write_header(
        &mut stored,
        &BlockHeader {
            address,
            writer_volume,
            generation,
            zero: true,
            data_checksum: 0,
        },
    );
    stored
}

fn write_header(stored: &mut Vec<u8>, header: &BlockHeader) {
    stored.extend_from_slice(&HEADER_MAGIC.to_be_bytes());
    stored.push(HEADER_FORMAT_VERSION);
    stored.push(if header.zero { FLAG_ZERO } else { 0 });
    stored.extend_from_slice(&header.address.layer.to_be_bytes());
    stored.extend_from_slice(&header.address.track.to_be_bytes());
    stored.extend_from_slice(&header.address.block_in_track.to_be_bytes());
    stored.extend_from_slice(&header.writer_volume.to_be_bytes());
    stored.extend_from_slice(&header.generation.to_be_bytes());
    stored.extend_from_slice(&header.data_checksum.to_be_bytes());
    let header_checksum = crc32c::crc32c(&stored[stored.len() - (HEADER_BYTES - 4)..]);
    stored.extend_from_slice(&header_checksum.to_be_bytes());
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut buffer = [0u8; 8];
    buffer.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(buffer)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut buffer = [0u8; 4];
    buffer.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(buffer)
}

/// Decodes and verifies only the header.
pub fn decode_header(stored: &[u8]) -> Result<BlockHeader, BlockDefect> {
    if stored.len() < HEADER_BYTES {
        return Err(BlockDefect::TooShort {
            stored_bytes: stored.len(),
        });
    }
    let magic = u16::from_be_bytes([stored[0], stored[1]]);
    if magic != HEADER_MAGIC {
        return Err(BlockDefect::BadMagic { found: magic });
    }
    if stored[2] != HEADER_FORMAT_VERSION {
        return Err(BlockDefect::UnknownFormat { version: stored[2] });
    }
    let stored_header_checksum = read_u32(stored, HEADER_BYTES - 4);
    let computed = crc32c::crc32c(&stored[..HEADER_BYTES - 4]);
    if stored_header_checksum != computed {
        return Err(BlockDefect::HeaderChecksum {
            stored: stored_header_checksum,
            computed,
        });
    }
    Ok(BlockHeader {
        zero: stored[3] & FLAG_ZERO != 0,
        address: BlockAddress {
            layer: read_u64(stored, 4),
            track: read_u64(stored, 12),
            block_in_track: read_u32(stored, 20),
        },
        writer_volume: read_u64(stored, 24),
        generation: read_u64(stored, 32),
        data_checksum: read_u32(stored, 40),
    })
}

/// Verifies a stored block against the address it was read from and returns its content.
pub fn verify(
    stored: &[u8],
    expected: BlockAddress,
) -> Result<(BlockHeader, BlockContent<'_>), BlockDefect> {
    let header = decode_header(stored)?;
    if header.address != expected {
        return Err(BlockDefect::Misdirected {
            expected,
            found: header.address,
        });
    }
    let data = &stored[HEADER_BYTES..];
    if header.zero {
        if !data.is_empty() {
            return Err(BlockDefect::WrongLength {
                stored_bytes: data.len(),
            });
        }
        return Ok((header, BlockContent::Zero));
    }
    if data.len() != BLOCK_BYTES {
        return Err(BlockDefect::WrongLength {
            stored_bytes: data.len(),
        });
    }
    let computed = crc32c::crc32c(data);
    if computed != header.data_checksum {
        return Err(BlockDefect::DataChecksum {
            stored: header.data_checksum,
            computed,
        });
    }
    Ok((header, BlockContent::Data(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> BlockAddress {
        BlockAddress {
            layer: 7,
            track: 42,
            block_in_track: 3,
        }
    }

    #[test]
    fn a_block_verifies_at_its_own_address() {
        let data = vec![0xa5u8; BLOCK_BYTES];
        let stored = encode_data(address(), 1, 99, &data);
        assert_eq!(stored.len(), HEADER_BYTES + BLOCK_BYTES);
        let (header, content) = verify(&stored, address()).unwrap();
        assert_eq!(header.generation, 99);
        assert_eq!(header.writer_volume, 1);
        assert_eq!(content, BlockContent::Data(&data[..]));
    }

    #[test]
    fn a_block_read_from_another_address_is_misdirected() {
        let stored = encode_data(address(), 1, 1, &[1u8; BLOCK_BYTES]);
        let elsewhere = BlockAddress {
            track: 43,
            ..address()
        };
        assert!(matches!(
            verify(&stored, elsewhere),
            Err(BlockDefect::Misdirected { .. })
        ));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let stored = encode_data(address(), 1, 5, &[0x3cu8; BLOCK_BYTES]);
        // Every header bit and a spread of data bits: a single flip must never verify.
        let positions =
            (0..HEADER_BYTES * 8).chain((HEADER_BYTES * 8..stored.len() * 8).step_by(257));
        for bit in positions {
            let mut corrupt = stored.clone();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            assert!(
                verify(&corrupt, address()).is_err(),
                "bit {bit} flip went unnoticed"
            );
        }
    }

    #[test]
    fn a_zero_marker_reads_as_zero_and_a_torn_block_does_not_verify() {
        let marker = encode_zero(address(), 2, 8);
        assert_eq!(verify(&marker, address()).unwrap().1, BlockContent::Zero);
        let stored = encode_data(address(), 1, 5, &[9u8; BLOCK_BYTES]);
        assert!(matches!(
            verify(&stored[..HEADER_BYTES + 100], address()),
            Err(BlockDefect::WrongLength { .. })
        ));
        assert!(matches!(
            verify(&stored[..10], address()),
            Err(BlockDefect::TooShort { .. })
        ));
    }
}
