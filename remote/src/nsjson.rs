//! `namespace.json`: the readable description beside a namespace's chunks, checked before
//! it is committed to a cache or uploaded to the bucket.
//!
//! A valid one is a JSON object whose `namespace_id` (64 hex digits) starts with the 16 hex
//! digits that end its directory name, whose `dir` (when present) is that directory, and,
//! when it is a full model spec (it has `model`), whose fields hash to that very id: a
//! well-formed spec of another model, or one with a retouched id, is refused. With a verified
//! chunk header at hand the id must also be the header's namespace id exactly.
//!
//! A bad one is replaced by [`from_header`], the description a verified chunk header gives
//! (every shape field; not the model name, which the header does not hold), with a warning
//! from the caller.

use bytes::Bytes;
use kvfs_loader::ChunkHeader;
use kvfs_loader::Codec;
use kvfs_loader::spec::{Dtype, KvKind, ModelSpec};
use serde_json::Value;

/// Why a `namespace.json` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NamespaceJsonError {
    #[error("namespace.json is not a JSON object: {0}")]
    NotJson(String),
    #[error("namespace.json has no valid `namespace_id` (64 hex digits)")]
    NoId,
    #[error("namespace.json describes namespace {found}, not the one of directory `{dir}`")]
    OtherNamespace { dir: String, found: String },
    #[error("namespace.json names directory `{found}`, not `{dir}`")]
    OtherDir { dir: String, found: String },
    #[error("namespace.json's model spec hashes to {computed}, not to its namespace_id {claimed}")]
    SpecMismatch { claimed: String, computed: String },
    #[error("namespace.json's spec field `{0}` is missing or invalid")]
    BadField(&'static str),
}

fn field<'a>(
    o: &'a serde_json::Map<String, Value>,
    k: &'static str,
) -> Result<&'a Value, NamespaceJsonError> {
    o.get(k).ok_or(NamespaceJsonError::BadField(k))
}

fn u32_field(
    o: &serde_json::Map<String, Value>,
    k: &'static str,
) -> Result<u32, NamespaceJsonError> {
    field(o, k)?
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or(NamespaceJsonError::BadField(k))
}

fn str_field<'a>(
    o: &'a serde_json::Map<String, Value>,
    k: &'static str,
) -> Result<&'a str, NamespaceJsonError> {
    field(o, k)?.as_str().ok_or(NamespaceJsonError::BadField(k))
}

/// The model spec a full `namespace.json` describes.
fn spec_of(o: &serde_json::Map<String, Value>) -> Result<ModelSpec, NamespaceJsonError> {
    let dtype =
        Dtype::parse(str_field(o, "dtype")?).ok_or(NamespaceJsonError::BadField("dtype"))?;
    let kv_kind = match str_field(o, "kv_kind")? {
        k if k == KvKind::KeyValue.name() => KvKind::KeyValue,
        k if k == KvKind::MlaLatent.name() => KvKind::MlaLatent,
        _ => return Err(NamespaceJsonError::BadField("kv_kind")),
    };
    let mut s = ModelSpec::new(
        str_field(o, "model")?,
        dtype,
        u32_field(o, "num_layers")?,
        u32_field(o, "num_kv_heads")?,
        u32_field(o, "head_dim")?,
    );
    s.revision = str_field(o, "revision")?.to_string();
    s.tp_size = u32_field(o, "tp_size")?;
    s.tp_rank = u32_field(o, "tp_rank")?;
    s.rope_theta = field(o, "rope_theta")?
        .as_f64()
        .ok_or(NamespaceJsonError::BadField("rope_theta"))?;
    s.rope_scaling = str_field(o, "rope_scaling")?.to_string();
    s.chunk_tokens = u32_field(o, "chunk_tokens")?;
    s.group_tokens = u32_field(o, "group_tokens")?;
    s.kv_kind = kv_kind;
    if let Some(c) = o.get("codec") {
        let name = c.as_str().ok_or(NamespaceJsonError::BadField("codec"))?;
        s.codec = Codec::parse(name).map_err(|_| NamespaceJsonError::BadField("codec"))?;
    }
    Ok(s)
}

/// Checks `bytes` as the `namespace.json` of directory `ns_dir` (see the module docs).
pub fn check(
    bytes: &[u8],
    ns_dir: &str,
    header: Option<&ChunkHeader>,
) -> Result<(), NamespaceJsonError> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| NamespaceJsonError::NotJson(e.to_string()))?;
    let o = v
        .as_object()
        .ok_or_else(|| NamespaceJsonError::NotJson("not an object".into()))?;
    let id = o
        .get("namespace_id")
        .and_then(Value::as_str)
        .filter(|s| {
            s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or(NamespaceJsonError::NoId)?;
    let suffix = ns_dir.rsplit('-').next().unwrap_or("");
    let other = || NamespaceJsonError::OtherNamespace {
        dir: ns_dir.to_string(),
        found: id.to_string(),
    };
    if suffix.len() != 16 || id[..16] != *suffix {
        return Err(other());
    }
    if let Some(h) = header
        && h.meta.namespace.to_hex() != id
    {
        return Err(other());
    }
    if let Some(d) = o.get("dir") {
        let d = d.as_str().ok_or(NamespaceJsonError::BadField("dir"))?;
        if d != ns_dir {
            return Err(NamespaceJsonError::OtherDir {
                dir: ns_dir.to_string(),
                found: d.to_string(),
            });
        }
    }
    if o.contains_key("model") {
        let computed = spec_of(o)?.namespace_id().to_hex();
        if computed != id {
            return Err(NamespaceJsonError::SpecMismatch {
                claimed: id.to_string(),
                computed,
            });
        }
    }
    Ok(())
}

/// The description a verified chunk header gives (the model name is not in it).
pub fn from_header(ns_dir: &str, header: &ChunkHeader) -> Bytes {
    let m = &header.meta;
    Bytes::from(format!(
        concat!(
            "{{\n  \"namespace_id\": \"{}\",\n  \"dir\": \"{}\",\n  \"dtype\": \"{}\",\n",
            "  \"kv_kind\": \"{}\",\n  \"num_layers\": {},\n  \"num_kv_heads\": {},\n",
            "  \"head_dim\": {},\n  \"group_tokens\": {},\n",
            "  \"note\": \"written from a chunk header: the uploading host had no valid namespace.json\"\n}}\n"
        ),
        m.namespace,
        ns_dir,
        m.dtype,
        m.kv_kind.name(),
        m.num_layers,
        m.num_heads,
        m.head_dim,
        m.group_tokens,
    ))
}

/// The checked description to use for `ns_dir`: `local` when it passes, else the one built
/// from `header` (with a warning naming `origin` and the cause).
pub fn checked_or_rebuilt(
    local: Option<Vec<u8>>,
    origin: &str,
    ns_dir: &str,
    header: &ChunkHeader,
) -> Bytes {
    match local {
        Some(b) => match check(&b, ns_dir, Some(header)) {
            Ok(()) => Bytes::from(b),
            Err(e) => {
                tracing::warn!(file = origin, error = %e,
                    "invalid namespace.json; using one built from a verified chunk header");
                from_header(ns_dir, header)
            }
        },
        None => from_header(ns_dir, header),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfs_loader::{ChunkView, SaltTag, Verify, synth_chunk};

    #[test]
    fn accepts_its_own_specs_and_refuses_others() {
        let tiny = ModelSpec::preset("tiny").unwrap();
        let llama = ModelSpec::preset("llama-3-8b").unwrap();
        let (ns, other) = (tiny.namespace_dir(), llama.namespace_dir());
        let (_, bytes) = synth_chunk(&tiny, None, SaltTag::NONE, (0..16).collect()).unwrap();
        let h = ChunkView::parse(&bytes, Verify::Full).unwrap().header;
        for spec in [&tiny, &llama] {
            check(spec.to_json().as_bytes(), &spec.namespace_dir(), None).unwrap();
        }
        check(tiny.to_json().as_bytes(), &ns, Some(&h)).unwrap();
        check(&from_header(&ns, &h), &ns, Some(&h)).unwrap();
        assert!(matches!(
            check(b"garbage", &ns, None),
            Err(NamespaceJsonError::NotJson(_))
        ));
        assert_eq!(check(b"{}", &ns, None), Err(NamespaceJsonError::NoId));
        assert!(matches!(
            check(llama.to_json().as_bytes(), &ns, None),
            Err(NamespaceJsonError::OtherNamespace { .. })
        ));
        // Another model's spec with the id retouched to match this directory.
        let forged = llama
            .to_json()
            .replace(
                &llama.namespace_id().to_hex(),
                &tiny.namespace_id().to_hex(),
            )
            .replace(&other, &ns);
        assert!(matches!(
            check(forged.as_bytes(), &ns, None),
            Err(NamespaceJsonError::SpecMismatch { .. })
        ));
        // Right id, wrong directory name.
        let moved = tiny.to_json().replace(&ns, "x-0123456789abcdef");
        assert!(matches!(
            check(moved.as_bytes(), &ns, None),
            Err(NamespaceJsonError::OtherDir { .. })
        ));
        let rebuilt = checked_or_rebuilt(Some(b"{".to_vec()), "test", &ns, &h);
        assert_eq!(rebuilt, from_header(&ns, &h));
    }
}
