//! The kernel's entropy pool across boots, as systemd-random-seed keeps it:
//! a seed on /var, loaded at boot and refreshed at boot and at shutdown,
//! so nothing on the boot path waits in getrandom for the pool to fill
//! slowly (a CPU without RDRAND and no hardware RNG).
//!
//! A seed is credited (counted as entropy, which unblocks getrandom) only
//! when it was saved from an initialised pool, and only once: before it is
//! credited the file is replaced by one that is not creditable, so a crash
//! between the two can never credit the same bytes twice. Once the pool is
//! ready a creditable seed is saved again. A seed that cannot be replaced
//! (a read-only or full /var) is mixed in but not credited.
//!
//! The file is hostile input like anything on /var: anything but the exact
//! format is mixed in (which can never hurt the pool) and not credited.
//! The steps are [`boot`] and [`save`] over a [`Pool`], so the order is
//! tested without a kernel; [`Kernel`] is the real one.

use std::io::Write;
use std::path::Path;

/// Where the seed lives (the data partition).
pub const SEED_FILE: &str = "/var/lib/qinit/random-seed";
/// Bytes of seed: 4096 bits, what the kernel's pool holds.
pub const SEED_LEN: usize = 512;
const MAGIC: &[u8; 4] = b"QRS1";
/// Magic, a creditable flag, three zero bytes, the seed.
const FILE_LEN: usize = 8 + SEED_LEN;

/// What a seed file holds, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub bytes: Vec<u8>,
    /// Saved from an initialised pool, and never credited since.
    pub creditable: bool,
}

impl Seed {
    /// The file's bytes: the exact format, or an error saying what is off.
    pub fn parse(file: &[u8]) -> Result<Self, String> {
        if file.len() != FILE_LEN {
            return Err(format!("{} bytes, not {FILE_LEN}", file.len()));
        }
        if &file[..4] != MAGIC {
            return Err("no QRS1 magic".into());
        }
        let creditable = match file[4] {
            0 => false,
            1 => true,
            b => return Err(format!("creditable flag {b}, not 0 or 1")),
        };
        if file[5..8] != [0, 0, 0] {
            return Err("reserved bytes are not zero".into());
        }
        Ok(Self {
            bytes: file[8..].to_vec(),
            creditable,
        })
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FILE_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[u8::from(self.creditable), 0, 0, 0]);
        out.extend_from_slice(&self.bytes);
        out
    }
}

/// The kernel's pool and the seed file, as [`boot`] and [`save`] use them.
pub trait Pool {
    /// The seed file's bytes; `None` if there is none yet.
    fn read_seed(&mut self) -> std::io::Result<Option<Vec<u8>>>;
    /// Replaces the seed file durably (written, synced, renamed).
    fn write_seed(&mut self, file: &[u8]) -> std::io::Result<()>;
    /// Mixes bytes into the pool without counting them as entropy.
    fn mix(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Mixes bytes in and counts `bits` of entropy for them.
    fn credit(&mut self, bytes: &[u8], bits: u32) -> std::io::Result<()>;
    /// Random bytes if the pool is initialised, else `None` (never waits).
    fn ready_bytes(&mut self, n: usize) -> std::io::Result<Option<Vec<u8>>>;
    /// Random bytes whether or not the pool is initialised (never waits;
    /// not for crediting).
    fn insecure_bytes(&mut self, n: usize) -> std::io::Result<Vec<u8>>;
}

/// What [`boot`] did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// No seed file yet (the first boot of this data partition).
    None,
    /// Mixed in, not credited, and why.
    Mixed(String),
    /// Credited, this many bits.
    Credited(u32),
}

/// Saves a new seed: creditable if the pool is initialised, else not.
/// Returns whether it was creditable.
pub fn save(pool: &mut dyn Pool) -> std::io::Result<bool> {
    let (bytes, creditable) = match pool.ready_bytes(SEED_LEN)? {
        Some(b) => (b, true),
        None => (pool.insecure_bytes(SEED_LEN)?, false),
    };
    pool.write_seed(&Seed { bytes, creditable }.render())?;
    Ok(creditable)
}

/// At boot: mixes in the saved seed, credits it if it may be, and saves a
/// new one. Errors are in the result, never fatal: the boot goes on with
/// whatever the kernel has.
pub fn boot(pool: &mut dyn Pool) -> Loaded {
    let loaded = match pool.read_seed() {
        Ok(None) => Loaded::None,
        Err(e) => Loaded::Mixed(format!("cannot read the seed: {e}")),
        Ok(Some(file)) => load(pool, &file),
    };
    // Refresh: the pool may be ready now, which makes the next boot's
    // seed creditable; if not, shutdown tries again.
    if let Err(e) = save(pool) {
        log::warn!("random seed: saving a new seed: {e}");
    }
    loaded
}

fn load(pool: &mut dyn Pool, file: &[u8]) -> Loaded {
    let seed = match Seed::parse(file) {
        Ok(s) => s,
        Err(why) => {
            // Whatever it is, mixing it in cannot lower the pool's entropy.
            if let Err(e) = pool.mix(file) {
                log::warn!("random seed: mixing: {e}");
            }
            return Loaded::Mixed(format!("malformed seed ({why})"));
        }
    };
    if !seed.creditable {
        if let Err(e) = pool.mix(&seed.bytes) {
            log::warn!("random seed: mixing: {e}");
        }
        return Loaded::Mixed("saved before the pool was initialised".into());
    }
    // Never credit the same bytes twice: replace them first.
    let replaced = pool.insecure_bytes(SEED_LEN).and_then(|b| {
        pool.write_seed(
            &Seed {
                bytes: b,
                creditable: false,
            }
            .render(),
        )
    });
    if let Err(e) = replaced {
        if let Err(e) = pool.mix(&seed.bytes) {
            log::warn!("random seed: mixing: {e}");
        }
        return Loaded::Mixed(format!("cannot replace the seed before crediting it: {e}"));
    }
    let bits = u32::try_from(SEED_LEN * 8).expect("4096 bits fit a u32");
    match pool.credit(&seed.bytes, bits) {
        Ok(()) => Loaded::Credited(bits),
        Err(e) => Loaded::Mixed(format!("crediting: {e}")),
    }
}

/// `qinit save-seed`, the `random-seed` service: waits, off the boot path,
/// until the kernel's pool is initialised, then saves a creditable seed,
/// so the next boot credits one even if this one never shuts down
/// cleanly. Returns the exit code.
pub fn save_when_ready() -> i32 {
    let mut one = [0u8; 1];
    // Blocks until the pool is initialised; that is the point.
    if let Err(e) = getrandom(&mut one, rustix::rand::GetRandomFlags::empty()) {
        log::error!("waiting for the kernel's pool: {e}");
        return 1;
    }
    let mut pool = Kernel {
        seed_file: Path::new(SEED_FILE),
    };
    match save(&mut pool) {
        Ok(true) => {
            log::info!("saved a creditable seed in {SEED_FILE}");
            0
        }
        Ok(false) => {
            log::error!("the pool was initialised, yet getrandom would wait");
            1
        }
        Err(e) => {
            log::error!("saving {SEED_FILE}: {e}");
            1
        }
    }
}

/// The real pool: /dev/urandom and getrandom(2), and the seed file.
#[derive(Debug)]
pub struct Kernel<'a> {
    pub seed_file: &'a Path,
}

impl Pool for Kernel<'_> {
    fn read_seed(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let file = match std::fs::File::open(self.seed_file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Capped while reading: whatever is there, at most one byte more
        // than the format, which is enough to call it malformed.
        let mut buf = Vec::with_capacity(FILE_LEN + 1);
        file.take(FILE_LEN as u64 + 1).read_to_end(&mut buf)?;
        Ok(Some(buf))
    }

    fn write_seed(&mut self, file: &[u8]) -> std::io::Result<()> {
        let dir = self.seed_file.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        let tmp = self.seed_file.with_extension("new");
        {
            let mut f = std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            f.write_all(file)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.seed_file)?;
        std::fs::File::open(dir)?.sync_all()
    }

    fn mix(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::File::options()
            .write(true)
            .open("/dev/urandom")?
            .write_all(bytes)
    }

    fn credit(&mut self, bytes: &[u8], bits: u32) -> std::io::Result<()> {
        let urandom = std::fs::File::options().write(true).open("/dev/urandom")?;
        add_entropy(&urandom, bytes, bits)
    }

    fn ready_bytes(&mut self, n: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; n];
        match getrandom(&mut buf, rustix::rand::GetRandomFlags::NONBLOCK) {
            Ok(()) => Ok(Some(buf)),
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn insecure_bytes(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        getrandom(&mut buf, rustix::rand::GetRandomFlags::INSECURE)?;
        Ok(buf)
    }
}

/// Fills `buf` completely (getrandom may return less than asked).
fn getrandom(buf: &mut [u8], flags: rustix::rand::GetRandomFlags) -> rustix::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], flags) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `struct rand_pool_info` with the seed inline (linux/random.h).
#[repr(C)]
struct PoolInfo {
    entropy_count: i32,
    buf_size: i32,
    buf: [u8; SEED_LEN],
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`; the kernel reads the two
/// ints, then `buf_size` bytes after them.
const RNDADDENTROPY: rustix::ioctl::Opcode = rustix::ioctl::opcode::write::<[i32; 2]>(b'R', 0x03);

/// Mixes `bytes` (at most [`SEED_LEN`]) into the pool, counting `bits`.
fn add_entropy(urandom: &std::fs::File, bytes: &[u8], bits: u32) -> std::io::Result<()> {
    let mut info = PoolInfo {
        entropy_count: i32::try_from(bits)
            .map_err(|_| std::io::Error::other("entropy count out of range"))?,
        buf_size: 0,
        buf: [0; SEED_LEN],
    };
    let n = bytes.len().min(SEED_LEN);
    info.buf[..n].copy_from_slice(&bytes[..n]);
    info.buf_size = i32::try_from(n).expect("at most SEED_LEN");
    // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` from the
    // pointer: two ints, then `buf_size` bytes. `PoolInfo` is that layout
    // (repr(C)) with `buf_size` ≤ the inline buffer, and it lives for the
    // whole call; the kernel does not keep the pointer.
    unsafe {
        rustix::ioctl::ioctl(
            urandom,
            rustix::ioctl::Setter::<RNDADDENTROPY, PoolInfo>::new(info),
        )
    }
    .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that records what was done, in order.
    #[derive(Default)]
    struct Fake {
        file: Option<Vec<u8>>,
        ready: bool,
        write_fails: bool,
        log: Vec<String>,
        credited: Vec<Vec<u8>>,
    }

    impl Pool for Fake {
        fn read_seed(&mut self) -> std::io::Result<Option<Vec<u8>>> {
            Ok(self.file.clone())
        }
        fn write_seed(&mut self, file: &[u8]) -> std::io::Result<()> {
            if self.write_fails {
                return Err(std::io::Error::other("read-only"));
            }
            let s = Seed::parse(file).unwrap();
            self.log.push(format!("write creditable={}", s.creditable));
            self.file = Some(file.to_vec());
            Ok(())
        }
        fn mix(&mut self, _: &[u8]) -> std::io::Result<()> {
            self.log.push("mix".into());
            Ok(())
        }
        fn credit(&mut self, bytes: &[u8], bits: u32) -> std::io::Result<()> {
            self.log.push(format!("credit {bits}"));
            self.credited.push(bytes.to_vec());
            // Crediting a full seed initialises the pool.
            self.ready = true;
            Ok(())
        }
        fn ready_bytes(&mut self, n: usize) -> std::io::Result<Option<Vec<u8>>> {
            Ok(self.ready.then(|| vec![7; n]))
        }
        fn insecure_bytes(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
            Ok(vec![3; n])
        }
    }

    fn seed(byte: u8, creditable: bool) -> Vec<u8> {
        Seed {
            bytes: vec![byte; SEED_LEN],
            creditable,
        }
        .render()
    }

    #[test]
    fn the_format_round_trips_and_anything_else_is_named() {
        let s = Seed::parse(&seed(9, true)).unwrap();
        assert_eq!((s.bytes[0], s.creditable), (9, true));
        let mut bad = seed(9, true);
        bad[4] = 2;
        assert!(Seed::parse(&bad).unwrap_err().contains("flag 2"));
        let mut bad = seed(9, true);
        bad[6] = 1;
        assert!(Seed::parse(&bad).unwrap_err().contains("reserved"));
        assert!(Seed::parse(&seed(9, true)[..100])
            .unwrap_err()
            .contains("100 bytes"));
        let mut bad = seed(9, true);
        bad[0] = b'X';
        assert!(Seed::parse(&bad).unwrap_err().contains("magic"));
    }

    /// The first boot: nothing to load; the new seed is creditable only
    /// if the pool is ready by then.
    #[test]
    fn first_boot_saves_what_it_can() {
        let mut p = Fake::default();
        assert_eq!(boot(&mut p), Loaded::None);
        assert_eq!(p.log, ["write creditable=false"]);
        // At shutdown, with the pool ready, the seed becomes creditable.
        p.ready = true;
        assert!(save(&mut p).unwrap());
        assert!(Seed::parse(p.file.as_ref().unwrap()).unwrap().creditable);
    }

    /// A creditable seed is replaced by an uncreditable one before it is
    /// credited, then a creditable one is saved from the ready pool.
    #[test]
    fn a_creditable_seed_is_credited_once() {
        let mut p = Fake {
            file: Some(seed(9, true)),
            ..Fake::default()
        };
        assert_eq!(boot(&mut p), Loaded::Credited(4096));
        assert_eq!(
            p.log,
            [
                "write creditable=false",
                "credit 4096",
                "write creditable=true"
            ]
        );
        assert_eq!(p.credited, [vec![9; SEED_LEN]]);
        // The next boot credits the new bytes, never the old ones again.
        p.ready = false;
        p.log.clear();
        assert_eq!(boot(&mut p), Loaded::Credited(4096));
        assert_eq!(p.credited[1], vec![7; SEED_LEN]);
    }

    #[test]
    fn what_may_not_be_credited_is_only_mixed() {
        // (file, /var writable, why)
        let mut malformed = seed(9, true);
        malformed.truncate(40);
        let cases = [
            (seed(9, false), false, "before the pool was initialised"),
            (malformed, false, "malformed seed (40 bytes"),
            (seed(9, true), true, "cannot replace the seed"),
        ];
        for (file, write_fails, why) in cases {
            let mut p = Fake {
                file: Some(file),
                write_fails,
                ..Fake::default()
            };
            match boot(&mut p) {
                Loaded::Mixed(m) => assert!(m.contains(why), "{m}"),
                other => panic!("{why}: {other:?}"),
            }
            assert!(p.credited.is_empty(), "{why}");
            assert_eq!(p.log[0], "mix", "{why}");
        }
    }
}
