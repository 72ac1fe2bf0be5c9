//! Compiled kernel modules kept on disk, so that a second process (a second test, the
//! explorer's next start) loads them at once instead of spending NVRTC's tens of seconds
//! again. A module's file is named by a hash of everything that changes its PTX: the
//! source text, the compile options and include directory, and NVRTC's version.
//!
//! The directory is `$LINATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/linattn/ptx`, else
//! `~/.cache/linattn/ptx`. A cache that cannot be read or written is passed by: the
//! module is compiled as if there were none.

use std::path::{Path, PathBuf};

/// The cache's directory, if one can be named.
pub(super) fn directory() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("LINATTN_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join("linattn").join("ptx"))
}

/// The file of the module whose PTX `parts` (source, options, versions) determine.
pub(super) fn file(directory: &Path, module: &str, parts: &[&str]) -> PathBuf {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for part in parts {
        // The length first, so that no two lists of parts hash the same text.
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    directory.join(format!("{module}-{:032x}.ptx", hasher.digest128()))
}

/// The PTX stored in `file`, if it is there and readable.
pub(super) fn load(file: &Path) -> Option<String> {
    std::fs::read_to_string(file)
        .ok()
        .filter(|ptx| !ptx.is_empty())
}

/// Stores `ptx` in `file`, whole or not at all (a temporary file renamed into place, so
/// that a process reading at the same time never sees half of it). Failure is ignored:
/// the cache only saves time.
pub(super) fn store(file: &Path, ptx: &str) {
    let Some(directory) = file.parent() else {
        return;
    };
    let stored = std::fs::create_dir_all(directory)
        .and_then(|()| tempfile::NamedTempFile::new_in(directory))
        .and_then(|mut temporary| {
            std::io::Write::write_all(&mut temporary, ptx.as_bytes())?;
            temporary.persist(file).map_err(|e| e.error)?;
            Ok(())
        });
    drop(stored);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_stored_whole_and_keyed_by_everything_that_changes_them() {
        let directory = tempfile::tempdir().unwrap();
        let key = |parts: &[&str]| file(directory.path(), "linear.cu", parts);
        let first = key(&["source", "--std=c++17", "13.0"]);
        assert_eq!(first, key(&["source", "--std=c++17", "13.0"]));
        for other in [
            key(&["source!", "--std=c++17", "13.0"]),
            key(&["source", "--std=c++20", "13.0"]),
            key(&["source", "--std=c++17", "13.1"]),
            key(&["sourc", "e--std=c++17", "13.0"]),
        ] {
            assert_ne!(first, other);
        }
        assert_eq!(load(&first), None);
        store(&first, ".version 8.8\n.target sm_90a\n");
        assert_eq!(
            load(&first).as_deref(),
            Some(".version 8.8\n.target sm_90a\n")
        );
        // Only the module's own file: no temporary left beside it.
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1);
    }
}
