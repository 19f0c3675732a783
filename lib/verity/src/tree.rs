//! Hash tree geometry and the streaming builder.
//!
//! The geometry mirrors the kernel's `verity_ctr()` and cryptsetup's
//! `hash_levels()` exactly, because both compute level positions from
//! `data_blocks` on their own: any disagreement in the number of levels or
//! their order makes the kernel read hashes from the wrong blocks.

use sha2::{Digest, Sha256};

use crate::Error;

/// Size of a sha256 digest; with a power-of-two hash block size digests pack
/// without gaps, so no per-digest padding (format 1's `digest_size_full`) is
/// ever needed.
pub(crate) const DIGEST_SIZE: usize = 32;

/// Where each level of the tree lives on the hash device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Absolute hash-block index of each level's first block, level 0 first.
    pub(crate) level_start: Vec<u64>,
    /// Number of hash blocks of each level, level 0 first.
    pub(crate) level_blocks: Vec<u64>,
    /// Hash blocks of the whole tree, superblock excluded.
    pub(crate) tree_blocks: u64,
}

impl Layout {
    /// `hash_block_size` must already be validated (power of two, >= 512).
    pub(crate) fn new(
        data_blocks: u64,
        hash_block_size: u32,
        tree_start_block: u64,
    ) -> Result<Self, Error> {
        if data_blocks == 0 {
            return Err(Error::EmptyData);
        }
        let bits = (hash_block_size as usize / DIGEST_SIZE).ilog2();

        // Same loop as the kernel: one data block needs no hash block at all
        // (the root hash is that block's own digest), 2..=128 need one level.
        let mut levels = 0u32;
        while bits * levels < 64 && (data_blocks - 1) >> (bits * levels) != 0 {
            levels += 1;
        }

        let level_blocks: Vec<u64> = (0..levels)
            .map(|i| {
                let shift = bits * (i + 1);
                if shift >= 64 {
                    1
                } else {
                    data_blocks.div_ceil(1u64 << shift)
                }
            })
            .collect();

        // The highest level comes first on disk, level 0 last.
        let mut level_start = vec![0u64; level_blocks.len()];
        let mut pos = tree_start_block;
        for (start, blocks) in level_start.iter_mut().zip(&level_blocks).rev() {
            *start = pos;
            pos = pos.checked_add(*blocks).ok_or(Error::Overflow {
                field: "hash_offset",
            })?;
        }
        // Every later write offset is `block * hash_block_size`; checking the
        // end once here keeps those multiplications from overflowing.
        pos.checked_mul(u64::from(hash_block_size))
            .ok_or(Error::Overflow {
                field: "hash_offset",
            })?;

        Ok(Layout {
            level_start,
            level_blocks,
            tree_blocks: pos - tree_start_block,
        })
    }
}

/// One partially filled hash block per level.
struct Pending {
    buf: Vec<u8>,
    fill: usize,
    next_block: u64,
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    end_block: u64,
}

/// Consumes data blocks in order and emits finished hash blocks through
/// `sink(absolute_hash_block_index, bytes)`.
///
/// Every level's block is emitted as soon as it fills, so memory stays at one
/// hash block per level no matter how large the data is; the sink sees the
/// blocks of different levels interleaved, each at its final position.
pub(crate) struct TreeBuilder<S> {
    salted: Sha256,
    levels: Vec<Pending>,
    root: Option<[u8; DIGEST_SIZE]>,
    sink: S,
}

impl<S> TreeBuilder<S>
where
    S: FnMut(u64, &[u8]) -> Result<(), Error>,
{
    pub(crate) fn new(layout: &Layout, hash_block_size: u32, salt: &[u8], sink: S) -> Self {
        let levels = layout
            .level_start
            .iter()
            .zip(&layout.level_blocks)
            .map(|(&start, &blocks)| Pending {
                buf: vec![0; hash_block_size as usize],
                fill: 0,
                next_block: start,
                end_block: start + blocks,
            })
            .collect();
        TreeBuilder {
            // Format 1 puts the salt first, so its compression state can be
            // computed once and cloned for every block.
            salted: Sha256::new_with_prefix(salt),
            levels,
            root: None,
            sink,
        }
    }

    fn digest(&self, block: &[u8]) -> [u8; DIGEST_SIZE] {
        self.salted.clone().chain_update(block).finalize().into()
    }

    pub(crate) fn add_data_block(&mut self, block: &[u8]) -> Result<(), Error> {
        let digest = self.digest(block);
        self.push(0, digest)
    }

    fn push(&mut self, level: usize, digest: [u8; DIGEST_SIZE]) -> Result<(), Error> {
        let Some(pending) = self.levels.get_mut(level) else {
            // Only the single block of the top level (or, without levels, the
            // single data block) hashes to here.
            debug_assert!(self.root.is_none(), "tree produced two roots");
            self.root = Some(digest);
            return Ok(());
        };
        pending.buf[pending.fill..pending.fill + DIGEST_SIZE].copy_from_slice(&digest);
        pending.fill += DIGEST_SIZE;
        if pending.fill == pending.buf.len() {
            self.seal(level)?;
        }
        Ok(())
    }

    fn seal(&mut self, level: usize) -> Result<(), Error> {
        let pending = &mut self.levels[level];
        debug_assert!(
            pending.next_block < pending.end_block,
            "level {level} overran"
        );
        pending.buf[pending.fill..].fill(0);
        (self.sink)(pending.next_block, &pending.buf)?;
        pending.next_block += 1;
        pending.fill = 0;
        let digest = self
            .salted
            .clone()
            .chain_update(&pending.buf)
            .finalize()
            .into();
        self.push(level + 1, digest)
    }

    /// Flushes partial blocks bottom-up (sealing level i can only add to
    /// level i+1) and returns the root hash.
    pub(crate) fn finish(mut self) -> Result<[u8; DIGEST_SIZE], Error> {
        for level in 0..self.levels.len() {
            if self.levels[level].fill > 0 {
                self.seal(level)?;
            }
            debug_assert_eq!(
                self.levels[level].next_block, self.levels[level].end_block,
                "level {level} block count differs from the layout"
            );
        }
        // No root means no data block was ever added.
        self.root.ok_or(Error::EmptyData)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_counts_match_kernel_geometry() {
        let levels = |n| Layout::new(n, 4096, 1).unwrap().level_blocks;
        assert_eq!(levels(1), Vec::<u64>::new());
        assert_eq!(levels(2), vec![1]);
        assert_eq!(levels(128), vec![1]);
        assert_eq!(levels(129), vec![2, 1]);
        assert_eq!(levels(128 * 128), vec![128, 1]);
        assert_eq!(levels(128 * 128 + 1), vec![129, 2, 1]);
        // 512-byte hash blocks hold 16 digests.
        let small = Layout::new(257, 512, 1).unwrap();
        assert_eq!(small.level_blocks, vec![17, 2, 1]);
        assert_eq!(small.tree_blocks, 20);
    }

    #[test]
    fn highest_level_is_written_first() {
        let layout = Layout::new(128 * 128 + 1, 4096, 10).unwrap();
        assert_eq!(layout.level_start, vec![13, 11, 10]);
        assert_eq!(layout.tree_blocks, 132);
    }

    #[test]
    fn huge_counts_do_not_overflow_silently() {
        let layout = Layout::new(u64::MAX, 4096, 1);
        assert!(matches!(layout, Err(Error::Overflow { .. })));
        let layout = Layout::new(1 << 40, 4096, u64::MAX / 4096);
        assert!(matches!(layout, Err(Error::Overflow { .. })));
    }
}
