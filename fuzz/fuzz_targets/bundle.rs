//! The bundle reader on arbitrary input: header caps, signature block,
//! manifest, payload streaming. A fixed trust store whose key the fuzzer
//! cannot sign with, plus a second pass that decodes the manifest bytes
//! directly (what a signed-but-hostile manifest would reach).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn trust() -> &'static qbundle::TrustStore {
    static T: OnceLock<qbundle::TrustStore> = OnceLock::new();
    T.get_or_init(|| {
        let line = "qupdate-ed25519-public bef711b1c241c485e8f206fc93de5e3bb8ead820991f178dd3153d85f3f6fb93 test";
        let pk = qbundle::PublicKey::parse(std::path::Path::new("fuzz"), line).expect("valid key");
        qbundle::TrustStore::parse(
            std::path::Path::new("fuzz"),
            &qbundle::TrustStore::render(&[pk], 1),
        )
        .expect("valid trust store")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    if let Ok(v) = qbundle::read_verified(&mut r, trust()) {
        for p in &v.manifest.payloads {
            let _ = qbundle::stream_payload(&mut r, p, &mut std::io::sink(), &mut |_| {});
        }
    }
    if let Ok((m, _)) = postcard::take_from_bytes::<qbundle::Manifest>(data) {
        let _ = m.validate();
    }
});
