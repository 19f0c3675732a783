//! org.qubesos.Domains1 on a private busd bus: `List` shows what the daemon
//! publishes, requests for a known domain reach the daemon's queue, an
//! unknown name is refused with its own error, and state changes arrive as
//! the signal.

#![allow(clippy::unwrap_used)] // test fixtures

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use qdomd::daemon::{DomainInfo, Request, Shared};
use qdomd::dbus::{Domains1Proxy, DomainsError, BUS_NAME, OBJECT_PATH};
use qdomd::service::DomainsService;

#[test]
fn list_start_unknown_and_the_state_signal() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut bus = qbus::SystemBus::bind(&dir.path().join("bus"))
            .await
            .unwrap();
        let address = bus.address();
        tokio::spawn(async move {
            let _ = bus.run().await;
        });

        let shared = Arc::new(Mutex::new(Shared {
            domains: vec![DomainInfo {
                name: "guivm".into(),
                phase: qdomd::lifecycle::Phase::Ready,
                domid: 3,
            }],
            vms: Vec::new(),
        }));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = zbus::connection::Builder::address(address.as_str())
            .name(BUS_NAME)
            .serve_at(OBJECT_PATH, DomainsService::new(shared, tx))
            .build()
            .await
            .unwrap();
        let client = zbus::connection::Builder::address(address.as_str())
            .build()
            .await
            .unwrap();
        let proxy = Domains1Proxy::new(&client).await.unwrap();
        let mut changes = proxy.receive_state_changed().await.unwrap();

        assert_eq!(
            proxy.list().await.unwrap(),
            vec![("guivm".to_owned(), "ready".to_owned(), 3)]
        );
        proxy.shutdown("guivm").await.unwrap();
        assert!(matches!(rx.recv().await, Some(Request::Shutdown(n)) if n == "guivm"));
        proxy.kill("guivm").await.unwrap();
        assert!(matches!(rx.recv().await, Some(Request::Kill(n)) if n == "guivm"));
        let e = proxy.start("nonesuch").await.unwrap_err();
        assert!(
            matches!(&e, DomainsError::UnknownDomain(m) if m.contains("nonesuch")),
            "{e:?}"
        );
        assert!(
            rx.try_recv().is_err(),
            "an unknown domain reached the daemon"
        );

        let iface = server
            .object_server()
            .interface::<_, DomainsService>(OBJECT_PATH)
            .await
            .unwrap();
        DomainsService::state_changed(iface.signal_emitter(), "guivm", "stopping", 3)
            .await
            .unwrap();
        let sig = tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .unwrap()
            .unwrap();
        let args = sig.args().unwrap();
        assert_eq!(
            (args.name().as_str(), args.state().as_str(), *args.domid()),
            ("guivm", "stopping", 3)
        );
    });
}
