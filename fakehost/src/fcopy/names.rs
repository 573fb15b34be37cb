//! Turning what the user typed into the two names START_FILE_COPY carries.
//!
//! The guest daemon builds its target as `path_name + "/" + file_name` and, with CREATE_PATH,
//! creates only the path components that are *followed by* a '/' (fcopy.md §6.1; the qemu-guest
//! notes, pitfall 2). So `path_name` always gets a trailing '/', or the last directory would
//! never be created and the copy would fail with HV_E_FAIL.
//!
//! Both names travel as UTF-16LE in 260-unit fields that must hold a terminating NUL, so each is
//! limited to 259 UTF-16 units. We check that here, before anything is sent, so a too-long name
//! is a clear usage error rather than a half-started copy.

use std::path::Path;

/// The most UTF-16 code units a name may have (260-unit field minus the NUL).
pub const MAX_NAME_UNITS: usize = vmbus::fcopy::W_MAX_PATH - 1;

/// What is wrong with a file or directory name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("the {what} is empty")]
    Empty {
        /// "file name" or "guest directory".
        what: &'static str,
    },
    /// The name does not fit the 260-unit UTF-16 field.
    #[error("the {what} {name:?} is {units} UTF-16 units long; Hyper-V allows at most {max}")]
    TooLong {
        /// "file name" or "guest directory".
        what: &'static str,
        /// The offending name.
        name: String,
        /// Its length in UTF-16 code units.
        units: usize,
        /// [`MAX_NAME_UNITS`].
        max: usize,
    },
    /// The name contains a NUL, which would end it early on the guest.
    #[error("the {what} contains a NUL character")]
    ContainsNul {
        /// "file name" or "guest directory".
        what: &'static str,
    },
    /// The file name contains a '/', which would silently put the file in another directory.
    #[error("the file name {0:?} contains '/'; put directories in GUEST_DIR instead")]
    FileNameHasSlash(String),
    /// The source path has no last component to use as the name (e.g. "/" or "..").
    #[error("cannot take a file name from {0:?}; give one with --name")]
    NoBaseName(String),
    /// The source's last component is not valid Unicode, so it has no UTF-16 form.
    #[error("the file name of {0:?} is not valid UTF-8; give one with --name")]
    NotUnicode(String),
}

/// The file name to send: `--name` if given, else the last component of the source path.
pub fn guest_file_name(source: &Path, name: Option<&str>) -> Result<String, NameError> {
    let name = match name {
        Some(name) => name.to_owned(),
        None => {
            let base = source
                .file_name()
                .ok_or_else(|| NameError::NoBaseName(source.display().to_string()))?;
            base.to_str()
                .ok_or_else(|| NameError::NotUnicode(source.display().to_string()))?
                .to_owned()
        }
    };
    check_file_name(&name)?;
    Ok(name)
}

/// Checks a file name as the host receives it from a client.
pub fn check_file_name(name: &str) -> Result<(), NameError> {
    const WHAT: &str = "file name";
    check_common(WHAT, name)?;
    if name.contains('/') {
        return Err(NameError::FileNameHasSlash(name.to_owned()));
    }
    Ok(())
}

/// The path name to send: the guest directory with a trailing '/' (added if missing).
pub fn guest_path_name(dir: &str) -> Result<String, NameError> {
    const WHAT: &str = "guest directory";
    let mut path = dir.to_owned();
    if !path.ends_with('/') {
        path.push('/');
    }
    // An empty directory would become "/" here; refuse it before that so "" is not the root.
    if dir.is_empty() {
        return Err(NameError::Empty { what: WHAT });
    }
    check_common(WHAT, &path)?;
    Ok(path)
}

fn check_common(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.contains('\0') {
        return Err(NameError::ContainsNul { what });
    }
    let units = name.encode_utf16().count();
    if units > MAX_NAME_UNITS {
        return Err(NameError::TooLong {
            what,
            name: name.to_owned(),
            units,
            max: MAX_NAME_UNITS,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_name_without_trailing_slash_gets_one() {
        assert_eq!(guest_path_name("/srv/incoming").unwrap(), "/srv/incoming/");
    }

    #[test]
    fn path_name_with_trailing_slash_is_unchanged() {
        assert_eq!(guest_path_name("/srv/incoming/").unwrap(), "/srv/incoming/");
        assert_eq!(guest_path_name("/").unwrap(), "/");
    }

    #[test]
    fn empty_path_name_is_refused() {
        assert_eq!(
            guest_path_name(""),
            Err(NameError::Empty {
                what: "guest directory"
            })
        );
    }

    #[test]
    fn path_name_counts_the_added_slash() {
        let exactly = format!("/{}", "d".repeat(MAX_NAME_UNITS - 2));
        assert_eq!(guest_path_name(&exactly).unwrap().len(), MAX_NAME_UNITS);
        let one_more = format!("/{}", "d".repeat(MAX_NAME_UNITS - 1));
        assert!(matches!(
            guest_path_name(&one_more),
            Err(NameError::TooLong { units: 260, .. })
        ));
    }

    #[test]
    fn file_name_defaults_to_the_source_basename() {
        let name = guest_file_name(Path::new("/tmp/x/big.iso"), None).unwrap();
        assert_eq!(name, "big.iso");
    }

    #[test]
    fn explicit_name_wins_over_basename() {
        let name = guest_file_name(Path::new("/tmp/x/big.iso"), Some("other.bin")).unwrap();
        assert_eq!(name, "other.bin");
    }

    #[test]
    fn source_without_basename_needs_name() {
        assert!(matches!(
            guest_file_name(Path::new("/"), None),
            Err(NameError::NoBaseName(_))
        ));
    }

    #[test]
    fn file_name_of_259_units_is_accepted_and_260_refused() {
        assert!(check_file_name(&"a".repeat(259)).is_ok());
        let err = check_file_name(&"a".repeat(260)).unwrap_err();
        assert!(err.to_string().contains("260 UTF-16 units"), "{err}");
    }

    #[test]
    fn too_long_is_counted_in_utf16_units_not_bytes() {
        // U+1F600 is 4 UTF-8 bytes but 2 UTF-16 units: 129 of them = 258 units, fine.
        assert!(check_file_name(&"\u{1F600}".repeat(129)).is_ok());
        // 130 of them = 260 units: too long although only 130 characters.
        assert!(matches!(
            check_file_name(&"\u{1F600}".repeat(130)),
            Err(NameError::TooLong { units: 260, .. })
        ));
        // 259 two-byte UTF-8 characters are 259 units: fine.
        assert!(check_file_name(&"é".repeat(259)).is_ok());
    }

    #[test]
    fn file_name_with_slash_or_nul_is_refused() {
        assert!(matches!(
            check_file_name("a/b"),
            Err(NameError::FileNameHasSlash(_))
        ));
        assert!(matches!(
            check_file_name("a\0b"),
            Err(NameError::ContainsNul { .. })
        ));
    }
}
