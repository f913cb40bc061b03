//! The remote codec (`[s3] codec`): chunks travel and rest in the bucket encoded with a
//! lossless codec, while local chunks stay raw for the fastest loads.
//!
//! - **Upload**: a raw chunk (already fully verified by the caller) is transcoded to the
//!   configured codec before its PUT; the object's digest metadata is the coded chunk's
//!   payload digest, and a second entry records the raw chunk's, so that `sync push` sees an
//!   object that holds its local chunk from a HEAD, without encoding the chunk again. A chunk
//!   that is already coded (a lossy namespace's) goes as it is.
//! - **Download**: an object coded losslessly is verified (stored digests) and decoded, and
//!   every decoded layer is checked against the raw layer digest the coded header keeps,
//!   before anything is committed locally; the local file is the raw chunk, byte for byte.
//!
//! Keys, object names and namespaces do not change: a lossless chunk is the same chunk.
//! Downloads decode whatever codec an object has, so a bucket may mix raw and coded objects
//! (a codec switched on later re-encodes nothing that is already there).

use crate::client::ObjectDigests;
use bytes::Bytes;
use kvfs_loader::codec::stored::transcode;
use kvfs_loader::{ChunkHeader, Codec, FormatError};

/// What to upload for a verified local chunk whose payload digest is `digest`: the bytes
/// and the digests to record.
pub(crate) fn encode_for_upload(
    codec: Codec,
    bytes: Bytes,
    digest: [u8; 32],
) -> Result<(Bytes, ObjectDigests), FormatError> {
    if codec == Codec::Raw {
        return Ok((bytes, ObjectDigests::stored(digest)));
    }
    let header = ChunkHeader::parse(&bytes)?;
    if header.codec != Codec::Raw {
        return Ok((bytes, ObjectDigests::stored(digest)));
    }
    let coded = transcode(&bytes, codec)?;
    let digests = ObjectDigests {
        stored: ChunkHeader::parse(&coded)?.payload_digest,
        raw: Some(digest),
    };
    Ok((Bytes::from(coded), digests))
}

/// The local form of a verified object: raw when it was coded losslessly.
pub(crate) fn decode_download(bytes: Bytes) -> Result<Bytes, FormatError> {
    let header = ChunkHeader::parse(&bytes)?;
    if header.codec != Codec::Lossless {
        return Ok(bytes);
    }
    Ok(Bytes::from(transcode(&bytes, Codec::Raw)?))
}
