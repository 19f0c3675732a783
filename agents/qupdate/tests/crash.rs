//! Crash consistency, exhaustively. Every write and fsync that `apply`,
//! `mark-good` and `rollback` issue to a file-backed disk, and every
//! replacement of the state file, is recorded under the real code path
//! (`qupdate::disk::Journal`, beneath the updater, at the file it writes),
//! together with GRUB's own try counting between the boots. The disk is
//! then rebuilt at every prefix of that sequence, each write cut at every
//! 512-byte sector boundary (a torn last write), and the boot state's
//! writes to the ESP at every byte, and at each point:
//!
//! - the slot GRUB would boot, by the rules of `grubenv::grub_script()`
//!   (the `BootState` model, which `lib/grubenv`'s tests check against
//!   GRUB itself in grub-emu), is complete, or it is on trial and GRUB
//!   falls back, once its tries are spent, to a slot that is;
//! - every version the state file may have after the crash parses.
//!
//! "Complete" means the slot's boot and root partitions hold, byte for
//! byte, one image that was installed there whole: the original slot A or
//! one of the two bundles. Anything else would fail dm-verity or the boot.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test fixtures

mod common;

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use common::{world, World};
use grubenv::{BootState, Slot};
use qupdate::disk::{Disk, DiskOp, Journal};
use qupdate::{ApplyOptions, Updater};

const SECTOR: u64 = 512;

/// One partition's byte range.
#[derive(Debug, Clone, Copy)]
struct Range {
    offset: u64,
    size: u64,
}

/// An image that may be whole in a slot: its boot and root bytes.
struct Image {
    name: &'static str,
    slot: Slot,
    boot: Vec<u8>,
    root: Vec<u8>,
    /// Sectors of each region (boot, root) that differ on the disk now.
    differ: [u64; 2],
}

/// The disk as a crash at some point would leave it, kept up to date
/// sector by sector.
struct Replay {
    disk: Vec<u8>,
    esp: Range,
    /// (slot, boot partition, root partition)
    parts: Vec<(Slot, Range, Range)>,
    images: Vec<Image>,
    boot_state: Result<BootState, String>,
    copies: Copies,
    /// The state file's content once durable (`None`: no file).
    state_durable: Option<Vec<u8>>,
    /// Renamed into place since, not yet durable: any of them may be there.
    state_pending: Vec<Vec<u8>>,
}

fn region(disk: &[u8], r: Range, len: usize) -> &[u8] {
    &disk[r.offset as usize..r.offset as usize + len]
}

fn differing_sectors(disk: &[u8], r: Range, want: &[u8]) -> u64 {
    let have = region(disk, r, want.len());
    have.chunks(SECTOR as usize)
        .zip(want.chunks(SECTOR as usize))
        .filter(|(a, b)| a != b)
        .count() as u64
}

/// How many of the environment's copies the model reads: both, as GRUB's
/// script does, or only the primary (to show what the second is for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copies {
    Both,
    PrimaryOnly,
}

/// The state GRUB goes by: that of the first whole copy (`grubenv::pick`,
/// the script's rule).
fn read_boot_state(disk: &[u8], esp: Range, copies: Copies) -> Result<BootState, String> {
    let read = |copy: usize| {
        let mut dev = Cursor::new(disk);
        let path = grubenv::copy_path(copy);
        let ext = qfat::locate(&mut dev, esp.offset, esp.size, &path).map_err(|e| e.to_string())?;
        qfat::read_file(&mut dev, esp.offset, &ext).map_err(|e| e.to_string())
    };
    let second = match copies {
        Copies::Both => read(1),
        Copies::PrimaryOnly => Err("not read".into()),
    };
    grubenv::pick([read(0), second])
        .map(|p| p.state)
        .map_err(|e| e.to_string())
}

impl Replay {
    fn new(disk: Vec<u8>, w: &World, images: Vec<Image>, copies: Copies) -> Self {
        let d = Disk::open(&w.disk).unwrap();
        let range = |p: qupdate::disk::Part| Range {
            offset: p.offset,
            size: p.size,
        };
        let parts = Slot::ALL
            .iter()
            .map(|&s| (s, range(d.boot(s)), range(d.root(s))))
            .collect();
        let esp = range(d.esp);
        let mut r = Replay {
            boot_state: read_boot_state(&disk, esp, copies),
            copies,
            disk,
            esp,
            parts,
            images,
            state_durable: None,
            state_pending: Vec::new(),
        };
        for i in 0..r.images.len() {
            let (boot, root) = r.ranges(r.images[i].slot);
            let img = &r.images[i];
            let differ = [
                differing_sectors(&r.disk, boot, &img.boot),
                differing_sectors(&r.disk, root, &img.root),
            ];
            r.images[i].differ = differ;
        }
        r
    }

    fn ranges(&self, slot: Slot) -> (Range, Range) {
        let (_, b, r) = self.parts.iter().find(|(s, _, _)| *s == slot).unwrap();
        (*b, *r)
    }

    /// Writes `data` at `offset`, which lies within one sector; keeps the
    /// images' counts and the boot state current.
    fn write_piece(&mut self, offset: u64, data: &[u8]) {
        let sector = offset / SECTOR * SECTOR;
        for img in &mut self.images {
            let (_, boot, root) = *self.parts.iter().find(|(s, _, _)| *s == img.slot).unwrap();
            for (k, (r, want)) in [(boot, &img.boot), (root, &img.root)]
                .into_iter()
                .enumerate()
            {
                let end = r.offset + want.len() as u64;
                if sector < r.offset || sector >= end {
                    continue;
                }
                let lo = (sector - r.offset) as usize;
                let hi = (lo + SECTOR as usize).min(want.len());
                let want = &want[lo..hi];
                let at = sector as usize;
                let before = &self.disk[at..at + want.len()] == want;
                let mut after = self.disk[at..at + want.len()].to_vec();
                let from = (offset - sector) as usize;
                let n = data.len().min(after.len().saturating_sub(from));
                after[from..from + n].copy_from_slice(&data[..n]);
                let after = after == want;
                match (before, after) {
                    (true, false) => img.differ[k] += 1,
                    (false, true) => img.differ[k] -= 1,
                    _ => {}
                }
            }
        }
        let at = offset as usize;
        self.disk[at..at + data.len()].copy_from_slice(data);
        if self.in_esp(offset) {
            self.boot_state = read_boot_state(&self.disk, self.esp, self.copies);
        }
    }

    /// The boot state once `data` is written whole at `offset` in the ESP.
    fn boot_state_after(&self, offset: u64, data: &[u8]) -> Result<BootState, String> {
        let (lo, hi) = (
            self.esp.offset as usize,
            (self.esp.offset + self.esp.size) as usize,
        );
        let mut esp = self.disk[lo..hi].to_vec();
        let at = (offset - self.esp.offset) as usize;
        esp[at..at + data.len()].copy_from_slice(data);
        read_boot_state(
            &esp,
            Range {
                offset: 0,
                size: self.esp.size,
            },
            self.copies,
        )
    }

    fn in_esp(&self, offset: u64) -> bool {
        offset >= self.esp.offset && offset < self.esp.offset + self.esp.size
    }

    /// The image whole in `slot` now, if any.
    fn whole(&self, slot: Slot) -> Option<&'static str> {
        self.images
            .iter()
            .find(|i| i.slot == slot && i.differ == [0, 0])
            .map(|i| i.name)
    }

    /// What GRUB boots from here, boot after boot, until a whole slot
    /// comes up: `Ok(slot, image)`, or why the machine would not.
    fn boots(&self) -> Result<(Slot, &'static str), String> {
        let mut st = match &self.boot_state {
            Ok(st) => st.clone(),
            // No whole copy: the script sees no SLOT_ORDER and falls back
            // to A without writing anything.
            Err(e) => {
                return self
                    .whole(Slot::A)
                    .map(|i| (Slot::A, i))
                    .ok_or_else(|| format!("grubenv unreadable ({e}) and slot A is not whole"))
            }
        };
        for _ in 0..=grubenv::MAX_TRIES {
            let on_trial = st.next_boot().is_some_and(|s| !st.slot(s).ok);
            match st.spend_try() {
                Some(slot) => match self.whole(slot) {
                    Some(img) => return Ok((slot, img)),
                    // Its boot fails, the try is spent, GRUB goes on.
                    None if on_trial => {}
                    None => {
                        return Err(format!("slot {slot} is marked good but not whole: {st:?}"))
                    }
                },
                None => {
                    let slot = st.fallback();
                    return self.whole(slot).map(|i| (slot, i)).ok_or_else(|| {
                        format!("no slot qualifies; the fallback {slot} is not whole: {st:?}")
                    });
                }
            }
        }
        Err(format!("GRUB never settles: {st:?}"))
    }

    /// Every state file the crash may leave parses.
    fn state_readable(&self) -> Result<(), String> {
        for v in self.state_durable.iter().chain(&self.state_pending) {
            serde_json::from_slice::<qupdate::state::State>(v)
                .map_err(|e| format!("state file unreadable: {e}"))?;
        }
        Ok(())
    }
}

/// What the replay found.
#[derive(Debug, Default)]
struct Report {
    points: u64,
    writes: u64,
    /// Of `writes`, those to the ESP (the boot state), cut at every byte.
    esp_writes: u64,
    flushes: u64,
    state_replacements: u64,
    failures: Vec<String>,
    /// Which (slot, image) the machine comes up with, and how often.
    outcomes: std::collections::BTreeMap<String, u64>,
}

/// Replays `journal` onto `base`, checking at every crash point.
fn replay(
    base: Vec<u8>,
    w: &World,
    images: Vec<Image>,
    journal: &[DiskOp],
    copies: Copies,
) -> Report {
    let mut r = Replay::new(base, w, images, copies);
    let mut rep = Report::default();
    let check = |r: &Replay, rep: &mut Report, at: &str| {
        rep.points += 1;
        match r.boots().and_then(|b| r.state_readable().map(|()| b)) {
            Ok((slot, img)) => *rep.outcomes.entry(format!("{slot}:{img}")).or_default() += 1,
            Err(e) => {
                if rep.failures.len() < 10 {
                    rep.failures.push(format!("{at}: {e}"));
                }
            }
        }
    };
    check(&r, &mut rep, "before the first write");
    for (i, op) in journal.iter().enumerate() {
        match op {
            DiskOp::Write { offset, data } => {
                rep.writes += 1;
                let mut at = *offset;
                let end = offset + data.len() as u64;
                // The boot state's writes tear at every byte: a disk that
                // does not write a sector whole must still leave a whole
                // copy of it (the other, or this one's check says no).
                let in_esp = r.in_esp(*offset);
                let grain = if in_esp {
                    rep.esp_writes += 1;
                    1
                } else {
                    SECTOR
                };
                // A boot state write is atomic to GRUB: whatever the cut,
                // it reads the state before the write or the one after.
                let (before, after) = if in_esp {
                    (r.boot_state.clone(), r.boot_state_after(*offset, data))
                } else {
                    (Err(String::new()), Err(String::new()))
                };
                while at < end {
                    let next = ((at / grain) + 1) * grain;
                    let piece_end = next.min(end);
                    let piece = &data[(at - offset) as usize..(piece_end - offset) as usize];
                    r.write_piece(at, piece);
                    at = piece_end;
                    if in_esp
                        && !(r.boot_state.is_ok()
                            && (r.boot_state == before || r.boot_state == after))
                        && rep.failures.len() < 10
                    {
                        rep.failures.push(format!(
                            "op {i} (write at {offset}), up to byte {at}: the boot state \
                             is {:?}, neither {before:?} nor {after:?}",
                            r.boot_state
                        ));
                    }
                    check(
                        &r,
                        &mut rep,
                        &format!("op {i} (write at {offset}), up to byte {at}"),
                    );
                }
            }
            DiskOp::Flush => rep.flushes += 1,
            DiskOp::StateReplaced(text) => {
                rep.state_replacements += 1;
                r.state_pending.push(text.clone());
                check(&r, &mut rep, &format!("op {i} (state file replaced)"));
            }
            DiskOp::StateDurable => {
                if let Some(last) = r.state_pending.pop() {
                    r.state_durable = Some(last);
                }
                r.state_pending.clear();
            }
        }
    }
    rep
}

/// GRUB's boot: it picks the slot by the script's rules and, for a slot
/// on trial, writes the spent try into grubenv (through the same journal).
fn grub_boots(w: &World, journal: &Journal) -> Slot {
    let mut d = Disk::open_journaled(&w.disk, Some(journal.clone())).unwrap();
    let (mut env, mut st) = qupdate::bootenv::load(&mut d).unwrap();
    let before = st.clone();
    let slot = st.spend_try().unwrap();
    if st != before {
        qupdate::bootenv::store(&mut d, &mut env, &st).unwrap();
    }
    slot
}

fn bundle_file(bytes: &[u8]) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f
}

/// The whole cycle, recorded: A's first boot marks it good; install a
/// release into B, boot it, mark it good, roll back to A, boot A, install
/// a second release into B (over a good slot), boot it, mark it good. Returns the disk before the first
/// write, the images that may be whole, and the journal.
fn recorded_cycle() -> (World, Vec<u8>, Vec<Image>, Vec<DiskOp>) {
    let w = world();
    let base = std::fs::read(&w.disk).unwrap();
    // Release 1 has A's epoch, so the rollback to A stays above the floor.
    let r1 = w.bundle_parts(&[&w.key], 1, |m| m.security_epoch = 1);
    let r2 = w.bundle_parts(&[&w.key], 2, |m| {
        m.version = "0.3.0".into();
        m.security_epoch = 6;
    });
    let journal: Journal = Arc::new(Mutex::new(Vec::new()));
    let updater = |booted| Updater::open_journaled(w.cfg(booted), Some(journal.clone())).unwrap();
    let opts = ApplyOptions::default();

    // A's first boot: marked good, its epoch recorded.
    updater(Slot::A).mark_good().unwrap();
    let applied = updater(Slot::A)
        .apply(bundle_file(&r1.bundle), &opts, &mut |_| {})
        .unwrap();
    assert_eq!(applied.slot, Slot::B);
    assert_eq!(grub_boots(&w, &journal), Slot::B);
    updater(Slot::B).mark_good().unwrap();
    assert_eq!(updater(Slot::B).rollback().unwrap(), Slot::A);
    assert_eq!(grub_boots(&w, &journal), Slot::A);
    updater(Slot::A)
        .apply(bundle_file(&r2.bundle), &opts, &mut |_| {})
        .unwrap();
    assert_eq!(grub_boots(&w, &journal), Slot::B);
    updater(Slot::B).mark_good().unwrap();

    let d = Disk::open(&w.disk).unwrap();
    let full = |slot: Slot, boot: bool| {
        let p = if boot { d.boot(slot) } else { d.root(slot) };
        base[p.offset as usize..(p.offset + p.size) as usize].to_vec()
    };
    let images = vec![
        Image {
            name: "original",
            slot: Slot::A,
            boot: full(Slot::A, true),
            root: full(Slot::A, false),
            differ: [0, 0],
        },
        Image {
            name: "release-1",
            slot: Slot::B,
            boot: r1.boot,
            root: r1.root,
            differ: [0, 0],
        },
        Image {
            name: "release-2",
            slot: Slot::B,
            boot: r2.boot,
            root: r2.root,
            differ: [0, 0],
        },
    ];
    let journal = journal.lock().unwrap().clone();
    (w, base, images, journal)
}

#[test]
fn every_crash_point_of_apply_mark_good_and_rollback_boots_a_whole_slot() {
    let (w, base, images, journal) = recorded_cycle();
    let rep = replay(base, &w, images, &journal, Copies::Both);
    println!(
        "crash points checked: {} ({} writes cut at every 512-byte sector, {} boot state \
         writes cut at every byte, {} fsyncs, {} state file replacements); the machine comes \
         up as {:?}",
        rep.points,
        rep.writes - rep.esp_writes,
        rep.esp_writes,
        rep.flushes,
        rep.state_replacements,
        rep.outcomes
    );
    assert!(rep.failures.is_empty(), "{:#?}", rep.failures);
    // Not a vacuous pass: both releases were written, and the machine came
    // up on each of the three images at some point.
    assert!(rep.points > 10_000, "{rep:?}");
    for img in ["A:original", "B:release-1", "B:release-2"] {
        assert!(rep.outcomes.contains_key(img), "{img} never boots: {rep:?}");
    }
}

/// The check finds what it is for: drop the last write of the second
/// release's root payload, so the slot that is activated, booted and
/// marked good is not whole, and the crash points from mark-good on must
/// be reported.
#[test]
fn the_replay_catches_a_slot_marked_good_that_is_not_whole() {
    let (w, base, images, journal) = recorded_cycle();
    let root_b = Disk::open(&w.disk).unwrap().root(Slot::B);
    let last_root_write = journal
        .iter()
        .rposition(|op| {
            matches!(op, DiskOp::Write { offset, .. }
                if *offset >= root_b.offset && *offset < root_b.offset + root_b.size)
        })
        .unwrap();
    let mut broken = journal.clone();
    broken.remove(last_root_write);
    let rep = replay(base, &w, images, &broken, Copies::Both);
    assert!(
        rep.failures
            .iter()
            .any(|f| f.contains("slot B is marked good but not whole")),
        "{:#?}",
        rep.failures
    );
}

/// The second copy is what keeps the boot state whole: read as if there
/// were only the primary, a boot state write torn inside a sector leaves
/// GRUB neither the old state nor the new one.
#[test]
fn without_the_second_copy_a_torn_boot_state_is_lost() {
    let (w, base, images, journal) = recorded_cycle();
    let rep = replay(base, &w, images, &journal, Copies::PrimaryOnly);
    assert!(
        rep.failures
            .iter()
            .any(|f| f.contains("the boot state is Err") && f.contains("neither")),
        "{:#?}",
        rep.failures
    );
}

/// GRUB saves the copy it read from before the other, and a store may stop
/// between the two: the secondary can be whole and older than the primary.
/// A store must still leave GRUB the state before it or the one after it,
/// at every byte: so it first brings the secondary up to date.
#[test]
fn a_stale_secondary_is_brought_up_to_date_before_the_primary_changes() {
    let w = world();
    // The secondary says B is on trial with 9 tries; the primary, what
    // GRUB goes by, that A alone is good.
    let mut stale = BootState::initial();
    stale.activate(Slot::B, 9).unwrap();
    let mut env = grubenv::Env::new();
    stale.apply_to(&mut env).unwrap();
    {
        let mut d = Disk::open(&w.disk).unwrap();
        let path = grubenv::copy_path(1);
        let ext = qfat::locate(&mut d.file, d.esp.offset, d.esp.size, &path).unwrap();
        qfat::write_in_place(&mut d.file, d.esp.offset, &ext, &env.to_block().unwrap()).unwrap();
    }
    let base = std::fs::read(&w.disk).unwrap();
    let journal: Journal = Arc::new(Mutex::new(Vec::new()));
    let mut d = Disk::open_journaled(&w.disk, Some(journal.clone())).unwrap();
    let (mut env, before) = qupdate::bootenv::load(&mut d).unwrap();
    assert_eq!(before, BootState::initial());
    let mut after = before.clone();
    after.activate(Slot::B, 3).unwrap();
    qupdate::bootenv::store(&mut d, &mut env, &after).unwrap();
    drop(d);
    let a = Disk::open(&w.disk).unwrap();
    let full =
        |p: qupdate::disk::Part| base[p.offset as usize..(p.offset + p.size) as usize].to_vec();
    let images = vec![Image {
        name: "original",
        slot: Slot::A,
        boot: full(a.boot(Slot::A)),
        root: full(a.root(Slot::A)),
        differ: [0, 0],
    }];
    let journal = journal.lock().unwrap().clone();
    let rep = replay(base, &w, images, &journal, Copies::Both);
    assert!(rep.failures.is_empty(), "{:#?}", rep.failures);
    assert!(rep.esp_writes >= 3, "{rep:?}");
}
