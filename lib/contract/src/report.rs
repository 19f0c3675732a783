//! How errors are printed at the top of a program: the error and each of
//! its sources, so the one line says what failed and why.

/// `error: source: source's source`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("reading the trust store")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_source_is_printed_in_order() {
        let e = Outer(std::io::Error::other("permission denied"));
        assert_eq!(
            super::error_chain(&e),
            "reading the trust store: permission denied"
        );
    }
}
