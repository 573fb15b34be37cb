//! What a device name may be: the `misc_register()` name, relative to /dev. Both frontends and
//! the driver table's tests use these checks, so a row's node is accepted everywhere or nowhere.
//!
//! `vmbus/hv_fcopy` is a file in a directory (a FUSE mount of `/dev/vmbus`); `lguest` is a
//! node right in /dev (a FUSE mount on the file `/dev/lguest`). Nothing may climb out of /dev.

use super::attr::NAME_MAX;

/// Where a device's node goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeName<'a> {
    /// `dir/leaf`: file `leaf` in the directory `dir` (itself possibly `a/b`).
    InDir { dir: &'a str, leaf: &'a str },
    /// A node directly in /dev.
    TopLevel(&'a str),
}

/// Checks a directory entry name: what a directory mount accepts, what LOOKUP could find.
pub fn check_leaf(leaf: &str) -> Result<(), &'static str> {
    if leaf.is_empty() {
        Err("the name is empty")
    } else if leaf == "." || leaf == ".." {
        Err("\".\" and \"..\" are not device names")
    } else if leaf.contains('/') || leaf.contains('\0') {
        Err("a name inside a directory cannot contain '/' or NUL")
    } else if leaf.len() > NAME_MAX {
        Err("the name is longer than 255 bytes")
    } else {
        Ok(())
    }
}

/// Splits a device name at its last '/', checking every component; the error says why the
/// name is refused.
pub fn parse_node_name(name: &str) -> Result<NodeName<'_>, &'static str> {
    if name.starts_with('/') {
        return Err("the name is relative to /dev and cannot start with '/'");
    }
    match name.rsplit_once('/') {
        None => check_leaf(name).map(|()| NodeName::TopLevel(name)),
        Some((dir, leaf)) => {
            dir.split('/').try_for_each(check_leaf)?;
            check_leaf(leaf)?;
            Ok(NodeName::InDir { dir, leaf })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_names_are_checked() {
        assert!(check_leaf("hv_fcopy").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_leaf(bad).is_err(), "{bad:?}");
        }
        assert!(check_leaf(&"x".repeat(256)).is_err());
    }

    #[test]
    fn names_split_at_the_last_slash_or_are_top_level() {
        assert_eq!(
            parse_node_name("vmbus/hv_fcopy"),
            Ok(NodeName::InDir {
                dir: "vmbus",
                leaf: "hv_fcopy"
            })
        );
        assert_eq!(
            parse_node_name("a/b/c"),
            Ok(NodeName::InDir {
                dir: "a/b",
                leaf: "c"
            })
        );
        for top in ["lguest", "azure_xs_fastpath"] {
            assert_eq!(parse_node_name(top), Ok(NodeName::TopLevel(top)));
        }
    }

    #[test]
    fn malformed_names_are_refused_with_a_reason() {
        for bad in [
            "", "/lguest", "/vmbus/x", "vmbus/", "vmbus//x", "../x", "vmbus/..", "..", ".", "a\0",
        ] {
            assert!(parse_node_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_node_name("/lguest"),
            Err("the name is relative to /dev and cannot start with '/'")
        );
    }
}
