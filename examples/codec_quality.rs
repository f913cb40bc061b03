//! Quality of the delivery codecs on real KV (issue 12, docs/BENCHMARKS.md "Codecs"), and the
//! real KV the codec speed benchmark measures. Run by `scripts/bench-codecs`.
//!
//! - `kv --text FILE --tokens N --out DIR [--dtype bf16]`: prefills the first N tokens of FILE
//!   with SmolLM2-135M (candle, f32 KV) and stores its full chunks raw in cache directory DIR;
//!   with `--dtype bf16` the chunks are those of a bf16 engine (the model's spec with bf16 KV,
//!   its own namespace and keys; values rounded to nearest even), the dtype serving engines
//!   hold (scripts/bench-codecs-sync).
//! - `quality --docs JSON --prompts P --prompt-tokens T --held H [--keep DIR] [--codecs LIST]`:
//!   for P
//!   documents (a JSON
//!   list of `[name, text]`), prefills the first T + 8 tokens, then for each codec stores the
//!   first T tokens' KV with that codec (its own namespace for lossy codecs), loads it into a
//!   fresh cache, prefills the last 8 tokens on top and compares with the reference: the last
//!   token's logits (max |diff|, KL(ref || codec)), 32 greedy tokens (position-wise agreement
//!   of free-running decoding, which compounds: after the first differing token the two texts
//!   differ), teacher-forced top-1 agreement over the same 32 positions (each position given
//!   the reference's greedy prefix, so one near-tie costs one position, not the rest) and the
//!   perplexity of the next H tokens of the document (teacher-forced). The `raw` row is the
//!   noise floor of reusing an exactly stored cache. One `RESULT {json}` line per (document,
//!   codec) and a `SUMMARY {json}` line per codec. With `--keep DIR` the raw chunks of every
//!   prompt stay in cache directory DIR (the codec speed benchmark's input).
//!
//! Besides the format's codecs the quality run measures **variants**: the raw chunk's values
//! rounded by a transform and stored raw (the loader then reads them as any raw chunk), to
//! see what a codec could reach before changing the format. `bf16` (every value rounded to
//! bf16) is the floor: no 8-bit code changes the cache less than 16-bit rounding does.
//! `fp8-pow2` is e4m3 with a power-of-two scale per token and head (the fp8 codec's own
//! rounding, done outside it: a check); `fp8-scale-byte` a scale with 3 mantissa bits,
//! `2^e * (1 + m / 8)`, the smallest such at least `absmax / 448` (a one-byte scale the codec
//! could store instead; tried and measured worse); `fp8-key-channel` scales keys per channel
//! over the group's tokens (`absmax / 448`), values as the codec does. The int8 scale forms
//! (symmetric 8-bit integers per token and head, rounded to nearest even, the int8 codec's
//! rounding): `int8-exact` with the f32 scale `absmax / 127`, `int8-f16` with the smallest
//! f16 at least that (a 2-byte scale), `int8-scale-byte` with the smallest `2^e (1 + m / 8)`
//! at least that (a 1-byte scale: the form the `int8` codec stores, chosen by this
//! measurement; its row is the codec's rounding done outside it).
//!
//! The model comes from `kvfs_model::locate_gguf` (scripts/install-model).

use kvfs_loader::codec::{Coder, GroupShape, e4m3_to_f32, f32_to_e4m3, from_f32, to_f32};
use kvfs_loader::format::{ChunkView, Verify, encode_chunk};
use kvfs_loader::{Codec, Loader, LoaderOptions};
use kvfs_model::{Engine, max_abs_diff};
use std::path::PathBuf;

const GEN: usize = 32;
const TAIL: usize = 8;

fn arg(name: &str) -> Option<String> {
    let mut it = std::env::args();
    while let Some(a) = it.next() {
        if a == name {
            return it.next();
        }
    }
    None
}

fn num(name: &str, default: usize) -> usize {
    arg(name).map_or(default, |v| v.parse().expect("a number"))
}

fn softmax(l: &[f32]) -> Vec<f64> {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = l.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| a * (a / b.max(1e-300)).ln())
        .sum()
}

/// Teacher-forced negative log-likelihood of `held` after a prompt of `pos` tokens whose
/// last logits are `logits`; leaves positions `pos..` of `kv` written.
fn nll(e: &Engine, kv: &mut kvfs_model::PagedKv, pos: usize, logits: &[f32], held: &[u32]) -> f64 {
    // The prompt's last logits score held[0]; one pass over held[..n-1] scores the rest.
    let mut total = -softmax(logits)[held[0] as usize].ln();
    if held.len() > 1 {
        let all = e
            .model
            .forward_all(kv, &held[..held.len() - 1], pos)
            .unwrap();
        let vocab = logits.len();
        for (row, &t) in all.chunks_exact(vocab).zip(&held[1..]) {
            total -= softmax(row)[t as usize].ln();
        }
    }
    total / held.len() as f64
}

/// Teacher-forced top-1 agreement with the reference's greedy tokens `reference` after a
/// prompt of `pos` tokens whose last logits are `logits`: each position is given the
/// reference's prefix, so a near-tie costs one position; leaves positions `pos..` written.
fn teacher_forced_agreement(
    e: &Engine,
    kv: &mut kvfs_model::PagedKv,
    pos: usize,
    logits: &[f32],
    reference: &[u32],
) -> f64 {
    let mut same = (kvfs_model::argmax(logits) == reference[0]) as usize;
    if reference.len() > 1 {
        let all = e
            .model
            .forward_all(kv, &reference[..reference.len() - 1], pos)
            .unwrap();
        for (row, &t) in all.chunks_exact(logits.len()).zip(&reference[1..]) {
            same += (kvfs_model::argmax(row) == t) as usize;
        }
    }
    same as f64 / reference.len() as f64
}

fn main() {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    let e = Engine::load(&kvfs_model::locate_gguf().expect("the model")).expect("load");
    match cmd.as_str() {
        "kv" => {
            let text = std::fs::read_to_string(arg("--text").expect("--text")).unwrap();
            let n = num("--tokens", 4096);
            let out = PathBuf::from(arg("--out").expect("--out"));
            std::fs::create_dir_all(&out).unwrap();
            let toks = e.tokenizer.encode(&text);
            assert!(
                toks.len() >= n,
                "{} tokens in the text, {n} asked",
                toks.len()
            );
            let toks = &toks[..n];
            let mut kv = e.new_cache(n + 16);
            let t0 = std::time::Instant::now();
            e.prefill(&mut kv, toks).unwrap();
            let bf16 = match arg("--dtype").as_deref() {
                None | Some("f32") => false,
                Some("bf16") => true,
                Some(d) => panic!("--dtype f32|bf16, not {d}"),
            };
            let f32_root = if bf16 { out.join(".f32") } else { out.clone() };
            std::fs::create_dir_all(&f32_root).unwrap();
            let loader = Loader::open(&f32_root, e.spec.clone(), b"").unwrap();
            let s = e.store(&loader, &mut kv, toks).unwrap();
            let mut spec = e.spec.clone();
            if bf16 {
                spec.dtype = kvfs_loader::Dtype::Bf16;
                store_as(&e.spec, &f32_root, &spec, &out, toks);
                std::fs::remove_dir_all(&f32_root).unwrap();
            }
            println!(
                "RESULT {}",
                serde_json::json!({"mode": "kv", "tokens": n, "chunks": s.written,
                    "prefill_s": t0.elapsed().as_secs_f64(), "spec": spec.namespace_dir()})
            );
        }
        "quality" => quality(&e),
        _ => panic!("usage: codec_quality kv|quality ..."),
    }
}

/// How a prefix is stored for the quality run: a format codec, or a transform of the raw
/// chunk's values stored raw (see the module doc).
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Codec(Codec),
    Bf16,
    Fp8Pow2,
    Fp8ScaleByte,
    Fp8KeyChannel,
    Int8Exact,
    Int8F16,
    Int8ScaleByte,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Codec(c) => c.name(),
            Variant::Bf16 => "bf16",
            Variant::Fp8Pow2 => "fp8-pow2",
            Variant::Fp8ScaleByte => "fp8-scale-byte",
            Variant::Fp8KeyChannel => "fp8-key-channel",
            Variant::Int8Exact => "int8-exact",
            Variant::Int8F16 => "int8-f16",
            Variant::Int8ScaleByte => "int8-scale-byte",
        }
    }
}

/// The smallest `2^e * (1 + m / 8)` (`m` in 0..8) at least `want` (> 0).
fn scale_byte_value(want: f32) -> f32 {
    let e = want.log2().floor() as i32;
    let mut m = ((want / f32::powi(2.0, e) - 1.0) * 8.0).ceil().max(0.0);
    let mut e = e;
    if m >= 8.0 {
        m = 0.0;
        e += 1;
    }
    let mut s = f32::powi(2.0, e) * (1.0 + m / 8.0);
    if s < want {
        s = f32::powi(2.0, e) * (1.0 + (m + 1.0) / 8.0);
    }
    s
}

/// The smallest f16 value at least `want` (> 0), as f32.
fn f16_at_least(want: f32) -> f32 {
    let f16 = kvfs_loader::Dtype::F16;
    let mut b = [0u8; 2];
    from_f32(f16, &[want], &mut b);
    let mut back = Vec::new();
    to_f32(f16, &b, &mut back);
    if back[0] < want {
        // The next f16 up (want > 0, so the bits grow with the value).
        b = (u16::from_le_bytes(b) + 1).to_le_bytes();
        to_f32(f16, &b, &mut back);
    }
    back[0]
}

/// e4m3 round trip of `x` with scale `s` (> 0).
fn e4m3_round(x: f32, s: f32) -> f32 {
    e4m3_to_f32(f32_to_e4m3(x / s)) * s
}

/// Applies a transform variant to one group (`shape`, f32 values, token-major).
fn transform_group(v: Variant, shape: &GroupShape, values: &mut [f32], coder: &mut Coder) {
    let d = shape.head_dim;
    let amax = |it: &mut dyn Iterator<Item = f32>| it.fold(0f32, |m, x| m.max(x.abs()));
    match v {
        Variant::Bf16 => {
            let mut bytes = vec![0u8; values.len() * 2];
            from_f32(kvfs_loader::Dtype::Bf16, values, &mut bytes);
            let mut back = Vec::new();
            to_f32(kvfs_loader::Dtype::Bf16, &bytes, &mut back);
            values.copy_from_slice(&back);
        }
        Variant::Fp8Pow2
        | Variant::Fp8ScaleByte
        | Variant::Int8Exact
        | Variant::Int8F16
        | Variant::Int8ScaleByte => {
            for row in values.chunks_exact_mut(d) {
                let a = amax(&mut row.iter().copied());
                if a == 0.0 {
                    continue;
                }
                let int8_scale = match v {
                    Variant::Int8Exact => Some(a / 127.0),
                    Variant::Int8F16 => Some(f16_at_least(a / 127.0)),
                    Variant::Int8ScaleByte => Some(scale_byte_value(a / 127.0)),
                    _ => None,
                };
                for x in row.iter_mut() {
                    *x = if let Some(s) = int8_scale {
                        (*x / s).round_ties_even().clamp(-127.0, 127.0) * s
                    } else if v == Variant::Fp8Pow2 {
                        e4m3_round(*x, f32::powi(2.0, (a / 448.0).log2().ceil() as i32))
                    } else {
                        e4m3_round(*x, scale_byte_value(a / 448.0))
                    };
                }
            }
        }
        Variant::Fp8KeyChannel if shape.plane == 0 && shape.keys_per_channel => {
            let c = shape.heads * d;
            for ch in 0..c {
                let a = amax(&mut values.iter().skip(ch).step_by(c).copied());
                if a == 0.0 {
                    continue;
                }
                for x in values.iter_mut().skip(ch).step_by(c) {
                    *x = e4m3_round(*x, a / 448.0);
                }
            }
        }
        Variant::Fp8KeyChannel | Variant::Codec(_) => {
            // Values of fp8-key-channel, and any format codec: the codec's own round trip.
            let codec = match v {
                Variant::Codec(c) => c,
                _ => Codec::Fp8,
            };
            let mut raw = vec![0u8; values.len() * 4];
            from_f32(kvfs_loader::Dtype::F32, values, &mut raw);
            let mut stored = Vec::new();
            coder.encode(codec, shape, &raw, &mut stored).unwrap();
            coder.decode(codec, shape, &stored, &mut raw).unwrap();
            let mut back = Vec::new();
            to_f32(kvfs_loader::Dtype::F32, &raw, &mut back);
            values.copy_from_slice(&back);
        }
    }
}

/// Writes every raw chunk under `from` to the same place under `to`, its values transformed.
fn transform_chunks(v: Variant, from: &std::path::Path, to: &std::path::Path) {
    let mut coder = Coder::new();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            transform_chunks(v, &p, &dst);
            continue;
        }
        if p.extension().is_none_or(|x| x != "kvc") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let view = ChunkView::parse(&bytes, Verify::Full).unwrap();
        let meta = view.header.meta.clone();
        let g = view.header.geometry;
        let tb = g.token_bytes as usize;
        let mut planes = Vec::new();
        for l in 0..g.num_layers {
            for pl in 0..g.planes {
                let mut vals = Vec::new();
                to_f32(meta.dtype, view.plane(l, pl).unwrap(), &mut vals);
                for grp in 0..g.groups() {
                    let shape = kvfs_loader::codec::stored::group_shape(&meta, &g, pl, grp);
                    let t = g.group_tokens_range(grp);
                    let per = tb / meta.dtype.size();
                    let slice = &mut vals[t.start as usize * per..t.end as usize * per];
                    transform_group(v, &shape, slice, &mut coder);
                }
                let mut out = vec![0u8; vals.len() * meta.dtype.size()];
                from_f32(meta.dtype, &vals, &mut out);
                planes.push(out);
            }
        }
        let file = encode_chunk(&meta, |l, pl, dst| {
            dst.copy_from_slice(&planes[(l * g.planes + pl) as usize])
        })
        .unwrap();
        std::fs::write(&dst, file).unwrap();
    }
}

/// Rewrites the chunks of `tokens` stored under `from` with spec `a` as chunks of spec `b`
/// (another dtype: its own namespace and keys) under `to`.
fn store_as(
    a: &kvfs_loader::ModelSpec,
    from: &std::path::Path,
    b: &kvfs_loader::ModelSpec,
    to: &std::path::Path,
    tokens: &[u32],
) {
    use kvfs_loader::dir::{Layout, commit_file};
    use kvfs_loader::{ChunkMeta, SaltTag, chunk_keys};
    Loader::open(to, b.clone(), b"").unwrap();
    let ct = a.chunk_tokens as usize;
    let mut parent = None;
    for c in chunk_keys(&a.namespace_id(), &SaltTag::NONE, ct, tokens) {
        let path = Layout::Cache.chunk_path(from, &a.namespace_dir(), &c.key);
        let bytes = std::fs::read(&path).unwrap();
        let view = ChunkView::parse(&bytes, Verify::Full).unwrap();
        let meta = ChunkMeta::for_spec(b, parent, SaltTag::NONE, tokens[c.start..c.end].to_vec());
        let file = encode_chunk(&meta, |l, p, dst| {
            let mut v = Vec::new();
            to_f32(a.dtype, view.plane(l, p).unwrap(), &mut v);
            from_f32(b.dtype, &v, dst);
        })
        .unwrap();
        commit_file(
            &Layout::Cache.chunk_path(to, &b.namespace_dir(), &meta.key),
            &file,
            false,
        )
        .unwrap();
        parent = Some(meta.key);
    }
}

fn quality(e: &Engine) {
    let docs: Vec<(String, String)> =
        serde_json::from_str(&std::fs::read_to_string(arg("--docs").expect("--docs")).unwrap())
            .unwrap();
    let prompts = num("--prompts", 20);
    let t = num("--prompt-tokens", 512);
    let held_n = num("--held", 32);
    let all = [
        Variant::Codec(Codec::Raw),
        Variant::Bf16,
        Variant::Codec(Codec::Fp8),
        Variant::Fp8Pow2,
        Variant::Fp8ScaleByte,
        Variant::Fp8KeyChannel,
        Variant::Int8Exact,
        Variant::Int8F16,
        Variant::Int8ScaleByte,
        Variant::Codec(Codec::Int8),
        Variant::Codec(Codec::Kivi4),
        Variant::Codec(Codec::Kivi2),
    ];
    // `--codecs a,b,...`: the codecs and variants to measure (all by default; raw always).
    let codecs: Vec<Variant> = match arg("--codecs") {
        None => all.to_vec(),
        Some(list) => {
            let names: Vec<&str> = list.split(',').collect();
            for n in &names {
                assert!(
                    all.iter().any(|v| v.name() == *n),
                    "unknown codec or variant {n}"
                );
            }
            all.into_iter()
                .filter(|v| *v == Variant::Codec(Codec::Raw) || names.contains(&v.name()))
                .collect()
        }
    };
    let mut sums: Vec<[f64; 7]> = vec![[0.0; 7]; codecs.len()];
    let mut used = 0;
    let work = tempfile::tempdir().unwrap();
    let keep = arg("--keep").map(PathBuf::from);
    if let Some(k) = &keep {
        std::fs::create_dir_all(k).unwrap();
    }
    for (name, text) in &docs {
        if used == prompts {
            break;
        }
        let toks = e.tokenizer.encode(text);
        if toks.len() < t + TAIL + held_n {
            continue;
        }
        used += 1;
        let prompt = &toks[..t + TAIL];
        let held = &toks[t + TAIL..t + TAIL + held_n];
        let cap = t + TAIL + held_n.max(GEN) + 16;
        let mut kv = e.new_cache(cap);
        let ref_logits = e.prefill(&mut kv, prompt).unwrap();
        let ref_nll = nll(e, &mut kv, prompt.len(), &ref_logits, held);
        let ref_gen = e.generate(&mut kv, prompt.len(), &ref_logits, GEN).unwrap();
        let ref_p = softmax(&ref_logits);
        let raw_dir = work.path().join(format!("{used}-raw"));
        for (ci, &variant) in codecs.iter().enumerate() {
            let codec = match variant {
                Variant::Codec(c) => c,
                _ => Codec::Raw,
            };
            let mut spec = e.spec.clone();
            spec.codec = codec;
            let dir = match variant {
                Variant::Codec(Codec::Raw) => raw_dir.clone(),
                _ => work.path().join(format!("{used}-{}", variant.name())),
            };
            std::fs::create_dir_all(&dir).unwrap();
            let loader = Loader::open_with(&dir, spec, b"", LoaderOptions::default()).unwrap();
            match variant {
                Variant::Codec(_) => {
                    e.store(&loader, &mut kv, &prompt[..t]).unwrap();
                    if let (Some(k), Codec::Raw) = (&keep, codec) {
                        let keep_loader = Loader::open(k, e.spec.clone(), b"").unwrap();
                        e.store(&keep_loader, &mut kv, &prompt[..t]).unwrap();
                    }
                }
                _ => transform_chunks(variant, &raw_dir, &dir),
            }
            let mut kv2 = e.new_cache(cap);
            let out = e
                .prefill_reusing(&loader, &mut kv2, prompt, Some(t))
                .unwrap();
            assert_eq!(
                out.reused,
                t,
                "{}: the whole prefix must come from the cache",
                variant.name()
            );
            let p = softmax(&out.logits);
            let diff = max_abs_diff(&ref_logits, &out.logits) as f64;
            let kld = kl(&ref_p, &p);
            let top1 =
                (kvfs_model::argmax(&out.logits) == kvfs_model::argmax(&ref_logits)) as u8 as f64;
            let c_nll = nll(e, &mut kv2, prompt.len(), &out.logits, held);
            let forced = teacher_forced_agreement(e, &mut kv2, prompt.len(), &out.logits, &ref_gen);
            let generated = e
                .generate(&mut kv2, prompt.len(), &out.logits, GEN)
                .unwrap();
            let agree = ref_gen
                .iter()
                .zip(&generated)
                .filter(|(a, b)| a == b)
                .count() as f64
                / ref_gen.len().max(1) as f64;
            let stats = out.load.unwrap();
            let row = [diff, kld, agree, c_nll.exp(), ref_nll.exp(), top1, forced];
            for (s, v) in sums[ci].iter_mut().zip(row) {
                *s += v;
            }
            println!(
                "RESULT {}",
                serde_json::json!({"mode": "quality", "doc": name, "codec": variant.name(),
                    "logit_max_abs_diff": diff, "kl": kld, "greedy_agreement": agree,
                    "forced_agreement": forced,
                    "ppl": c_nll.exp(), "ref_ppl": ref_nll.exp(), "top1_same": top1 == 1.0,
                    "bytes_read": stats.bytes_read, "bytes_needed": stats.bytes_needed})
            );
            if variant != Variant::Codec(Codec::Raw) {
                std::fs::remove_dir_all(&dir).ok();
            }
        }
        std::fs::remove_dir_all(&raw_dir).ok();
    }
    assert!(used >= prompts, "only {used} documents long enough");
    let n = used as f64;
    for (ci, codec) in codecs.iter().enumerate() {
        let s = sums[ci];
        println!(
            "SUMMARY {}",
            serde_json::json!({"codec": codec.name(), "prompts": used, "forced_agreement": s[6] / n,
                "prompt_tokens": t, "held_tokens": held_n,
                "mean_logit_max_abs_diff": s[0] / n, "mean_kl": s[1] / n,
                "greedy_agreement": s[2] / n, "mean_ppl": s[3] / n, "mean_ref_ppl": s[4] / n,
                "top1_same": s[5] / n})
        );
    }
}
