//! Errors of the chunk identity and format layer.
//!
//! Every way a chunk file can be wrong has its own variant, so callers (the store, the mount,
//! the loader, the CLI) can count, report and quarantine precisely, and tests can assert the
//! exact failure rather than "some error".

use crate::codec::{Codec, CodecError};
use std::io;

/// A `.kvc` chunk file (or a name that should be one) is not what it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("chunk is truncated: need at least {needed} bytes, have {have}")]
    Truncated { needed: u64, have: u64 },
    #[error("not a kvfs chunk: bad magic {found:02x?}")]
    BadMagic { found: [u8; 8] },
    #[error(
        "unsupported chunk format version {found} (this build reads versions 1 to {supported})"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("chunk header checksum mismatch (header is corrupt)")]
    HeaderChecksum,
    #[error("chunk header field `{field}` is invalid: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("chunk payload digest mismatch in layer {layer} (payload is corrupt)")]
    PayloadDigest { layer: u32 },
    #[error("chunk padding is not zero at byte offset {offset}")]
    NonZeroPadding { offset: u64 },
    #[error("chunk file size {actual} does not match the size its header describes ({expected})")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error(
        "chunk key {stored} does not match its namespace, parent and tokens (expected {computed})"
    )]
    KeyMismatch { stored: String, computed: String },
    #[error("chunk belongs to namespace {found}, expected {expected}")]
    NamespaceMismatch { expected: String, found: String },
    #[error("chunk is stored under name {name} but its key is {key}")]
    NameMismatch { name: String, key: String },
    #[error("`{0}` is not a chunk key (64 lowercase hex digits)")]
    BadKey(String),
    #[error("`{0}` is not a valid chunk file name (`<64 hex>.kvc`)")]
    BadName(String),
    #[error("chunk file `{found}` is in the wrong directory: its key puts it under `{expected}/`")]
    Misplaced { found: String, expected: String },
    #[error("`{0}` is not a valid namespace directory name")]
    BadNamespace(String),
    #[error(
        "chunk uses codec {value}, which this build does not know (it knows {known})",
        known = Codec::known_names()
    )]
    UnknownCodec { value: u8 },
    #[error("chunk stored bytes ({codec}) fail their digest in layer {layer} (payload is corrupt)")]
    StoredDigest { codec: Codec, layer: u32 },
    #[error("chunk decoded bytes ({codec}) do not match the raw digest of layer {layer}")]
    DecodedDigest { codec: Codec, layer: u32 },
    #[error("chunk layer {layer} plane {plane} group {group} does not decode: {source}")]
    Decode {
        layer: u32,
        plane: u32,
        group: u32,
        source: CodecError,
    },
    #[error("chunk is {codec}-coded: its planes are decoded, not borrowed")]
    Coded { codec: Codec },
    #[error(transparent)]
    Codec(CodecError),
    #[error("chunk I/O failed: {0}")]
    Io(#[from] io::Error),
}

impl FormatError {
    pub(crate) fn field(field: &'static str, reason: impl Into<String>) -> Self {
        FormatError::BadField {
            field,
            reason: reason.into(),
        }
    }
}
