//! The disk under the models: room for a download, and file checksums.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Room left on the disk beyond the file itself.
pub const DISK_MARGIN: u64 = 64 << 20;

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `stat` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Refuses to write `need` more bytes of `what` under `dir` (or its nearest
/// existing parent) when that would leave less than [`DISK_MARGIN`] free.
pub fn ensure_room(dir: &Path, need: u64, what: &str) -> Result<(), String> {
    let mut existing = dir.to_path_buf();
    while !existing.exists() && existing.pop() {}
    match free_space(&existing) {
        Some(free) if !has_room(free, need) => Err(format!(
            "not enough disk space for {what}: it needs {} MB and {} has {} MB free",
            need >> 20,
            existing.display(),
            free >> 20
        )),
        _ => Ok(()),
    }
}

/// Whether a write failed because the disk is full.
pub fn is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

/// The partial downloads (`*.part`) under `dir`, with their sizes.
pub fn partial_files(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(listing) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in listing.flatten() {
            let Ok(meta) = item.metadata() else { continue };
            let path = item.path();
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() && path.extension().is_some_and(|e| e == "part") {
                found.push((path, meta.len()));
            }
        }
    }
    found
}

fn has_room(free: u64, need: u64) -> bool {
    need.checked_add(DISK_MARGIN).is_some_and(|n| free >= n)
}

pub fn sha256_file(path: &Path) -> Result<String, String> {
    sha256_file_reporting(path, |_| {})
}

/// [`sha256_file`], telling `hashed` how many bytes are done as it goes.
pub fn sha256_file_reporting(path: &Path, hashed: impl FnMut(u64)) -> Result<String, String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    hash_reader_reporting(&mut file, &mut hasher, hashed)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// Feeds everything `r` holds to `hasher`; the number of bytes read.
pub fn hash_reader(r: &mut impl Read, hasher: &mut Sha256) -> std::io::Result<u64> {
    hash_reader_reporting(r, hasher, |_| {})
}

fn hash_reader_reporting(
    r: &mut impl Read,
    hasher: &mut Sha256,
    mut hashed: impl FnMut(u64),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        hashed(total);
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_needs_its_size_and_a_margin() {
        assert!(has_room(DISK_MARGIN + 10, 10));
        assert!(!has_room(DISK_MARGIN + 9, 10));
        assert!(!has_room(u64::MAX, u64::MAX));
    }

    #[test]
    fn checksums_are_lowercase_hex_sha256() {
        let mut hasher = Sha256::new();
        let n = hash_reader(&mut &b"abc"[..], &mut hasher).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            hex(&hasher.finalize()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_missing_directory_is_judged_by_its_nearest_parent() {
        assert!(ensure_room(Path::new("/tmp/rbee-no-such/dir"), 1, "x").is_ok());
        let err = ensure_room(Path::new("/tmp"), u64::MAX / 2, "big.gguf").unwrap_err();
        assert!(err.contains("big.gguf") && err.contains("/tmp"), "{err}");
    }
}
