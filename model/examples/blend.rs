//! Blending on SmolLM2 (issue 13, docs/BLEND.md): answer a question over documents whose KV
//! is reused from kvfs wherever they land, and the benchmark behind `scripts/bench-blend`.
//!
//! ```text
//! blend answer --doc FILE [--doc FILE ...] --question TEXT [--ratio 0.15] [--check-layer 1]
//!              [--cache DIR] [--max-new 64]
//! blend bench --dataset FILE --out FILE [--cache DIR] [--ratios 0.05,0.15,0.3]
//!             [--lmcache-ratios 0.15] [--ttft-sizes 2048,4096|none] [--ttft-ratios R,...]
//!             [--reps 2] [--skip N] [--prompts N]
//! blend tune --dataset FILE --out FILE [--cache DIR] [--prompts 8] [--skip 0] --variants 'NAME=OPT,...;...'
//! blend count < TEXTS
//! ```
//!
//! `answer` stores each document as position-independent chunks in the cache directory (a
//! temporary one by default; a second run with the same `--cache` finds them), then loads
//! them behind a system prefix, blends at the given ratio, prints the answer (greedy), the
//! time to first token (prefix prefill + document loads + blend, model loading excluded) and
//! the share of document tokens recomputed.
//!
//! `bench` reads the prompt set `scripts/blend-dataset.py` writes and prints one JSON object
//! per line (`"kind": "ttft"` per size, method and repetition first, then `"kind": "quality"` per
//! prompt and method, so a run cut short keeps what it measured) to `--out`. Methods: the full
//! prefill (reference), blending at each ratio (`BlendConfig`'s defaults), LMCache's choice at
//! each `--lmcache-ratios` ratio (the baseline), and
//! naive reuse (documents loaded with their keys re-encoded, nothing recomputed).
//!
//! `tune` compares blending options on the first `--prompts` prompts (a fixed development
//! subset; `--skip` resumes after the first ones): per prompt the full prefill and naive reuse once, then each variant; it writes one
//! JSON object per prompt and variant and prints a table (mean KL, naive's mean KL over the
//! variant's, answer log-likelihood). A variant is `NAME=OPT,OPT...` with options
//! `ratio=R`, `check=L`, `dev=k|kv|krel`, `heads=N`, `qw` (question-weighted), `keep` (keep the
//! check pass's KV) and
//! `sched=L:S/L:S` (a schedule); unnamed options keep `BlendConfig`'s defaults.
//!
//! `count` reads one text per line (the dataset's `\\` and `\n` escapes) and prints the number
//! of SmolLM2 tokens of each as a document of the prompt (with its `Document:` framing), one
//! per line: `scripts/blend-dataset.py` filters documents by this count, the one the
//! benchmark sees, rather than by words.

use kvfs_loader::Loader;
use kvfs_model::blend::Deviation;
use kvfs_model::blend::log_softmax_at;
use kvfs_model::{BlendConfig, BlendPrompt, Engine, PagedKv, argmax, locate_gguf};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const SYSTEM: &str = "<|im_start|>system\nYou are a helpful assistant. Answer the question using the documents the user gives.<|im_end|>\n<|im_start|>user\n";
const QUESTION_END: &str = "<|im_end|>\n<|im_start|>assistant\n";
const GREEDY: usize = 32;

struct Args(Vec<String>);

impl Args {
    fn value(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1).cloned())
    }
    fn values(&self, name: &str) -> Vec<String> {
        self.0
            .windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].clone())
            .collect()
    }
    fn list(&self, name: &str, default: &str) -> Res<Vec<f64>> {
        let s = self.value(name).unwrap_or_else(|| default.to_string());
        Ok(s.split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()?)
    }
}

fn main() -> Res<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = Args(argv.clone());
    match argv.first().map(String::as_str) {
        Some("answer") => answer(&args),
        Some("bench") => bench(&args),
        Some("count") => count(),
        Some("tune") => tune(&args),
        _ => {
            eprintln!(
                "usage: blend answer --doc FILE... --question TEXT | blend bench --dataset FILE --out FILE (see the source's doc)"
            );
            std::process::exit(2)
        }
    }
}

fn cache_dir(args: &Args) -> Res<(PathBuf, Option<tempdir::Dir>)> {
    match args.value("--cache") {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            Ok((PathBuf::from(d), None))
        }
        None => {
            let t = tempdir::Dir::new()?;
            Ok((t.0.clone(), Some(t)))
        }
    }
}

/// A temporary directory removed on drop (no tempfile dependency for an example).
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> std::io::Result<Dir> {
            let p = std::env::temp_dir().join(format!(
                "kvfs-blend-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A document's text as the prompt holds it.
fn doc_text(text: &str) -> String {
    format!("Document:\n{}\n\n", text.trim())
}

fn answer(args: &Args) -> Res<()> {
    let engine = Engine::load(&locate_gguf()?)?;
    let (dir, _tmp) = cache_dir(args)?;
    let loader = Loader::open(&dir, engine.spec.clone(), b"")?;
    let mut docs = Vec::new();
    for f in args.values("--doc") {
        docs.push(
            engine
                .tokenizer
                .encode(&doc_text(&std::fs::read_to_string(&f)?)),
        );
    }
    let question = args.value("--question").ok_or("--question is required")?;
    let cfg = BlendConfig {
        ratio: args.value("--ratio").map_or(Ok(0.15), |s| s.parse())?,
        check_layer: args.value("--check-layer").map_or(Ok(1), |s| s.parse())?,
        ..Default::default()
    };
    let max_new: usize = args.value("--max-new").map_or(Ok(64), |s| s.parse())?;
    let stored = engine.store_documents(&loader, &docs)?;
    let prefix = engine.tokenizer.encode(SYSTEM);
    let q = engine
        .tokenizer
        .encode(&format!("Question: {question}{QUESTION_END}"));
    let p = BlendPrompt {
        prefix: &prefix,
        documents: &docs,
        question: &q,
    };
    let total = p.tokens().len();
    let mut kv = engine.new_cache(total + max_new);
    let t0 = Instant::now();
    engine.prefill(&mut kv, &prefix)?;
    engine.load_documents(&loader, &mut kv, &p)?;
    let out = engine.blend(&mut kv, &p, &cfg)?;
    let ttft = t0.elapsed();
    let tokens = engine.generate(&mut kv, total, &out.logits, max_new)?;
    println!("{}", engine.tokenizer.decode(&tokens).trim());
    println!(
        "TTFT {:.3} s for {total} tokens ({} in {} documents, {} chunks stored now); recomputed {:.1}% of document tokens",
        ttft.as_secs_f64(),
        out.document_tokens,
        docs.len(),
        stored.written,
        100.0 * out.recompute_share()
    );
    Ok(())
}

/// A blending variant of `tune`: `NAME=OPT,...` (module doc).
fn parse_variant(spec: &str) -> Res<(String, BlendConfig)> {
    let (name, opts) = spec.split_once('=').unwrap_or((spec, ""));
    let mut cfg = BlendConfig::default();
    for o in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (k, v) = o.split_once('=').unwrap_or((o, ""));
        match k {
            "ratio" => cfg.ratio = v.parse()?,
            "check" => cfg.check_layer = v.parse()?,
            "heads" => cfg.chunk_head_tokens = v.parse()?,
            "qw" => cfg.question_weighted = true,
            "keep" => cfg.keep_check_kv = true,
            "dev" => {
                cfg.deviation = match v {
                    "k" => Deviation::K,
                    "kv" => Deviation::KV,
                    "krel" => Deviation::KRelative,
                    _ => return Err(format!("unknown deviation {v}").into()),
                }
            }
            "sched" => {
                for step in v.split('/') {
                    let (l, sh) = step.split_once(':').ok_or("sched is L:S/L:S...")?;
                    cfg.schedule.push((l.parse()?, sh.parse()?));
                }
            }
            _ => return Err(format!("unknown variant option {k}").into()),
        }
    }
    Ok((name.to_string(), cfg))
}

/// Runs variants of blending on a development subset (module doc).
fn tune(args: &Args) -> Res<()> {
    let dataset = args.value("--dataset").ok_or("--dataset is required")?;
    let out_path = args.value("--out").ok_or("--out is required")?;
    let n_prompts: usize = args.value("--prompts").map_or(Ok(8), |s| s.parse())?;
    let skip: usize = args.value("--skip").map_or(Ok(0), |s| s.parse())?;
    let variants: Vec<(String, BlendConfig)> = args
        .value("--variants")
        .ok_or("--variants is required")?
        .split(';')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(parse_variant)
        .collect::<Res<_>>()?;
    let engine = Engine::load(&locate_gguf()?)?;
    let (dir, _tmp) = cache_dir(args)?;
    let loader = Loader::open(&dir, engine.spec.clone(), b"")?;
    let mut out = std::fs::File::create(&out_path)?;
    let (texts, prompts) = read_dataset(&dataset)?;
    let tok = &engine.tokenizer;
    let docs: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(&doc_text(t))).collect();
    let prefix = tok.encode(SYSTEM);
    // name -> (kl sum, ll sum, share sum)
    let mut sums: Vec<(String, f64, f64, f64)> = Vec::new();
    let mut add =
        |name: &str, kl: f64, ll: f64, share: f64| match sums.iter_mut().find(|s| s.0 == name) {
            Some(s) => (s.1, s.2, s.3) = (s.1 + kl, s.2 + ll, s.3 + share),
            None => sums.push((name.to_string(), kl, ll, share)),
        };
    let prompts = &prompts[skip.min(prompts.len())..n_prompts.min(prompts.len())];
    for pr in prompts {
        let pdocs: Vec<Vec<u32>> = pr.docs.iter().map(|&d| docs[d].clone()).collect();
        engine.store_documents(&loader, &pdocs)?;
        let q = tok.encode(&format!("Question: {}{QUESTION_END}", pr.question));
        let answer = tok.encode(&pr.answer);
        let p = BlendPrompt {
            prefix: &prefix,
            documents: &pdocs,
            question: &q,
        };
        let total = p.tokens().len();
        let extra = answer.len() + 1;
        let mut reference = None;
        let mut methods: Vec<(String, Option<BlendConfig>, Method)> = vec![
            ("full".into(), None, Method::Full),
            ("naive".into(), None, Method::Naive),
        ];
        methods.extend(
            variants
                .iter()
                .map(|(n, c)| (n.clone(), Some(c.clone()), Method::Blend(c.ratio))),
        );
        for (name, cfg, m) in methods {
            let mut kv = engine.new_cache(total + extra);
            let t0 = Instant::now();
            let (logits, share) = match (&cfg, m) {
                (Some(cfg), _) => {
                    engine.prefill(&mut kv, p.prefix)?;
                    engine.load_documents(&loader, &mut kv, &p)?;
                    let o = engine.blend(&mut kv, &p, cfg)?;
                    let share = o.recompute_share();
                    (o.logits, share)
                }
                (None, m) => {
                    let r = run_method(&engine, &loader, &p, m, extra)?;
                    kv = r.kv;
                    (r.logits, r.share)
                }
            };
            let secs = t0.elapsed().as_secs_f64();
            let ll = engine.continuation_log_likelihood(&mut kv, total, &logits, &answer)?
                / answer.len().max(1) as f64;
            let reference = reference.get_or_insert_with(|| logits.clone());
            let k = kl(reference, &logits);
            add(&name, k, ll, share);
            let line = format!(
                "{{\"kind\":\"tune\",\"prompt\":{},\"variant\":\"{name}\",\"config\":\"{}\",\"tokens\":{total},\"share\":{share:.4},\"seconds\":{secs:.3},\"kl\":{k:.6e},\"answer_ll_per_token\":{ll:.4}}}",
                pr.id,
                format!("{cfg:?}").replace('"', "'"),
            );
            writeln!(out, "{line}")?;
            eprintln!("{line}");
        }
    }
    let n = prompts.len() as f64;
    let naive_kl = sums
        .iter()
        .find(|s| s.0 == "naive")
        .map_or(f64::NAN, |s| s.1 / n);
    println!("| variant | recomputed | mean KL | naive KL / this | answer log-lik. (nats/token) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, kl, ll, share) in &sums {
        println!(
            "| {name} | {:.1}% | {:.4} | {:.2}x | {:.3} |",
            100.0 * share / n,
            kl / n,
            naive_kl / (kl / n),
            ll / n
        );
    }
    Ok(())
}

/// Token count of each escaped text on stdin, framed as a document, one per line.
fn count() -> Res<()> {
    let engine = Engine::load(&locate_gguf()?)?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lines() {
        let n = engine.tokenizer.encode(&doc_text(&unescape(&line?))).len();
        writeln!(out, "{n}")?;
    }
    Ok(())
}

/// `\\` and `\n` escapes of the dataset file.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct Prompt {
    id: usize,
    docs: Vec<usize>,
    question: String,
    answer: String,
}

fn read_dataset(path: &str) -> Res<(Vec<String>, Vec<Prompt>)> {
    let mut docs = Vec::new();
    let mut prompts = Vec::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["D", id, _topic, text] => {
                if id.parse::<usize>()? != docs.len() {
                    return Err(format!("document {id} out of order").into());
                }
                docs.push(unescape(text));
            }
            ["P", id, _target, order, q, a] => prompts.push(Prompt {
                id: id.parse()?,
                docs: order
                    .split(',')
                    .map(|x| x.parse())
                    .collect::<Result<_, _>>()?,
                question: unescape(q),
                answer: unescape(a),
            }),
            _ => return Err(format!("bad dataset line: {}", &line[..line.len().min(80)]).into()),
        }
    }
    Ok((docs, prompts))
}

/// KL(p || q) of two logit vectors, in nats.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lse = |v: &[f32]| {
        let m = v.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum()
}

/// What one method gives for one prompt.
struct Run {
    ttft: Duration,
    logits: Vec<f32>,
    share: f64,
    kv: PagedKv,
}

/// Runs one method on a fresh cache with room for `extra` more tokens; times the first token.
fn run_method(
    engine: &Engine,
    loader: &Loader,
    p: &BlendPrompt<'_>,
    method: Method,
    extra: usize,
) -> Res<Run> {
    let total = p.tokens().len();
    let mut kv = engine.new_cache(total + extra);
    let t0 = Instant::now();
    let (logits, share) = match method {
        Method::Full => (engine.prefill(&mut kv, &p.tokens())?, 1.0),
        Method::Naive => {
            engine.prefill(&mut kv, p.prefix)?;
            engine.load_documents(loader, &mut kv, p)?;
            (engine.naive_reuse(&mut kv, p)?, 0.0)
        }
        Method::Blend(_) | Method::Lmcache(_) => {
            engine.prefill(&mut kv, p.prefix)?;
            engine.load_documents(loader, &mut kv, p)?;
            let cfg = match method {
                Method::Lmcache(ratio) => BlendConfig::lmcache(ratio),
                _ => BlendConfig {
                    ratio: method.ratio(),
                    ..Default::default()
                },
            };
            let out = engine.blend(&mut kv, p, &cfg)?;
            let share = out.recompute_share();
            (out.logits, share)
        }
    };
    Ok(Run {
        ttft: t0.elapsed(),
        logits,
        share,
        kv,
    })
}

#[derive(Clone, Copy)]
enum Method {
    Full,
    /// Blending with `BlendConfig`'s defaults at this ratio.
    Blend(f64),
    /// Blending with LMCache's choice (K deviation at layer 1 alone) at this ratio: the
    /// baseline the defaults improve on.
    Lmcache(f64),
    Naive,
}

impl Method {
    fn name(&self) -> String {
        match self {
            Method::Full => "full".into(),
            Method::Naive => "naive".into(),
            Method::Blend(r) => format!("blend{:.0}", r * 100.0),
            Method::Lmcache(r) => format!("lmcache{:.0}", r * 100.0),
        }
    }
    fn ratio(&self) -> f64 {
        match self {
            Method::Full => 1.0,
            Method::Naive => 0.0,
            Method::Blend(r) | Method::Lmcache(r) => *r,
        }
    }
}

fn bench(args: &Args) -> Res<()> {
    let dataset = args.value("--dataset").ok_or("--dataset is required")?;
    let out_path = args.value("--out").ok_or("--out is required")?;
    let ratios = args.list("--ratios", "0.05,0.15,0.3")?;
    let sizes = match args.value("--ttft-sizes").as_deref() {
        Some("none") => Vec::new(),
        _ => args.list("--ttft-sizes", "2048,4096")?,
    };
    let prompt_limit: usize = args
        .value("--prompts")
        .map_or(Ok(usize::MAX), |s| s.parse())?;
    let prompt_skip: usize = args.value("--skip").map_or(Ok(0), |s| s.parse())?;
    let reps: usize = args.value("--reps").map_or(Ok(2), |s| s.parse())?;
    let engine = Engine::load(&locate_gguf()?)?;
    let (dir, _tmp) = cache_dir(args)?;
    let loader = Loader::open(&dir, engine.spec.clone(), b"")?;
    let mut out = std::fs::File::create(&out_path)?;
    let (texts, prompts) = read_dataset(&dataset)?;
    let tok = &engine.tokenizer;
    let docs: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(&doc_text(t))).collect();
    let usable = |i: usize| (200..=600).contains(&docs[i].len());
    let prefix = tok.encode(SYSTEM);
    let lmcache = args.list("--lmcache-ratios", "0.15")?;
    let mut methods = vec![Method::Full];
    methods.extend(ratios.iter().map(|&r| Method::Blend(r)));
    methods.extend(lmcache.iter().map(|&r| Method::Lmcache(r)));
    methods.push(Method::Naive);
    // At fixed sizes: the full prefill, blending at `--ttft-ratios` (default all) and naive.
    let ttft_ratios = args.list(
        "--ttft-ratios",
        &ratios
            .iter()
            .map(f64::to_string)
            .collect::<Vec<_>>()
            .join(","),
    )?;
    let mut ttft_methods = vec![Method::Full];
    ttft_methods.extend(ttft_ratios.iter().map(|&r| Method::Blend(r)));
    ttft_methods.push(Method::Naive);

    // Store the pool once (each chunk prefilled alone); not part of any TTFT.
    let t0 = Instant::now();
    let pool: Vec<Vec<u32>> = (0..docs.len())
        .filter(|&i| usable(i))
        .map(|i| docs[i].clone())
        .collect();
    let stored = engine.store_documents(&loader, &pool)?;
    eprintln!(
        "stored {} documents ({} chunks, {} MB) in {:.1} s",
        pool.len(),
        stored.written,
        stored.bytes_written >> 20,
        t0.elapsed().as_secs_f64()
    );

    // TTFT at fixed sizes: documents of the pool in order until the size is reached (the last
    // one cut to fit, and stored as it is), a fixed question.
    let q = tok.encode(&format!(
        "Question: Which document talks about exceptions?{QUESTION_END}"
    ));
    for &size in &sizes {
        let size = size as usize;
        let budget = size - prefix.len() - q.len();
        let mut pdocs = Vec::new();
        let mut used = 0;
        for d in &pool {
            let take = d.len().min(budget - used);
            pdocs.push(d[..take].to_vec());
            used += take;
            if used == budget {
                break;
            }
        }
        if used < budget {
            return Err(format!("the pool holds fewer than {budget} document tokens").into());
        }
        engine.store_documents(&loader, &pdocs)?;
        let p = BlendPrompt {
            prefix: &prefix,
            documents: &pdocs,
            question: &q,
        };
        let mut full_best = f64::INFINITY;
        for rep in 0..reps {
            for m in &ttft_methods {
                let r = run_method(&engine, &loader, &p, *m, 1)?;
                if matches!(m, Method::Full) {
                    full_best = full_best.min(r.ttft.as_secs_f64());
                }
                let line = format!(
                    "{{\"kind\":\"ttft\",\"size\":{},\"documents\":{},\"method\":\"{}\",\"ratio\":{},\"rep\":{rep},\"share\":{:.4},\"ttft_s\":{:.4}}}",
                    p.tokens().len(),
                    pdocs.len(),
                    m.name(),
                    m.ratio(),
                    r.share,
                    r.ttft.as_secs_f64()
                );
                writeln!(out, "{line}")?;
                eprintln!("{line}");
            }
        }
        eprintln!("size {size}: best full prefill {full_best:.2} s");
    }
    for pr in prompts.iter().skip(prompt_skip).take(prompt_limit) {
        if let Some(&d) = pr.docs.iter().find(|&&d| !usable(d)) {
            return Err(format!(
                "prompt {}: document {d} has {} tokens, outside 200..=600 (rebuild the dataset \
                 with scripts/blend-dataset.py)",
                pr.id,
                docs[d].len()
            )
            .into());
        }
        let pdocs: Vec<Vec<u32>> = pr.docs.iter().map(|&d| docs[d].clone()).collect();
        let q = tok.encode(&format!("Question: {}{QUESTION_END}", pr.question));
        let answer = tok.encode(&pr.answer);
        let p = BlendPrompt {
            prefix: &prefix,
            documents: &pdocs,
            question: &q,
        };
        let total = p.tokens().len();
        let extra = answer.len().max(GREEDY) + 1;
        let mut reference: Option<(Vec<f32>, Vec<u32>, Duration)> = None;
        for m in &methods {
            let mut r = run_method(&engine, &loader, &p, *m, extra)?;
            let greedy = engine.generate(&mut r.kv, total, &r.logits, GREEDY)?;
            let ll = engine.continuation_log_likelihood(&mut r.kv, total, &r.logits, &answer)?;
            let (ref_logits, ref_greedy, ref_ttft) =
                reference.get_or_insert_with(|| (r.logits.clone(), greedy.clone(), r.ttft));
            let same_prefix = greedy
                .iter()
                .zip(ref_greedy.iter())
                .take_while(|(a, b)| a == b)
                .count();
            let mut line = String::new();
            write!(
                line,
                "{{\"kind\":\"quality\",\"prompt\":{},\"method\":\"{}\",\"ratio\":{},\"tokens\":{},\"documents\":{},\"document_tokens\":{},\"share\":{:.4},\"ttft_s\":{:.4},\"ttft_ratio\":{:.4},\"kl\":{:.6e},\"top1_same\":{},\"greedy_same_prefix\":{},\"greedy_identical\":{},\"answer_tokens\":{},\"answer_ll\":{:.4},\"first_token_lp_ref\":{:.4}}}",
                pr.id,
                m.name(),
                m.ratio(),
                total,
                pdocs.len(),
                total - prefix.len() - q.len(),
                r.share,
                r.ttft.as_secs_f64(),
                r.ttft.as_secs_f64() / ref_ttft.as_secs_f64(),
                kl(ref_logits, &r.logits),
                argmax(&r.logits) == argmax(ref_logits),
                same_prefix,
                greedy == *ref_greedy,
                answer.len(),
                ll,
                log_softmax_at(&r.logits, argmax(ref_logits)),
            )?;
            writeln!(out, "{line}")?;
            eprintln!("{line}");
        }
    }

    Ok(())
}
