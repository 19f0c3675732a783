//! The vchan's xenstore keys: the server's advertisement
//! (`data/vchan/<peer>/<port>/{ring-ref,event-channel}` in its own
//! directory, readable by the peer alone) and the client's wait for it.

use std::time::Duration;

use qxenstore::{Perm, Xs};

use crate::sys::DomId;

pub use qxenstore::XsError;

/// Where a server on `port` for `client` advertises, relative to its own
/// xenstore directory (Qubes' libvchan-xen uses this path).
pub fn advert_dir(client: DomId, port: u32) -> String {
    format!("data/vchan/{client}/{port}")
}

/// This domain's id, as xenstore knows it.
pub fn own_domid() -> Result<DomId, XsError> {
    let xs = Xs::open()?;
    let text = xs.read_string("domid")?.ok_or_else(|| XsError::missing("domid"))?;
    text.trim()
        .parse::<DomId>()
        .map_err(|_| XsError::invalid("domid", &text))
}

/// A written advertisement; [`Advert::remove`] takes it back.
#[derive(Debug)]
pub struct Advert {
    dir: String,
}

/// Writes the advertisement in one transaction, with permissions: owned by
/// us, nobody else may read it but `client`.
pub fn advertise(client: DomId, port: u32, ring_ref: u32, evtchn: u32) -> Result<Advert, XsError> {
    let own = own_domid()?;
    let xs = Xs::open()?;
    let dir = advert_dir(client, port);
    let perms = [Perm::none(own), Perm::read(client)];
    loop {
        let tx = xs.transaction()?;
        for (key, value) in [("ring-ref", ring_ref), ("event-channel", evtchn)] {
            let path = format!("{dir}/{key}");
            tx.write(&path, value.to_string().as_bytes())?;
            tx.set_perms(&path, &perms)?;
        }
        if tx.commit()? {
            return Ok(Advert { dir });
        }
    }
}

impl Advert {
    /// Removes the keys, and the peer's directory once no other port is
    /// advertised in it (as libvchan-xen does).
    pub fn remove(self) -> Result<(), XsError> {
        let xs = Xs::open()?;
        let parent = match self.dir.rsplit_once('/') {
            Some((p, _)) => p.to_owned(),
            None => self.dir.clone(),
        };
        loop {
            let tx = xs.transaction()?;
            tx.rm(&self.dir)?;
            if tx.directory(&parent)?.is_some_and(|d| d.is_empty()) {
                tx.rm(&parent)?;
            }
            if tx.commit()? {
                return Ok(());
            }
        }
    }
}

/// The client's wait for a server's advertisement.
pub struct AdvertWatch {
    xs: Xs,
    dir: String,
}

impl AdvertWatch {
    /// Watches `/local/domain/<server>/data/vchan/<own>/<port>/event-channel`
    /// (the key itself: the client may not be allowed to see the directory).
    pub fn new(server: DomId, own: DomId, port: u32) -> Result<AdvertWatch, XsError> {
        let xs = Xs::open()?;
        let dir = format!("/local/domain/{server}/{}", advert_dir(own, port));
        xs.watch(&format!("{dir}/event-channel"), "vchan")?;
        Ok(AdvertWatch { xs, dir })
    }

    /// The advertised (ring-ref, event-channel), once both keys are there.
    /// Values that are not numbers are errors naming the key.
    pub fn read(&self) -> Result<Option<(u32, u32)>, XsError> {
        let num = |key: &str| -> Result<Option<u32>, XsError> {
            let path = format!("{}/{key}", self.dir);
            match self.xs.read_string(&path)? {
                None => Ok(None),
                Some(t) => t
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|v| *v != 0)
                    .map(Some)
                    .ok_or_else(|| XsError::invalid(&path, &t)),
            }
        };
        match (num("event-channel")?, num("ring-ref")?) {
            (Some(p), Some(r)) => Ok(Some((r, p))),
            _ => Ok(None),
        }
    }

    /// Waits up to `timeout` for the watch to fire; false on timeout.
    pub fn wait(&self, timeout: Duration) -> Result<bool, XsError> {
        Ok(self.xs.next_watch_event(Some(timeout))?.is_some())
    }
}
