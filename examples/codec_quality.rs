//! Quality of the delivery codecs on real KV (issue 12, docs/BENCHMARKS.md "Codecs"), and the
//! real KV the codec speed benchmark measures. Run by `scripts/bench-codecs`.
//!
//! - `kv --text FILE --tokens N --out DIR`: prefills the first N tokens of FILE with
//!   SmolLM2-135M (candle, f32 KV) and stores its full chunks raw in cache directory DIR.
//! - `quality --docs JSON --prompts P --prompt-tokens T --held H [--keep DIR]`: for P
//!   documents (a JSON
//!   list of `[name, text]`), prefills the first T + 8 tokens, then for each codec stores the
//!   first T tokens' KV with that codec (its own namespace for lossy codecs), loads it into a
//!   fresh cache, prefills the last 8 tokens on top and compares with the reference: the last
//!   token's logits (max |diff|, KL(ref || codec)), 32 greedy tokens (position-wise agreement)
//!   and the perplexity of the next H tokens of the document (teacher-forced). The `raw` row
//!   is the noise floor of reusing an exactly stored cache. One `RESULT {json}` line per
//!   (document, codec) and a `SUMMARY {json}` line per codec. With `--keep DIR` the raw
//!   chunks of every prompt stay in cache directory DIR (the codec speed benchmark's input).
//!
//! The model comes from `kvfs_model::locate_gguf` (scripts/install-model).

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
            let loader = Loader::open(&out, e.spec.clone(), b"").unwrap();
            let s = e.store(&loader, &mut kv, toks).unwrap();
            println!(
                "RESULT {}",
                serde_json::json!({"mode": "kv", "tokens": n, "chunks": s.written,
                    "prefill_s": t0.elapsed().as_secs_f64(), "spec": e.spec.namespace_dir()})
            );
        }
        "quality" => quality(&e),
        _ => panic!("usage: codec_quality kv|quality ..."),
    }
}

fn quality(e: &Engine) {
    let docs: Vec<(String, String)> =
        serde_json::from_str(&std::fs::read_to_string(arg("--docs").expect("--docs")).unwrap())
            .unwrap();
    let prompts = num("--prompts", 20);
    let t = num("--prompt-tokens", 512);
    let held_n = num("--held", 32);
    let codecs = [Codec::Raw, Codec::Fp8, Codec::Kivi4, Codec::Kivi2];
    let mut sums: Vec<[f64; 6]> = vec![[0.0; 6]; codecs.len()];
    let mut used = 0;
    let work = tempfile::tempdir().unwrap();
    let keep = arg("--keep").map(PathBuf::from);
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
        for (ci, &codec) in codecs.iter().enumerate() {
            let mut spec = e.spec.clone();
            spec.codec = codec;
            let dir = match (&keep, codec) {
                (Some(k), Codec::Raw) => k.clone(),
                _ => work.path().join(format!("{used}-{codec}")),
            };
            std::fs::create_dir_all(&dir).unwrap();
            let loader = Loader::open_with(&dir, spec, b"", LoaderOptions::default()).unwrap();
            e.store(&loader, &mut kv, &prompt[..t]).unwrap();
            let mut kv2 = e.new_cache(cap);
            let out = e
                .prefill_reusing(&loader, &mut kv2, prompt, Some(t))
                .unwrap();
            assert_eq!(
                out.reused, t,
                "{codec}: the whole prefix must come from the cache"
            );
            let p = softmax(&out.logits);
            let diff = max_abs_diff(&ref_logits, &out.logits) as f64;
            let kld = kl(&ref_p, &p);
            let top1 =
                (kvfs_model::argmax(&out.logits) == kvfs_model::argmax(&ref_logits)) as u8 as f64;
            let c_nll = nll(e, &mut kv2, prompt.len(), &out.logits, held);
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
            let row = [diff, kld, agree, c_nll.exp(), ref_nll.exp(), top1];
            for (s, v) in sums[ci].iter_mut().zip(row) {
                *s += v;
            }
            println!(
                "RESULT {}",
                serde_json::json!({"mode": "quality", "doc": name, "codec": codec.name(),
                    "logit_max_abs_diff": diff, "kl": kld, "greedy_agreement": agree,
                    "ppl": c_nll.exp(), "ref_ppl": ref_nll.exp(), "top1_same": top1 == 1.0,
                    "bytes_read": stats.bytes_read, "bytes_needed": stats.bytes_needed})
            );
            if keep.is_none() || codec != Codec::Raw {
                std::fs::remove_dir_all(&dir).ok();
            }
        }
    }
    assert!(used >= prompts, "only {used} documents long enough");
    let n = used as f64;
    for (ci, codec) in codecs.iter().enumerate() {
        let s = sums[ci];
        println!(
            "SUMMARY {}",
            serde_json::json!({"codec": codec.name(), "prompts": used,
                "prompt_tokens": t, "held_tokens": held_n,
                "mean_logit_max_abs_diff": s[0] / n, "mean_kl": s[1] / n,
                "greedy_agreement": s[2] / n, "mean_ppl": s[3] / n, "mean_ref_ppl": s[4] / n,
                "top1_same": s[5] / n})
        );
    }
}
