//! Prefix-chained chunk keys.
//!
//! A prompt is cut into chunks of `chunk_tokens` tokens. The key of chunk `i` commits to the
//! namespace, to the key of chunk `i - 1` (so to every earlier token), to an optional tenant
//! salt and to the tokens of chunk `i`:
//!
//! ```text
//! key_i = blake3_derive_key("kvfs 2026-11 chunk key v1",
//!           namespace_id[32] || has_parent[1] || parent_key[32 or 0] || salt_tag[32]
//!           || token_count u32 LE || tokens as u32 LE)
//! ```
//!
//! The same tokens give the same key on every host, process and version; the golden-vector
//! test below pins that. A salt (like vLLM's `cache_salt`) isolates tenants: it enters the key
//! as `salt_tag = blake3_derive_key("kvfs 2026-11 salt v1", salt)`, which is also stored in the
//! chunk header, so any reader can check a key against its tokens without learning the salt
//! itself. The all-zero tag means "no salt".
//!
//! **The trailing partial chunk of a prompt** (`tokens.len() % chunk_tokens` tokens after the
//! last full chunk) is keyed by the same derivation, with the last full chunk as its parent
//! ([`prompt_chunk_keys`]). It can never share a key with a full chunk: the token count is
//! hashed, a full chunk's count is `chunk_tokens` and a partial one's is less, and
//! `chunk_tokens` is part of the namespace id (so two namespaces never compare counts). A
//! partial chunk is only found by the same tail: a prompt that extends it has other tokens in
//! that chunk, so another key (it still reuses every full chunk before it).
//!
//! **Position-independent chunks** (format v2, blending) have a key of their own derivation,
//! with no parent: the same document tokens have the same key wherever the document lands in
//! a prompt, so a document's KV is found again after any other documents.
//!
//! ```text
//! key = blake3_derive_key("kvfs 2026-11 independent chunk key v1",
//!         namespace_id[32] || salt_tag[32] || token_count u32 LE || tokens as u32 LE)
//! ```
//!
//! A document is cut at `chunk_tokens` like a prompt, but its last, partial chunk gets a key
//! too ([`independent_chunk_keys`]): a document ends where it ends, no later request extends it.

use crate::error::FormatError;
use crate::identity::CHUNK_EXT;
use crate::spec::NamespaceId;
use std::fmt;

const KEY_CONTEXT: &str = "kvfs 2026-11 chunk key v1";
const SALT_CONTEXT: &str = "kvfs 2026-11 salt v1";
const INDEPENDENT_KEY_CONTEXT: &str = "kvfs 2026-11 independent chunk key v1";

/// The 32-byte identity of one chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub [u8; 32]);

/// Tag of a tenant salt; all zeros when there is none.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct SaltTag(pub [u8; 32]);

impl SaltTag {
    pub const NONE: SaltTag = SaltTag([0; 32]);

    /// Tag of `salt`; an empty salt is no salt.
    pub fn of(salt: &[u8]) -> SaltTag {
        if salt.is_empty() {
            return SaltTag::NONE;
        }
        let mut h = blake3::Hasher::new_derive_key(SALT_CONTEXT);
        h.update(salt);
        SaltTag(*h.finalize().as_bytes())
    }

    pub fn is_none(&self) -> bool {
        self.0 == [0; 32]
    }
}

pub(crate) fn hex32(b: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for &x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

impl ChunkKey {
    /// Key of one chunk given its parent's key (None for the first chunk of a prompt).
    pub fn derive(
        ns: &NamespaceId,
        parent: Option<&ChunkKey>,
        salt: &SaltTag,
        tokens: &[u32],
    ) -> ChunkKey {
        let mut h = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        h.update(&ns.0);
        match parent {
            Some(p) => {
                h.update(&[1]);
                h.update(&p.0);
            }
            None => {
                h.update(&[0]);
            }
        }
        h.update(&salt.0);
        hash_tokens(&mut h, tokens);
        ChunkKey(*h.finalize().as_bytes())
    }

    /// Key of a position-independent chunk: namespace, salt and its own tokens only.
    pub fn derive_independent(ns: &NamespaceId, salt: &SaltTag, tokens: &[u32]) -> ChunkKey {
        let mut h = blake3::Hasher::new_derive_key(INDEPENDENT_KEY_CONTEXT);
        h.update(&ns.0);
        h.update(&salt.0);
        hash_tokens(&mut h, tokens);
        ChunkKey(*h.finalize().as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex32(&self.0)
    }

    /// Parses 64 lowercase hex digits. Uppercase is refused so every key has one spelling
    /// (one file name).
    pub fn from_hex(s: &str) -> Result<ChunkKey, FormatError> {
        let bad = || FormatError::BadKey(s.chars().take(80).collect());
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            let nib = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            out[i] = (nib(pair[0]).ok_or_else(bad)? << 4) | nib(pair[1]).ok_or_else(bad)?;
        }
        Ok(ChunkKey(out))
    }

    /// File name of the chunk: `<64 hex>.kvc`.
    pub fn file_name(&self) -> String {
        format!("{}.{CHUNK_EXT}", self.to_hex())
    }

    /// Parses a chunk file name (`<64 hex>.kvc`), refusing anything else (including paths).
    pub fn from_file_name(name: &str) -> Result<ChunkKey, FormatError> {
        let stem = name
            .strip_suffix(CHUNK_EXT)
            .and_then(|s| s.strip_suffix('.'))
            .ok_or_else(|| FormatError::BadName(name.chars().take(80).collect()))?;
        ChunkKey::from_hex(stem).map_err(|_| FormatError::BadName(name.chars().take(80).collect()))
    }
}

/// Hashes the token count (u32 LE) and the tokens as little-endian u32, in stack-sized
/// batches to avoid an allocation.
fn hash_tokens(h: &mut blake3::Hasher, tokens: &[u32]) {
    h.update(&(tokens.len() as u32).to_le_bytes());
    let mut buf = [0u8; 1024];
    for batch in tokens.chunks(buf.len() / 4) {
        for (dst, t) in buf.chunks_exact_mut(4).zip(batch) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..batch.len() * 4]);
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkKey({})", self.to_hex())
    }
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::str::FromStr for ChunkKey {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChunkKey::from_hex(s)
    }
}

/// One chunk of a prompt: its key, its parent and the token range it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    pub key: ChunkKey,
    pub parent: Option<ChunkKey>,
    /// Index of the chunk in the prompt.
    pub index: usize,
    /// Token range `[start, end)` in the prompt.
    pub start: usize,
    pub end: usize,
}

/// Keys of every *full* chunk of `tokens`. The trailing partial chunk, if any, is left out:
/// [`prompt_chunk_keys`] includes it.
pub fn chunk_keys(
    ns: &NamespaceId,
    salt: &SaltTag,
    chunk_tokens: usize,
    tokens: &[u32],
) -> Vec<ChunkRef> {
    assert!(chunk_tokens > 0, "chunk_tokens must be positive");
    let mut out = Vec::with_capacity(tokens.len() / chunk_tokens);
    let mut parent: Option<ChunkKey> = None;
    for (index, chunk) in tokens.chunks_exact(chunk_tokens).enumerate() {
        let key = ChunkKey::derive(ns, parent.as_ref(), salt, chunk);
        out.push(ChunkRef {
            key,
            parent,
            index,
            start: index * chunk_tokens,
            end: (index + 1) * chunk_tokens,
        });
        parent = Some(key);
    }
    out
}

/// Keys of every chunk of a prompt: the full chunks of [`chunk_keys`], then, when
/// `tokens.len()` is not a multiple of `chunk_tokens`, the trailing partial chunk, chained to
/// the last full chunk like any other (see the module docs on why its key never equals a full
/// chunk's).
pub fn prompt_chunk_keys(
    ns: &NamespaceId,
    salt: &SaltTag,
    chunk_tokens: usize,
    tokens: &[u32],
) -> Vec<ChunkRef> {
    let mut out = chunk_keys(ns, salt, chunk_tokens, tokens);
    let full = tokens.len() / chunk_tokens * chunk_tokens;
    if full < tokens.len() {
        let parent = out.last().map(|c| c.key);
        out.push(ChunkRef {
            key: ChunkKey::derive(ns, parent.as_ref(), salt, &tokens[full..]),
            parent,
            index: out.len(),
            start: full,
            end: tokens.len(),
        });
    }
    out
}

/// Keys of the position-independent chunks of one document: every `chunk_tokens` tokens, and
/// the last, partial chunk too. Ranges are document-relative; no chunk has a parent.
pub fn independent_chunk_keys(
    ns: &NamespaceId,
    salt: &SaltTag,
    chunk_tokens: usize,
    document: &[u32],
) -> Vec<ChunkRef> {
    assert!(chunk_tokens > 0, "chunk_tokens must be positive");
    document
        .chunks(chunk_tokens)
        .enumerate()
        .map(|(index, chunk)| ChunkRef {
            key: ChunkKey::derive_independent(ns, salt, chunk),
            parent: None,
            index,
            start: index * chunk_tokens,
            end: index * chunk_tokens + chunk.len(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;

    /// Golden vectors: these hex strings must never change without a new key context.
    /// If this test fails, keys written by earlier versions would no longer be found.
    #[test]
    fn golden_keys() {
        let spec = ModelSpec::preset("llama-3-8b").unwrap();
        let ns = spec.namespace_id();
        assert_eq!(ns.to_hex(), GOLDEN_NS);
        let tokens: Vec<u32> = (0..512u32)
            .map(|i| i.wrapping_mul(2654435761) % 128256)
            .collect();
        let keys = chunk_keys(&ns, &SaltTag::NONE, 256, &tokens);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].key.to_hex(), GOLDEN_K0);
        assert_eq!(keys[1].key.to_hex(), GOLDEN_K1);
        let salted = chunk_keys(&ns, &SaltTag::of(b"tenant-a"), 256, &tokens);
        assert_eq!(salted[0].key.to_hex(), GOLDEN_SALTED_K0);
    }

    const GOLDEN_NS: &str = "3d545a993596386a9cd1c9bc2d4cb97890461572749e7efff7fc99d7fd1bd90b";
    const GOLDEN_K0: &str = "1a741e19977700235ef6d8c86f0d73d213ed8550005e37bc0b4ce247b5611975";
    const GOLDEN_K1: &str = "64f636eb6699f89111eaf498a3a80342310f0d2de55e8459c7d6d9de31d1c610";
    const GOLDEN_SALTED_K0: &str =
        "70b8a444df1cb4eef04862a12a2e9b2261994ca0d60f67c78b63a41e243a800e";

    /// Golden vectors of independent keys: fixed forever, like `golden_keys`.
    #[test]
    fn golden_independent_keys() {
        let ns = ModelSpec::preset("llama-3-8b").unwrap().namespace_id();
        let doc: Vec<u32> = (0..300u32)
            .map(|i| i.wrapping_mul(2654435761) % 128256)
            .collect();
        let keys = independent_chunk_keys(&ns, &SaltTag::NONE, 256, &doc);
        assert_eq!(keys.len(), 2, "the partial last chunk has a key");
        assert_eq!((keys[1].start, keys[1].end), (256, 300));
        assert!(keys.iter().all(|k| k.parent.is_none()));
        assert_eq!(keys[0].key.to_hex(), GOLDEN_IND_K0);
        assert_eq!(keys[1].key.to_hex(), GOLDEN_IND_K1);
        let salted = independent_chunk_keys(&ns, &SaltTag::of(b"tenant-a"), 256, &doc);
        assert_eq!(salted[0].key.to_hex(), GOLDEN_IND_SALTED_K0);
        // Not the prefix key of the same tokens, and the same wherever the document sits.
        assert_ne!(
            keys[0].key,
            chunk_keys(&ns, &SaltTag::NONE, 256, &doc)[0].key
        );
        let mut other = vec![7u32; 40];
        other.extend_from_slice(&doc[..256]);
        assert_eq!(
            ChunkKey::derive_independent(&ns, &SaltTag::NONE, &other[40..]),
            keys[0].key
        );
    }

    const GOLDEN_IND_K0: &str = "d33978707e0e8bdbdf52672e9d71f1b908d0cf1a13b27157602344b5ad06993d";
    const GOLDEN_IND_K1: &str = "c2f61edfc12cc19f90da4c9ac00cfd926c180799f91ad6cbda06d697fc147ee4";
    const GOLDEN_IND_SALTED_K0: &str =
        "dd2dafc0924b4941660b5c969c49d0e496b06b407de2d44a7db447e31e0cb192";

    #[test]
    fn keys_chain_over_prefixes() {
        let ns = ModelSpec::preset("tiny").unwrap().namespace_id();
        let a: Vec<u32> = (0..1024).collect();
        let mut b = a.clone();
        b[300] = 7; // differs in chunk 1
        let ka = chunk_keys(&ns, &SaltTag::NONE, 256, &a);
        let kb = chunk_keys(&ns, &SaltTag::NONE, 256, &b);
        assert_eq!(ka[0], kb[0]);
        for i in 1..4 {
            assert_ne!(
                ka[i].key, kb[i].key,
                "chunk {i} must differ once any earlier token differs"
            );
        }
        assert_eq!(ka[2].parent, Some(ka[1].key));
    }

    #[test]
    fn salt_and_namespace_isolate() {
        let tokens: Vec<u32> = (0..256).collect();
        let ns = ModelSpec::preset("tiny").unwrap().namespace_id();
        let ns2 = ModelSpec::preset("llama-3-8b").unwrap().namespace_id();
        let k = ChunkKey::derive(&ns, None, &SaltTag::NONE, &tokens);
        assert_ne!(k, ChunkKey::derive(&ns, None, &SaltTag::of(b"t"), &tokens));
        assert_ne!(k, ChunkKey::derive(&ns2, None, &SaltTag::NONE, &tokens));
        assert_eq!(SaltTag::of(b""), SaltTag::NONE);
    }

    #[test]
    fn partial_chunk_has_no_key() {
        let ns = ModelSpec::preset("tiny").unwrap().namespace_id();
        assert_eq!(chunk_keys(&ns, &SaltTag::NONE, 256, &[1; 511]).len(), 1);
        assert!(chunk_keys(&ns, &SaltTag::NONE, 256, &[1; 255]).is_empty());
    }

    /// Golden vectors of a prompt's trailing partial chunk: fixed forever, like `golden_keys`.
    #[test]
    fn golden_partial_keys() {
        let ns = ModelSpec::preset("llama-3-8b").unwrap().namespace_id();
        let tokens: Vec<u32> = (0..600u32)
            .map(|i| i.wrapping_mul(2654435761) % 128256)
            .collect();
        let keys = prompt_chunk_keys(&ns, &SaltTag::NONE, 256, &tokens);
        assert_eq!(keys.len(), 3);
        // the full chunks are those of chunk_keys (golden_keys pins the first two)
        assert_eq!(keys[..2], chunk_keys(&ns, &SaltTag::NONE, 256, &tokens)[..]);
        assert_eq!(keys[0].key.to_hex(), GOLDEN_K0);
        let tail = &keys[2];
        assert_eq!((tail.index, tail.start, tail.end), (2, 512, 600));
        assert_eq!(tail.parent, Some(keys[1].key));
        assert_eq!(tail.key.to_hex(), GOLDEN_TAIL);
        // A prompt shorter than one chunk is one partial chunk without a parent.
        let short = prompt_chunk_keys(&ns, &SaltTag::of(b"tenant-a"), 256, &tokens[..100]);
        assert_eq!(short.len(), 1);
        assert_eq!(
            (short[0].parent, short[0].start, short[0].end),
            (None, 0, 100)
        );
        assert_eq!(short[0].key.to_hex(), GOLDEN_SALTED_SHORT);
        // A whole number of chunks has no partial chunk.
        assert_eq!(
            prompt_chunk_keys(&ns, &SaltTag::NONE, 256, &tokens[..512]).len(),
            2
        );
        assert!(prompt_chunk_keys(&ns, &SaltTag::NONE, 256, &[]).is_empty());
    }

    const GOLDEN_TAIL: &str = "35949d3ed3a4665cd56f00216334924e1243a9ede3ac924fa536d5fc99e555e9";
    const GOLDEN_SALTED_SHORT: &str =
        "22f7d64ae2fd2b43c88d57353282edc989dbbc1026f03b138903ec0e9163bed2";

    /// A partial chunk never has the key of the full chunk its tokens start (an extension of
    /// the same tail), and a different tail differs.
    #[test]
    fn partial_keys_differ_from_full_ones() {
        let spec = ModelSpec::preset("tiny").unwrap();
        let ns = spec.namespace_id();
        let ct = spec.chunk_tokens as usize;
        let long: Vec<u32> = (0..2 * ct as u32).collect();
        let short = &long[..ct + ct / 2];
        let full = prompt_chunk_keys(&ns, &SaltTag::NONE, ct, &long);
        let part = prompt_chunk_keys(&ns, &SaltTag::NONE, ct, short);
        assert_eq!(full[0], part[0], "the full chunk before the tail is shared");
        assert_ne!(
            full[1].key, part[1].key,
            "an extension of the tail is another chunk"
        );
        // every length of tail differs from the full chunk of the same tokens
        for n in 1..ct {
            let k = prompt_chunk_keys(&ns, &SaltTag::NONE, ct, &long[..ct + n]);
            assert_ne!(k[1].key, full[1].key, "{n}-token tail");
        }
        let mut other = short.to_vec();
        *other.last_mut().unwrap() += 1;
        assert_ne!(
            prompt_chunk_keys(&ns, &SaltTag::NONE, ct, &other)[1].key,
            part[1].key
        );
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let k = ChunkKey([0xab; 32]);
        assert_eq!(ChunkKey::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(ChunkKey::from_file_name(&k.file_name()).unwrap(), k);
        for bad in [
            "",
            "ab",
            &"AB".repeat(32),
            &"g0".repeat(32),
            &format!("{}0", k.to_hex()),
        ] {
            assert!(ChunkKey::from_hex(bad).is_err(), "{bad}");
        }
        for bad in [
            "x.kvc",
            "../../etc/passwd",
            &k.to_hex(),
            &format!("{}.kvc.tmp", k.to_hex()),
            &format!("../{}", k.file_name()),
        ] {
            assert!(
                matches!(ChunkKey::from_file_name(bad), Err(FormatError::BadName(_))),
                "{bad}"
            );
        }
    }
}
