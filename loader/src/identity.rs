//! Chunk identity: the one check that a chunk is the one its place names, and the names kvfs
//! gives places.
//!
//! A chunk lives at `<namespace dir>/<key>.kvc` on disk, in a mount and in a bucket. The name
//! is a claim: the file's header must carry that key, and its namespace id must be the one the
//! directory names. A namespace directory is `<slug>-<16 hex>`; the 16 hex digits (a prefix of
//! the namespace id, see [`ModelSpec::namespace_dir`](crate::spec::ModelSpec::namespace_dir))
//! are its identity and the slug is for people. Every tier (the store's disk and memory, the
//! mount's incoming files, the S3 client's fetches) checks a chunk with [`check_identity`], and
//! reads a directory's identity with [`namespace_suffix`], so "key matches the name, namespace
//! id matches the directory" means the same thing everywhere.
//!
//! The constants are the fixed names of files and attributes that more than one crate (and
//! people) rely on; they are part of the on-disk and on-mount format.

use crate::error::FormatError;
use crate::format::ChunkHeader;
use crate::key::ChunkKey;
use crate::spec::NamespaceId;

/// Extension of a chunk file (`<64 hex>.kvc`).
pub const CHUNK_EXT: &str = "kvc";
/// The readable model spec written beside the chunks of a namespace (on disk and in a bucket).
pub const NAMESPACE_JSON: &str = "namespace.json";
/// Extended attribute a kvfs mount sets on a chunk: the absolute path of its local file.
pub const BACKING_XATTR: &str = "user.kvfs.backing";
/// Read-only status directory at the root of a kvfs mount.
pub const STATUS_DIR: &str = ".kvfs";
/// Store counters (JSON) inside [`STATUS_DIR`].
pub const STATS_FILE: &str = "stats.json";
/// Mount description (JSON) inside [`STATUS_DIR`]; its presence means the mount is serving.
pub const MOUNT_INFO_FILE: &str = "mount.json";
/// Number of hex digits of the namespace id that end a namespace directory's name.
pub const NAMESPACE_SUFFIX_LEN: usize = 16;

/// The identity part of a namespace directory name: what follows its last `-`. `None` when
/// there is no `-`. Says nothing of validity; see
/// [`validate_namespace_dir`](crate::spec::validate_namespace_dir).
pub fn namespace_suffix(ns_dir: &str) -> Option<&str> {
    ns_dir.rsplit_once('-').map(|(_, id)| id)
}

/// Whether `ns_dir` is a directory name of namespace `id` (its suffix is the id's first 16
/// hex digits).
pub fn namespace_matches(ns_dir: &str, id: &NamespaceId) -> bool {
    namespace_suffix(ns_dir) == Some(&id.to_hex()[..NAMESPACE_SUFFIX_LEN])
}

/// Checks that namespace `id` belongs in directory `ns_dir`
/// ([`FormatError::NamespaceMismatch`] otherwise).
pub fn check_namespace(ns_dir: &str, id: &NamespaceId) -> Result<(), FormatError> {
    if namespace_matches(ns_dir, id) {
        Ok(())
    } else {
        Err(FormatError::NamespaceMismatch {
            expected: ns_dir.to_string(),
            found: id.to_hex(),
        })
    }
}

/// Checks that a parsed header is the chunk named `key` in namespace directory `ns_dir`: the
/// key matches the name ([`FormatError::NameMismatch`]), then the namespace id matches the
/// directory ([`FormatError::NamespaceMismatch`]).
pub fn check_identity(
    header: &ChunkHeader,
    ns_dir: &str,
    key: &ChunkKey,
) -> Result<(), FormatError> {
    if header.meta.key != *key {
        return Err(FormatError::NameMismatch {
            name: key.file_name(),
            key: header.meta.key.to_hex(),
        });
    }
    check_namespace(ns_dir, &header.meta.namespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;

    fn spec() -> ModelSpec {
        ModelSpec::preset("tiny").expect("preset")
    }

    #[test]
    fn suffix_is_what_follows_the_last_dash() {
        assert_eq!(namespace_suffix("a-b-0123"), Some("0123"));
        assert_eq!(namespace_suffix("nodash"), None);
        assert_eq!(namespace_suffix("trailing-"), Some(""));
    }

    #[test]
    fn a_spec_matches_its_own_directory_only() {
        let s = spec();
        let id = s.namespace_id();
        let dir = s.namespace_dir();
        assert!(namespace_matches(&dir, &id));
        assert!(check_namespace(&dir, &id).is_ok());
        let other = format!("other-{}", &id.to_hex()[..NAMESPACE_SUFFIX_LEN]);
        assert!(namespace_matches(&other, &id), "the slug is not identity");
        for bad in [
            "nodash".to_string(),
            format!("{dir}0"),
            format!("x-{}", &id.to_hex()[..15]),
            "x-0000000000000000".to_string(),
        ] {
            assert!(
                matches!(
                    check_namespace(&bad, &id),
                    Err(FormatError::NamespaceMismatch { ref expected, ref found })
                        if *expected == bad && *found == id.to_hex()
                ),
                "{bad} must not match"
            );
        }
    }

    #[test]
    fn a_chunk_is_checked_against_its_name_then_its_directory() {
        let s = spec();
        let tokens: Vec<u32> = (0..s.chunk_tokens).collect();
        let (meta, bytes) =
            crate::format::synth_chunk(&s, None, crate::key::SaltTag::NONE, tokens).unwrap();
        let header = ChunkHeader::parse(&bytes).unwrap();
        let dir = s.namespace_dir();
        check_identity(&header, &dir, &meta.key).unwrap();

        let other_key = ChunkKey([7; 32]);
        assert!(matches!(
            check_identity(&header, &dir, &other_key),
            Err(FormatError::NameMismatch { ref name, ref key })
                if *name == other_key.file_name() && *key == meta.key.to_hex()
        ));
        assert!(matches!(
            check_identity(&header, "elsewhere-0000000000000000", &meta.key),
            Err(FormatError::NamespaceMismatch { ref expected, .. })
                if expected == "elsewhere-0000000000000000"
        ));
        // Both wrong: the name is reported first.
        assert!(matches!(
            check_identity(&header, "elsewhere-0000000000000000", &other_key),
            Err(FormatError::NameMismatch { .. })
        ));
    }
}
