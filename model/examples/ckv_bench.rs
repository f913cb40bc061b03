//! The ContiguousKV benchmark (issue 14), driven by `scripts/bench-ckv`: SmolLM2-135M on
//! windows of real English text, importance-guided pruned re-prefill against the full reuse.
//!
//! For each prompt (a document window of N tokens, cached with its importance, plus the next
//! `suffix` tokens of the text as the fresh part; `--suffix 1,8,32` times several suffix
//! lengths over one document window, the first tokens of the same continuation, and measures
//! quality on the last, the headline) it prints `RESULT {json}` lines:
//! - `quality`: per selection (`importance`: the stored group importance; `random`: random
//!   groups, a floor; `token`: the per-token top-k, IMPRESS-style, with the groups holding
//!   those tokens loaded) and budget, first-token KL(full || pruned), top-1 agreement, the
//!   share of the 32 greedy tokens equal position by position, bytes the load read and needed,
//!   and the bytes a token-granular store must read (each selected token's rows rounded to
//!   4 KiB pages);
//! - `time`: per cache state (`warm`: buffered reads from the page cache; `cold`: O_DIRECT
//!   reads after the page cache was dropped), the full reuse (load everything, then prefill
//!   the suffix) and the pruned re-prefill per budget with and without prefetch: wall time
//!   and the time the engine was blocked on I/O; and `suffix-only`, the suffix prefilled with
//!   no prefix at all (its projections, MLP, logits and attention among its own tokens: the
//!   part of every re-prefill that no budget removes), measured, not extrapolated.
//!
//! Usage: ckv_bench CORPUS CACHE_DIR SIZE:PROMPTS... [--suffix N[,N...]] [--gen N]
//!        [--repeats N] [--drop-caches] [--store-only] [--time-only] [--reverse]
//! (`--time-only` skips the quality loop: for profiling the timed passes.)

use kvfs_loader::importance::{budget_count, top_groups};
use kvfs_loader::prefetch::Prefetch;
use kvfs_loader::{IoMode, Loader, LoaderOptions, Selection};
use kvfs_model::{Engine, PagedKv, PruneOptions, PrunedPrefix, argmax};
use std::path::Path;
use std::time::Instant;

const BUDGETS: [f64; 4] = [0.1, 0.2, 0.4, 1.0];
const ROW: u64 = 3 * 64 * 4;
const PAGE: u64 = 4096;

fn softmax(l: &[f32]) -> Vec<f64> {
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = l.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let (p, q) = (softmax(p_logits), softmax(q_logits));
    p.iter()
        .zip(&q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| a * (a / b.max(1e-300)).ln())
        .sum()
}

/// xorshift64*, for reproducible random groups.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn sample(&mut self, n: usize, k: usize) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..n as u32).collect();
        for i in 0..k {
            let j = i + (self.next() % (n - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx.sort_unstable();
        idx
    }
}

/// Bytes a token-granular store reads for `kept` positions per layer: each token's row in
/// each plane rounded out to 4 KiB pages of its chunk's extent (pages shared by two selected
/// tokens read once).
fn token_store_bytes(kept: &[Vec<u32>], chunk_tokens: u64) -> u64 {
    let mut total = 0;
    for layer in kept {
        let mut pages: Vec<(u64, u64)> = Vec::new();
        for &t in layer {
            let (c, local) = (t as u64 / chunk_tokens, t as u64 % chunk_tokens);
            let (first, last) = (local * ROW / PAGE, (local * ROW + ROW - 1) / PAGE);
            for p in first..=last {
                if pages.last() != Some(&(c, p)) && !pages.contains(&(c, p)) {
                    pages.push((c, p));
                }
            }
        }
        total += 2 * pages.len() as u64 * PAGE; // K and V extents
    }
    total
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("cannot drop the page cache (not root?): cold figures are not cold");
    }
}

/// Where a prompt's per-token scores are kept beside the cache.
fn scores_path(cache: &Path, n: usize, off: usize) -> std::path::PathBuf {
    cache.join("ckv-scores").join(format!("{n}-{off}.f32"))
}

/// Per layer, per token scores as `u32 layers, u32 tokens`, then f32s, little-endian.
fn save_scores(path: &Path, scores: &[Vec<f32>]) -> std::io::Result<()> {
    let mut b = Vec::new();
    b.extend_from_slice(&(scores.len() as u32).to_le_bytes());
    b.extend_from_slice(&(scores[0].len() as u32).to_le_bytes());
    for s in scores.iter().flatten() {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, b)?;
    std::fs::rename(tmp, path)
}

fn load_scores(path: &Path) -> Option<Vec<Vec<f32>>> {
    let b = std::fs::read(path).ok()?;
    let word = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let (layers, n) = (word(0), word(4));
    if b.len() != 8 + 4 * layers * n {
        return None;
    }
    let f: Vec<f32> = b[8..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Some(f.chunks(n).map(<[f32]>::to_vec).collect())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("number"))
    };
    let suffixes: Vec<usize> = args
        .iter()
        .position(|a| a == "--suffix")
        .and_then(|i| args.get(i + 1))
        .map_or(vec![32], |v| {
            v.split(',').map(|x| x.parse().expect("number")).collect()
        });
    // the document windows depend on the longest suffix only, so every suffix list whose
    // longest is 32 reuses the stored chunks of the default run
    let suffix = *suffixes.iter().max().expect("a suffix");
    let headline = *suffixes.last().expect("a suffix");
    assert!(
        suffixes.iter().all(|&s| s >= 1),
        "a suffix has at least one token"
    );
    let gen_n = flag("--gen", 32);
    let repeats = flag("--repeats", 3);
    let drop_cold = args.iter().any(|a| a == "--drop-caches");
    let store_only = args.iter().any(|a| a == "--store-only");
    let reverse = args.iter().any(|a| a == "--reverse");
    let time_only = args.iter().any(|a| a == "--time-only");
    let corpus = std::fs::read_to_string(&args[0])?;
    let cache = Path::new(&args[1]);
    let plan: Vec<(usize, usize)> = args[2..]
        .iter()
        .take_while(|a| !a.starts_with("--"))
        .map(|a| {
            let (n, p) = a.split_once(':').expect("SIZE:PROMPTS");
            (n.parse().unwrap(), p.parse().unwrap())
        })
        .collect();

    let engine = Engine::load(&kvfs_model::locate_gguf()?)?;
    let text = engine.tokenizer.encode(&corpus);
    eprintln!("corpus: {} tokens", text.len());
    std::fs::create_dir_all(cache)?;
    let warm = Loader::open_with(
        cache,
        engine.spec.clone(),
        b"",
        LoaderOptions {
            io: IoMode::Buffered,
            ..Default::default()
        },
    )?;
    let cold = Loader::open(cache, engine.spec.clone(), b"")?;

    for (n, prompts) in plan {
        let order: Vec<usize> = if reverse {
            (0..prompts).rev().collect()
        } else {
            (0..prompts).collect()
        };
        for i in order {
            let span = text.len() - n - suffix;
            // evenly spaced, each centred in its share of the text: windows of two sizes never
            // start at one offset, so their chunks (chained from the window's start) differ
            let off = (2 * i + 1) * span / (2 * prompts);
            let doc = &text[off..off + n];
            // store the document with its importance, unless a former run did
            let sidecar = scores_path(cache, n, off);
            let kept = if warm.lookup(doc) == n {
                load_scores(&sidecar)
            } else {
                None
            };
            let token_scores = match kept {
                Some(s) => {
                    eprintln!(
                        "n={n} prompt {i} at {off}: chunks and scores kept from a former run"
                    );
                    s
                }
                None => {
                    let t = Instant::now();
                    let mut kv = engine.new_cache(n);
                    let (_, scores) = engine.prefill_scored(&mut kv, doc)?;
                    engine.store_scored(&warm, &mut kv, doc, &scores)?;
                    let s = scores.token_scores();
                    save_scores(&sidecar, &s)?;
                    eprintln!("n={n} prompt {i} at {off}: stored in {:.1?}", t.elapsed());
                    s
                }
            };
            if store_only {
                continue;
            }
            let cap = n + suffix + gen_n + 1;
            if !time_only {
                let tokens = &text[off..off + n + headline];
                quality(&engine, &warm, tokens, n, off, i, gen_n, &token_scores)?;
            }
            // time: the full reuse (both peers) vs pruned, with and without prefetch, warm
            // then cold, every configuration once per round. All runs of a prompt share one
            // cache, faulted in by an untimed full reuse first, as a server's resident KV pool
            // is: a fresh cache per run put ~23k first-touch page faults per 94 MB loaded into
            // the timed region (every run writes the rows it reads, so nothing stale is seen).
            let mut kv = engine.new_cache(cap);
            engine.prefill_reusing(&warm, &mut kv, &text[off..off + n + suffix], None)?;
            for rep in 0..repeats {
                for &s in &suffixes {
                    let tokens = &text[off..off + n + s];
                    let at = Timed {
                        n,
                        prompt: i,
                        rep,
                        suffix: s,
                    };
                    for (state, loader) in [("warm", &warm), ("cold", &cold)] {
                        if state == "cold" && drop_cold {
                            drop_caches();
                        }
                        time_round(&engine, loader, state, tokens, &mut kv, &at)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Which timed run a `time` line belongs to.
struct Timed {
    n: usize,
    prompt: usize,
    rep: usize,
    suffix: usize,
}

/// Quality of each selection and budget against the full reuse of `tokens` (the document's
/// first `n` tokens reused, the rest fresh).
#[allow(clippy::too_many_arguments)]
fn quality(
    engine: &Engine,
    warm: &Loader,
    tokens: &[u32],
    n: usize,
    off: usize,
    i: usize,
    gen_n: usize,
    token_scores: &[Vec<f32>],
) -> Result<(), Box<dyn std::error::Error>> {
    let ct = engine.spec.chunk_tokens as usize;
    let gt = engine.spec.group_tokens as usize;
    let cap = tokens.len() + gen_n + 1;
    let suffix = tokens.len() - n;
    // the full reuse: reference output
    let mut kv = engine.new_cache(cap);
    let full = engine.prefill_reusing(warm, &mut kv, tokens, None)?;
    assert_eq!(full.reused, n);
    let full_gen = engine.generate(&mut kv, tokens.len(), &full.logits, gen_n)?;
    drop(kv);

    // quality per selection and budget
    let groups_total = n.div_ceil(gt);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (off as u64 + 1));
    for &b in &BUDGETS {
        for sel_name in ["importance", "random", "token"] {
            if b == 1.0 && sel_name != "importance" {
                continue; // every selection is everything at 100%
            }
            let (selection, visible) = match sel_name {
                "importance" => (warm.importance_selection(tokens, n, b)?, None),
                "random" => {
                    let k = budget_count(groups_total, b);
                    let per: Vec<Vec<u32>> = (0..30).map(|_| rng.sample(groups_total, k)).collect();
                    (Selection::new(per), None)
                }
                _ => {
                    let kept: Vec<Vec<u32>> = token_scores
                        .iter()
                        .map(|l| top_groups(&l[..n], b)) // top tokens: groups of 1
                        .collect();
                    let groups = kept
                        .iter()
                        .map(|l| l.iter().map(|&t| t / gt as u32).collect())
                        .collect();
                    (Selection::new(groups), Some(PrunedPrefix { upto: n, kept }))
                }
            };
            let mut kv = engine.new_cache(cap);
            let out = engine.prefill_selected(
                warm,
                &mut kv,
                tokens,
                n,
                &selection,
                visible,
                PruneOptions::default(),
            )?;
            let g =
                engine.generate_pruned(&mut kv, tokens.len(), &out.logits, gen_n, &out.prefix)?;
            let same = g.iter().zip(&full_gen).filter(|(a, b)| a == b).count();
            let kept_rows = out.prefix.kept_rows() as u64;
            println!(
                "RESULT {{\"kind\":\"quality\",\"n\":{n},\"suffix\":{suffix},\"prompt\":{i},\"offset\":{off},\"selection\":\"{sel_name}\",\"budget\":{b},\"kl\":{},\"top1\":{},\"gen_agree\":{},\"bytes_read\":{},\"bytes_needed\":{},\"kept_rows\":{kept_rows},\"token_store_bytes\":{},\"token_needed\":{}}}",
                kl(&full.logits, &out.logits),
                argmax(&full.logits) == argmax(&out.logits),
                same as f64 / full_gen.len() as f64,
                out.load.bytes_read,
                out.load.bytes_needed,
                token_store_bytes(&out.prefix.kept, ct as u64),
                kept_rows * ROW * 2,
            );
        }
    }
    Ok(())
}

/// One round of the timed configurations on `loader` (`state`: `warm` or `cold`): the suffix
/// alone, the full reuse (both peers) and the pruned re-prefill per budget with and without
/// prefetch.
fn time_round(
    engine: &Engine,
    loader: &Loader,
    state: &str,
    tokens: &[u32],
    kv: &mut PagedKv,
    at: &Timed,
) -> Result<(), Box<dyn std::error::Error>> {
    let Timed {
        n,
        prompt: i,
        rep,
        suffix,
    } = *at;
    let head = format!(
        "\"kind\":\"time\",\"state\":\"{state}\",\"n\":{n},\"suffix\":{suffix},\"prompt\":{i},\"rep\":{rep}"
    );
    let t = Instant::now();
    engine.model.forward(kv, &tokens[n..], 0)?;
    let alone_s = t.elapsed().as_secs_f64();
    println!(
        "RESULT {{{head},\"budget\":0.0,\"mode\":\"suffix-only\",\"seconds\":{alone_s},\"io_seconds\":0,\"blocked_seconds\":0,\"bytes_read\":0}}"
    );
    let t = Instant::now();
    let f = engine.prefill_reusing(loader, kv, tokens, None)?;
    let full_s = t.elapsed().as_secs_f64();
    println!(
        "RESULT {{{head},\"budget\":1.0,\"mode\":\"full\",\"seconds\":{full_s},\"io_seconds\":{},\"blocked_seconds\":{},\"bytes_read\":{}}}",
        f.load_time.as_secs_f64(),
        f.load_time.as_secs_f64(),
        f.load.as_ref().map_or(0, |s| s.bytes_read)
    );
    let runs = [(1.0, "full-overlap", Prefetch::Full)].into_iter().chain(
        BUDGETS[..3]
            .iter()
            .flat_map(|&b| [(b, "off", Prefetch::Off), (b, "prefetch", Prefetch::Full)]),
    );
    for (b, mode, prefetch) in runs {
        let opts = PruneOptions {
            prefetch,
            period_layers: Some(5),
        };
        let t = Instant::now();
        let out = engine.prefill_pruned(loader, kv, tokens, b, opts)?;
        let secs = t.elapsed().as_secs_f64();
        let io: f64 = out.load.loads.iter().map(|s| s.elapsed.as_secs_f64()).sum();
        println!(
            "RESULT {{{head},\"budget\":{b},\"mode\":\"{mode}\",\"seconds\":{secs},\"io_seconds\":{io},\"blocked_seconds\":{},\"select_seconds\":{},\"bytes_read\":{}}}",
            out.load.blocked.as_secs_f64(),
            out.select_time.as_secs_f64(),
            out.load.bytes_read
        );
    }
    Ok(())
}
