//! dom0's local sockets that only root may use (the policy daemon's and
//! qubesd's): bound with mode 0600, and each client's credentials checked
//! again on accept, then served on a task of its own.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}")]
pub struct BindError {
    what: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

/// Binds `path` for root only, in a directory made if missing; a socket
/// left by an earlier run is replaced.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let err = |what, p: &Path| {
        let path = p.display().to_string();
        move |source| BindError { what, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err("creating", dir))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing", path)(e)),
    }
    let l = UnixListener::bind(path).map_err(err("binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("restricting", path))?;
    Ok(l)
}

/// Accepts for good; every client that is root gets `handle` on a task
/// of its own, and its error is logged under `name`.
pub async fn serve<F, Fut>(listener: UnixListener, name: &'static str, handle: F)
where
    F: Fn(UnixStream) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of fds, say: wait rather than spin.
                log::warn!("{name}: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 => {}
            Ok(c) => {
                log::warn!("{name}: refusing a client of uid {}", c.uid());
                continue;
            }
            Err(e) => {
                log::warn!("{name}: peer credentials: {e}");
                continue;
            }
        }
        let fut = handle(stream);
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                log::warn!("{name}: {e}");
            }
        });
    }
}
