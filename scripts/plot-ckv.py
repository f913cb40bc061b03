#!/usr/bin/env python3
"""Tables and plot of scripts/bench-ckv's results (issue 14, docs/BENCHMARKS.md).

Usage: scripts/plot-ckv.py [RESULTS.jsonl] [OUT.png]
  defaults: target/bench-ckv.jsonl, docs/ckv.png
Prints Markdown tables (quality, bytes, time at the headline suffix, the 20% budget by suffix
length against the suffix prefilled alone, the 0% extrapolation) to stdout and draws quality
and time against the budget for the three selections, and the 20% ratio by suffix length. Needs matplotlib, e.g. in a venv of its own:
  python3 -m venv ~/.cache/kvfs/plot-venv && ~/.cache/kvfs/plot-venv/bin/pip install matplotlib
  ~/.cache/kvfs/plot-venv/bin/python scripts/plot-ckv.py
"""
import json
import statistics as st
import sys
from collections import defaultdict

src = sys.argv[1] if len(sys.argv) > 1 else "target/bench-ckv.jsonl"
out = sys.argv[2] if len(sys.argv) > 2 else "docs/ckv.png"
rows = [json.loads(line) for line in open(src) if line.strip()]
for r in rows:
    r.setdefault("suffix", 32)  # runs before the suffix dimension had 32 only
quality = [r for r in rows if r["kind"] == "quality"]
times = [r for r in rows if r["kind"] == "time"]
suffixes = sorted({r["suffix"] for r in times})
# the headline suffix: the one quality is measured on (32 in scripts/bench-ckv)
headline = max({r["suffix"] for r in quality} or suffixes)
sizes = sorted({r["n"] for r in quality} | {r["n"] for r in times})
sels = ["importance", "random", "token"]
budgets = sorted({r["budget"] for r in quality})


def mean(xs):
    return st.mean(xs) if xs else float("nan")


def pick(n, sel, b):
    # at 100% every selection is everything: the importance row stands for all three
    return [r for r in quality if r["n"] == n and r["budget"] == b
            and (r["selection"] == sel or b == 1.0)]


print("### Quality against the full reuse (mean over prompts)\n")
print("| tokens | selection | budget | prompts | first-token KL | top-1 same | 32-token agreement |")
print("|---:|---|---:|---:|---:|---:|---:|")
for n in sizes:
    for sel in sels:
        for b in budgets:
            rs = pick(n, sel, b)
            if not rs:
                continue
            print(f"| {n} | {sel} | {b:.0%} | {len(rs)} | {mean([r['kl'] for r in rs]):.4f} | "
                  f"{sum(r['top1'] for r in rs)}/{len(rs)} | {mean([r['gen_agree'] for r in rs]):.2f} |")

print("\n### Bytes read (mean per prompt, MB) and read amplification\n")
print("| tokens | selection | budget | kvfs groups read | needed | amplification | "
      "token-granular store (4 KiB pages) | its amplification |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for n in sizes:
    for sel in ["importance", "token"]:
        for b in budgets:
            if b == 1.0:
                continue
            rs = pick(n, sel, b)
            if not rs:
                continue
            rd = mean([r["bytes_read"] for r in rs]) / 1e6
            nd = mean([r["bytes_needed"] for r in rs]) / 1e6
            tk = mean([r["token_store_bytes"] for r in rs]) / 1e6
            tn = mean([r["token_needed"] for r in rs]) / 1e6
            print(f"| {n} | {sel} | {b:.0%} | {rd:.1f} | {nd:.1f} | {rd / nd:.3f} | {tk:.1f} | {tk / tn:.2f} |")

print(f"\n### Time at the headline suffix ({headline} tokens; per prompt the median over repeats, "
      "then the median over prompts, seconds)\n")
print("Peers: `full` loads every chunk, then prefills; `full, overlapped` loads every group "
      "through the prefetching layer-by-layer load the pruned runs use. The ratio is to the "
      "faster peer of the same prompt.\n")
print("| tokens | cache | budget | prompts | full reuse | full, overlapped | pruned, no prefetch | "
      "pruned, prefetch | ratio (prefetch) | I/O blocked, no prefetch | blocked, prefetch | I/O hidden |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
tsel = defaultdict(list)
for r in times:
    tsel[(r["state"], r["n"], r["budget"], r["mode"], r["prompt"], r["suffix"])].append(r)


def med(state, n, b, mode, p, field="seconds", suffix=headline):
    rs = tsel[(state, n, b, mode, p, suffix)]
    return st.median([r[field] for r in rs]) if rs else None


ratios = defaultdict(list)
for n in sizes:
    for state in ["warm", "cold"]:
        tbudgets = sorted({r["budget"] for r in times if r["mode"] in ("off", "prefetch")})
        # prompts whose runs all finished (an interrupted run leaves a partial prompt)
        prompts = sorted(p for p in {r["prompt"] for r in times if r["n"] == n and r["suffix"] == headline}
                         if med(state, n, 1.0, "full", p) is not None
                         and all(med(state, n, b, m, p) is not None
                                 for b in tbudgets for m in ["off", "prefetch"]))
        if not prompts:
            continue
        full = {p: med(state, n, 1.0, "full", p) for p in prompts}
        overlap = {p: med(state, n, 1.0, "full-overlap", p) for p in prompts}
        peer = {p: min(x for x in (full[p], overlap[p]) if x is not None) for p in prompts}
        for b in tbudgets:
            off = {p: med(state, n, b, "off", p) for p in prompts}
            pre = {p: med(state, n, b, "prefetch", p) for p in prompts}
            ratio = [pre[p] / peer[p] for p in prompts]
            ratios[(state, n, "prefetch")].append((b, st.median(ratio)))
            ratios[(state, n, "off")].append((b, st.median([off[p] / peer[p] for p in prompts])))
            bo = st.median([med(state, n, b, "off", p, "blocked_seconds") for p in prompts])
            bp = st.median([med(state, n, b, "prefetch", p, "blocked_seconds") for p in prompts])
            ov = [overlap[p] for p in prompts if overlap[p] is not None]
            print(f"| {n} | {state} | {b:.0%} | {len(prompts)} | {st.median(full.values()):.3f} | "
                  f"{st.median(ov) if ov else float('nan'):.3f} | "
                  f"{st.median(off.values()):.3f} | {st.median(pre.values()):.3f} | "
                  f"{st.median(ratio):.2f} | {bo:.3f} | {bp:.3f} | {1 - bp / bo if bo else float('nan'):.0%} |")

print("\n### The budget's reach by suffix length: 20% against the suffix alone\n")
print("Per prompt and suffix length: the faster full-reuse peer, the suffix prefilled alone "
      "(no prefix: its projections, MLP, logits and attention among its own tokens; measured), "
      "the pruned re-prefill at 20% with prefetch; the ratios are to the peer of the same prompt "
      "and suffix, medians over prompts. `floor` is the suffix alone over the peer: no budget "
      "goes below it.\n")
print("| tokens | suffix | cache | prompts | full reuse (faster peer) | suffix alone | pruned 20% | "
      "ratio 20% | floor ratio | ratio 10% |")
print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
by_suffix = defaultdict(list)
for n in sizes:
    for sfx in suffixes:
        for state in ["warm", "cold"]:
            prompts = sorted(p for p in {r["prompt"] for r in times if r["n"] == n and r["suffix"] == sfx}
                             if all(med(state, n, b, m, p, suffix=sfx) is not None
                                    for b, m in [(1.0, "full"), (0.0, "suffix-only"),
                                                 (0.2, "prefetch"), (0.1, "prefetch")]))
            if not prompts:
                continue
            peer = {p: min(x for x in (med(state, n, 1.0, "full", p, suffix=sfx),
                                       med(state, n, 1.0, "full-overlap", p, suffix=sfx)) if x is not None)
                    for p in prompts}
            alone = {p: med(state, n, 0.0, "suffix-only", p, suffix=sfx) for p in prompts}
            p20 = {p: med(state, n, 0.2, "prefetch", p, suffix=sfx) for p in prompts}
            p10 = {p: med(state, n, 0.1, "prefetch", p, suffix=sfx) for p in prompts}
            r20 = st.median(p20[p] / peer[p] for p in prompts)
            floor = st.median(alone[p] / peer[p] for p in prompts)
            by_suffix[(n, state)].append((sfx, r20, floor))
            print(f"| {n} | {sfx} | {state} | {len(prompts)} | {st.median(peer.values()):.3f} | "
                  f"{st.median(alone.values()):.3f} | {st.median(p20.values()):.3f} | {r20:.2f} | "
                  f"{floor:.2f} | {st.median(p10[p] / peer[p] for p in prompts):.2f} |")

print("\n### What a budget cannot remove: the ratio extrapolated to a 0% budget\n")
print(f"At the headline suffix ({headline} tokens): per prompt a least-squares line through the "
      "pruned (prefetch) ratios at the budgets above, its value at 0% (the suffix's own compute "
      "and per-layer overheads, which no pruning removes; the table above measures the suffix "
      "alone) and its slope (what each share of the groups costs); medians over prompts.\n")
print("| tokens | cache | ratio at 0% | slope per 100% |")
print("|---:|---|---:|---:|")
for n in sizes:
    for state in ["warm", "cold"]:
        pts = ratios.get((state, n, "prefetch"))
        if not pts:
            continue
        per_prompt = defaultdict(list)
        for r in times:
            if r["n"] == n and r["state"] == state and r["mode"] == "prefetch":
                per_prompt[r["prompt"]].append(r)
        fits = []
        for p, rs in per_prompt.items():
            peer = [x for x in (med(state, n, 1.0, "full", p), med(state, n, 1.0, "full-overlap", p)) if x]
            bs = sorted({r["budget"] for r in rs})
            if len(bs) < 2 or not peer:
                continue
            ys = [med(state, n, b, "prefetch", p) / min(peer) for b in bs]
            mb, my = st.mean(bs), st.mean(ys)
            slope = sum((b - mb) * (y - my) for b, y in zip(bs, ys)) / sum((b - mb) ** 2 for b in bs)
            fits.append((my - slope * mb, slope))
        if fits:
            print(f"| {n} | {state} | {st.median(f[0] for f in fits):.2f} | {st.median(f[1] for f in fits):.2f} |")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("matplotlib missing: see this script's docstring")

fig, axes = plt.subplots(1, 4, figsize=(20, 5.6))
marks = {"importance": "o-", "random": "s--", "token": "^-."}
for n in sizes:
    for sel in sels:
        xs = [b for b in budgets if pick(n, sel, b)]
        pruned = [b for b in xs if b < 1.0]  # at 100% the KL is exactly 0: off a log axis
        axes[0].plot([100 * b for b in pruned], [mean([r["kl"] for r in pick(n, sel, b)]) for b in pruned],
                     marks[sel], label=f"{sel}, {n} tok")
        axes[1].plot([100 * b for b in xs], [mean([r["gen_agree"] for r in pick(n, sel, b)]) for b in xs],
                     marks[sel], label=f"{sel}, {n} tok")
    for state in ["warm", "cold"]:
        for mode, style in [("prefetch", "o-"), ("off", "x:")]:
            pts = ratios[(state, n, mode)] + [(1.0, 1.0)]
            axes[2].plot([100 * b for b, _ in pts], [r for _, r in pts], style,
                         label=f"{n} tok, {state}, {'prefetch' if mode == 'prefetch' else 'no prefetch'}")
axes[0].set(xlabel="budget (% of groups per layer)", ylabel="first-token KL vs full reuse",
            yscale="log", title="first-token KL (lower is better; 0 at 100%)")
axes[1].set(xlabel="budget (% of groups per layer)", ylabel="share of 32 greedy tokens equal",
            ylim=(0, 1.05), title="32-token greedy agreement")
axes[2].axhline(0.35, color="grey", lw=0.8, ls="--")
axes[2].set(xlabel="budget (% of groups per layer)", ylabel="re-prefill time / faster full reuse",
            title=f"pruned re-prefill time, {headline}-token suffix")
for (n, state), pts in sorted(by_suffix.items()):
    line, = axes[3].plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                         label=f"{n} tok, {state}: 20% pruned")
    axes[3].plot([p[0] for p in pts], [p[2] for p in pts], "x:", color=line.get_color(),
                 label=f"{n} tok, {state}: suffix alone (floor)")
axes[3].axhline(0.35, color="grey", lw=0.8, ls="--")
axes[3].set(xlabel="suffix tokens", ylabel="time / faster full reuse", xscale="log",
            title="20% budget by suffix length (goal 0.35)")
axes[3].set_xticks(suffixes, [str(x) for x in suffixes])
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
# eight lines over three points: the legend goes under the panel, off its points
axes[3].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
fig.suptitle("SmolLM2-135M, ContiguousKV-style pruned re-prefill (scripts/bench-ckv)")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"\nplot: {out}", file=sys.stderr)
