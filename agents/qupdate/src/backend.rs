//! How the CLI's commands reach the slots: one [`Backend`] trait, with the
//! [`Updater`] (the slots opened here) and the [`Client`] of a running
//! `qupdated` (`org.qubesos.Update1`) behind it, and [`select`], the one
//! place that picks between them.

use std::io::Read;
use std::os::fd::AsFd;

use qcontract::Slot;

use crate::args::SystemArgs;
use crate::client::{Client, ClientError};
use crate::{Applied, ApplyOptions, Progress, Status, UpdateError, Updater};

/// A bundle as either side reads it: the updater reads it here, the
/// service is handed its descriptor (a file or a pipe).
pub trait BundleSource: Read + AsFd {}

impl<T: Read + AsFd> BundleSource for T {}

/// Which way a backend reaches the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This process opens the disk and takes the updater lock.
    Local,
    /// The running `qupdated` does the work.
    Service,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Local(#[from] UpdateError),
    #[error(transparent)]
    Service(#[from] ClientError),
}

/// The commands that work on the slots, whichever way they go.
pub trait Backend {
    fn route(&self) -> Route;

    /// Installs the bundle into the inactive slot, which then boots next
    /// with `opts.tries` tries; `progress` sees the write and the read-back.
    fn apply(
        &mut self,
        bundle: &mut dyn BundleSource,
        opts: &ApplyOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Applied, BackendError>;

    /// Marks the booted slot good and returns it.
    fn mark_good(&mut self) -> Result<Slot, BackendError>;

    /// Makes the other slot the default, if it is good, and returns it.
    fn rollback(&mut self) -> Result<Slot, BackendError>;

    fn status(&mut self) -> Result<Status, BackendError>;
}

impl Backend for Updater {
    fn route(&self) -> Route {
        Route::Local
    }

    fn apply(
        &mut self,
        bundle: &mut dyn BundleSource,
        opts: &ApplyOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Applied, BackendError> {
        Ok(Updater::apply(self, bundle, opts, progress)?)
    }

    fn mark_good(&mut self) -> Result<Slot, BackendError> {
        Updater::mark_good(self)?;
        Ok(self.config().booted)
    }

    fn rollback(&mut self) -> Result<Slot, BackendError> {
        Ok(Updater::rollback(self)?)
    }

    fn status(&mut self) -> Result<Status, BackendError> {
        Ok(Updater::status(self)?)
    }
}

impl Backend for Client {
    fn route(&self) -> Route {
        Route::Service
    }

    fn apply(
        &mut self,
        bundle: &mut dyn BundleSource,
        opts: &ApplyOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Applied, BackendError> {
        Ok(Client::apply(self, bundle.as_fd(), opts, progress)?)
    }

    fn mark_good(&mut self) -> Result<Slot, BackendError> {
        Ok(Client::mark_good(self)?)
    }

    fn rollback(&mut self) -> Result<Slot, BackendError> {
        Ok(Client::rollback(self)?)
    }

    fn status(&mut self) -> Result<Status, BackendError> {
        Ok(Client::status(self)?)
    }
}

/// The backend for this invocation: with `--disk` the slots on that disk,
/// opened here; otherwise the running `qupdated` if it is on the system
/// bus, or else the running system's slots, opened here. A bus that is
/// there but fails is an error, not a reason to go around the service.
pub fn select(system: &SystemArgs) -> Result<Box<dyn Backend>, BackendError> {
    select_with(
        system.disk.is_some(),
        || Ok(Client::connect()?.map(|c| Box::new(c) as Box<dyn Backend>)),
        || Ok(Box::new(Updater::open(system.config()?)?)),
    )
}

/// [`select`]'s rule, over how to reach the service and how to open the
/// slots here.
fn select_with(
    disk_named: bool,
    connect: impl FnOnce() -> Result<Option<Box<dyn Backend>>, BackendError>,
    open_here: impl FnOnce() -> Result<Box<dyn Backend>, BackendError>,
) -> Result<Box<dyn Backend>, BackendError> {
    if !disk_named {
        if let Some(service) = connect()? {
            return Ok(service);
        }
    }
    open_here()
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A backend that only says which way it goes.
    struct Fake(Route);

    impl Backend for Fake {
        fn route(&self) -> Route {
            self.0
        }
        fn apply(
            &mut self,
            _: &mut dyn BundleSource,
            _: &ApplyOptions,
            _: &mut dyn FnMut(Progress),
        ) -> Result<Applied, BackendError> {
            unreachable!("selection never runs a command")
        }
        fn mark_good(&mut self) -> Result<Slot, BackendError> {
            unreachable!("selection never runs a command")
        }
        fn rollback(&mut self) -> Result<Slot, BackendError> {
            unreachable!("selection never runs a command")
        }
        fn status(&mut self) -> Result<Status, BackendError> {
            unreachable!("selection never runs a command")
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Bus {
        /// No bus, or no `qupdated` on it.
        NoService,
        Service,
        /// The bus answered with an error.
        Broken,
    }

    #[test]
    fn the_service_unless_the_disk_is_named_or_it_is_not_there() {
        // (--disk given, the bus, asked the bus, where the commands go)
        let cases = [
            (true, Bus::Service, false, Ok(Route::Local)),
            (true, Bus::Broken, false, Ok(Route::Local)),
            (false, Bus::Service, true, Ok(Route::Service)),
            (false, Bus::NoService, true, Ok(Route::Local)),
            (false, Bus::Broken, true, Err(())),
        ];
        for (disk_named, bus, asks_bus, expected) in cases {
            let asked = Cell::new(false);
            let opened = Cell::new(false);
            let chosen = select_with(
                disk_named,
                || {
                    asked.set(true);
                    match bus {
                        Bus::NoService => Ok(None),
                        Bus::Service => Ok(Some(Box::new(Fake(Route::Service)))),
                        Bus::Broken => Err(ClientError::Gone(0).into()),
                    }
                },
                || {
                    opened.set(true);
                    Ok(Box::new(Fake(Route::Local)))
                },
            );
            let what = format!("--disk {disk_named}, {bus:?}");
            assert_eq!(asked.get(), asks_bus, "{what}: asked the bus");
            match expected {
                Ok(route) => {
                    let backend = chosen.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(backend.route(), route, "{what}");
                    assert_eq!(opened.get(), route == Route::Local, "{what}: opened here");
                }
                Err(()) => {
                    assert!(
                        matches!(chosen, Err(BackendError::Service(_))),
                        "{what}: the bus's error"
                    );
                    assert!(!opened.get(), "{what}: went around a broken bus");
                }
            }
        }
    }
}
