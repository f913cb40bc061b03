//! Download a chunk straight into a cache file, verifying it layer by layer as it arrives.
//!
//! `sync pull` of large chunks is bound by memory bandwidth on small machines: collecting a
//! 32 MiB object into a fresh buffer, hashing it, then copying it into the page cache touches
//! every byte three times while it is cold. Here the body is consumed frame by frame: bytes
//! gather in one reused buffer until the header is complete ([`ChunkHeader::parse`], all
//! header checks) and then until each layer's span is complete
//! ([`ChunkHeader::verify_layer`], the loader's own per-layer digest and padding check), and
//! each verified piece is written to the temporary file while it is still in cache. The
//! verification is exactly `Verify::Full` (header, every layer, exact length), done by the
//! loader's code; only the order is streaming. The file is committed with
//! [`kvfs_loader::dir::commit_with`] (temporary file, then link), so a chunk that fails any
//! check, or a body cut short, leaves nothing behind.
//!
//! An object coded losslessly (the remote codec, `crate::codec`) is written decoded: the raw
//! header rebuilt from the coded one (its raw layer digests) and each layer decoded as soon as
//! its stored span is verified, then checked against its raw digest, so the local file is the
//! raw chunk.

use crate::client::check_identity;
use kvfs_loader::codec::Coder;
use kvfs_loader::{ChunkHeader, ChunkKey, Codec, FormatError};
use std::fs::File;
use std::io::Write;

/// Feeds body frames, verifying and writing as soon as a header or a layer is complete.
pub(crate) struct StreamingChunk<'a> {
    ns_dir: &'a str,
    key: ChunkKey,
    header: Option<ChunkHeader>,
    pending: Vec<u8>,
    next_layer: u32,
    received: u64,
    /// Decoder state and one decoded layer, for lossless objects.
    coder: Option<Box<Coder>>,
    raw: Vec<u8>,
}

impl<'a> StreamingChunk<'a> {
    pub fn new(ns_dir: &'a str, key: ChunkKey) -> Self {
        StreamingChunk {
            ns_dir,
            key,
            header: None,
            pending: Vec::with_capacity(4 << 20),
            next_layer: 0,
            received: 0,
            coder: None,
            raw: Vec::new(),
        }
    }

    /// Takes the next frame of the body; writes whatever is verified to `out`.
    pub fn feed(&mut self, frame: &[u8], out: &mut File) -> Result<(), FormatError> {
        self.received += frame.len() as u64;
        self.pending.extend_from_slice(frame);
        let mut used = 0;
        loop {
            let avail = &self.pending[used..];
            match &self.header {
                None => {
                    if avail.len() < kvfs_loader::format::FIXED_HEADER_LEN {
                        break;
                    }
                    let header_len = ChunkHeader::peek_header_len(avail)? as usize;
                    if avail.len() < header_len {
                        break;
                    }
                    let header = ChunkHeader::parse(&avail[..header_len])?;
                    check_identity(&header, self.ns_dir, &self.key)?;
                    if self.received > header.file_len() {
                        return Err(FormatError::SizeMismatch {
                            expected: header.file_len(),
                            actual: self.received,
                        });
                    }
                    match header.stored() {
                        Some(t) if t.codec == Codec::Lossless => {
                            out.write_all(&kvfs_loader::format::raw_header(
                                &header.meta,
                                header.importance.as_ref(),
                                &t.raw_digests,
                            )?)?;
                            self.coder = Some(Box::default());
                        }
                        _ => out.write_all(&avail[..header_len])?,
                    }
                    used += header_len;
                    self.header = Some(header);
                }
                Some(h) => {
                    if self.received > h.file_len() {
                        return Err(FormatError::SizeMismatch {
                            expected: h.file_len(),
                            actual: self.received,
                        });
                    }
                    if self.next_layer >= h.geometry.num_layers {
                        break;
                    }
                    let span = h.layer_span(self.next_layer);
                    let span_len = (span.end - span.start) as usize;
                    if avail.len() < span_len {
                        break;
                    }
                    match (h.stored(), &mut self.coder) {
                        (Some(t), Some(coder)) => {
                            let l = self.next_layer;
                            let digest = &h.layer_digests[l as usize];
                            t.decode_layer(
                                &h.meta,
                                &h.geometry,
                                l,
                                digest,
                                &avail[..span_len],
                                coder,
                                &mut self.raw,
                            )?;
                            out.write_all(&self.raw)?;
                        }
                        _ => {
                            h.verify_layer(self.next_layer, &avail[..span_len])?;
                            out.write_all(&avail[..span_len])?;
                        }
                    }
                    used += span_len;
                    self.next_layer += 1;
                }
            }
        }
        self.pending.drain(..used);
        Ok(())
    }

    /// The body ended: everything must have been received and verified.
    pub fn finish(self) -> Result<u64, FormatError> {
        let Some(h) = &self.header else {
            return Err(match ChunkHeader::peek_header_len(&self.pending) {
                Err(e) => e,
                Ok(n) => FormatError::Truncated {
                    needed: n,
                    have: self.received,
                },
            });
        };
        h.check_len(self.received)?;
        debug_assert!(self.pending.is_empty() && self.next_layer == h.geometry.num_layers);
        Ok(self.received)
    }
}

/// Verifies a whole chunk held in memory frame by frame (test helper for equivalence with
/// `ChunkView::parse(.., Verify::Full)`).
#[cfg(test)]
fn verify_in_frames(
    bytes: &[u8],
    frame: usize,
    ns_dir: &str,
    key: ChunkKey,
) -> Result<Vec<u8>, FormatError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x");
    let mut f = File::create(&path).unwrap();
    let mut s = StreamingChunk::new(ns_dir, key);
    for c in bytes.chunks(frame.max(1)) {
        s.feed(c, &mut f)?;
    }
    s.finish()?;
    drop(f);
    Ok(std::fs::read(&path).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::verify_object;
    use kvfs_loader::{ModelSpec, SaltTag, synth_chunk};

    #[test]
    fn streaming_verification_matches_full_verification() {
        let spec = ModelSpec::preset("tiny").unwrap();
        let ns = spec.namespace_dir();
        let (meta, good) = synth_chunk(&spec, None, SaltTag::NONE, (0..40).collect()).unwrap();
        for frame in [1usize, 7, 4096, 5000, 1 << 20] {
            assert_eq!(verify_in_frames(&good, frame, &ns, meta.key).unwrap(), good);
        }
        // Every single-byte corruption at a spread of offsets, plus truncation and extension:
        // the streaming check and the whole-buffer check agree.
        let mut cases: Vec<Vec<u8>> = (0..good.len())
            .step_by(997)
            .map(|i| {
                let mut b = good.clone();
                b[i] ^= 0x10;
                b
            })
            .collect();
        cases.push(good[..good.len() - 1].to_vec());
        cases.push(good[..100].to_vec());
        cases.push(Vec::new());
        let mut longer = good.clone();
        longer.push(0);
        cases.push(longer);
        for (i, bad) in cases.iter().enumerate() {
            let whole = verify_object(bad, &ns, &meta.key);
            let streamed = verify_in_frames(bad, 3000, &ns, meta.key);
            assert_eq!(
                whole.is_ok(),
                streamed.is_ok(),
                "case {i}: {whole:?} vs {:?}",
                streamed.err()
            );
            if bad != &good {
                assert!(streamed.is_err(), "case {i}");
            }
        }
        // Right bytes, wrong name or namespace.
        assert!(matches!(
            verify_in_frames(&good, 4096, &ns, ChunkKey([0; 32])),
            Err(FormatError::NameMismatch { .. })
        ));
        let other = ModelSpec::preset("llama-3-8b").unwrap().namespace_dir();
        assert!(matches!(
            verify_in_frames(&good, 4096, &other, meta.key),
            Err(FormatError::NamespaceMismatch { .. })
        ));
    }
}
