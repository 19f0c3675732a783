//! The module load lists qimage writes ([`crate::paths::EARLY_MODULES`],
//! [`crate::paths::DOM0_MODULES`], [`crate::paths::GUEST_MODULES`]): one
//! absolute path of a `.ko` file per line, in the order qimage resolved
//! (dependencies first). Blank lines and `#` comments are allowed.

use std::path::PathBuf;

/// The paths of a load list, in order.
pub fn parse_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// The text of a load list of these absolute paths.
pub fn render_list<'a>(paths: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for p in paths {
        out.push_str(p);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_comments() {
        let text = render_list(["/a.ko", "/b/c.ko"]);
        assert_eq!(text, "/a.ko\n/b/c.ko\n");
        assert_eq!(
            parse_list(&format!("# x\n\n{text} /d.ko \n")),
            vec![
                PathBuf::from("/a.ko"),
                PathBuf::from("/b/c.ko"),
                PathBuf::from("/d.ko")
            ]
        );
    }
}
