#!/usr/bin/env python3
"""Table and plot of a scripts/bench-blend run (JSON lines from `blend bench`).

Prints the markdown tables of docs/BENCHMARKS.md ("Blending") and writes docs/blend.png:
quality against the share of document tokens recomputed (left: mean first-token KL to the full
prefill, log scale; middle: first-token and 32-token agreement) and TTFT relative to the full
prefill at each size (right). Needs matplotlib, which the vLLM venv lacks: make a venv of your
own (`python3 -m venv ~/.cache/kvfs/plot-venv && ~/.cache/kvfs/plot-venv/bin/pip install
matplotlib`) and run this script
with its python. Usage: plot-blend.py RESULTS.jsonl [OUT.png]   (prompts appearing twice count once)
"""

import json
import statistics as st
import sys
from collections import defaultdict


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    png = sys.argv[2] if len(sys.argv) > 2 else "docs/blend.png"
    q = defaultdict(list)
    seen = set()
    for r in rows:
        # A prompt measured twice (the set split over processes) counts once, first run kept.
        if r["kind"] == "quality" and (r["prompt"], r["method"]) not in seen:
            seen.add((r["prompt"], r["method"]))
            q[r["method"]].append(r)
    order = sorted(q, key=lambda m: -q[m][0]["ratio"])
    n = len(q["full"])
    print(f"Quality, {n} prompts (reference: full prefill)\n")
    print("| method | recomputed | mean KL | median KL | top-1 same | 32 tokens identical | mean same-prefix of 32 | answer log-lik. (nats/token) | TTFT / full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for m in order:
        rs = q[m]
        kl = [r["kl"] for r in rs]
        s = {
            "ratio": rs[0]["ratio"],
            "share": st.mean(r["share"] for r in rs),
            "kl": st.mean(kl),
            "kl_med": st.median(kl),
            "top1": sum(r["top1_same"] for r in rs) / len(rs),
            "ident": sum(r["greedy_identical"] for r in rs) / len(rs),
            "prefix": st.mean(r["greedy_same_prefix"] for r in rs),
            "ll": sum(r["answer_ll"] for r in rs) / sum(r["answer_tokens"] for r in rs),
            "ttft": st.median(r["ttft_ratio"] for r in rs),
        }
        summary[m] = s
        print(
            f"| {m} | {100 * s['share']:.1f}% | {s['kl']:.4f} | {s['kl_med']:.4f} | {100 * s['top1']:.0f}% "
            f"| {100 * s['ident']:.0f}% | {s['prefix']:.1f} | {s['ll']:.3f} | {s['ttft']:.2f} |"
        )
    if "naive" in summary:
        print()
        for m in order:
            if m.startswith(("blend", "lmcache")):
                print(f"- naive reuse's mean KL / {m}'s: {summary['naive']['kl'] / summary[m]['kl']:.1f}x")
    t = defaultdict(list)
    for r in rows:
        if r["kind"] == "ttft":
            t[(r["size"], r["method"])].append(r)
    sizes = sorted({k[0] for k in t})
    if sizes:
        print("\nTTFT at fixed sizes (best of the repetitions; ratio to the full prefill's best)\n")
        print("| tokens | method | recomputed | TTFT (s) | all runs (s) | ratio |")
        print("|---:|---|---:|---:|---|---:|")
    ttft = {}
    for size in sizes:
        full = min(r["ttft_s"] for r in t[(size, "full")])
        for m in order:
            rs = t.get((size, m))
            if not rs:
                continue
            best = min(r["ttft_s"] for r in rs)
            ttft[(size, m)] = best / full
            runs = ", ".join(f"{r['ttft_s']:.2f}" for r in rs)
            print(f"| {size} | {m} | {100 * rs[0]['share']:.1f}% | {best:.2f} | {runs} | {best / full:.2f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The curve: blending with the defaults at each ratio, and naive reuse (0%); LMCache's
    # choice (the baseline) as separate points.
    blends = [m for m in order if m not in ("full",) and not m.startswith("lmcache")]
    baseline = [m for m in order if m.startswith("lmcache")]
    xs = [100 * summary[m]["share"] for m in blends]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    ax[0].plot(xs, [summary[m]["kl"] for m in blends], "o-", label="kvfs blend (defaults)")
    if baseline:
        ax[0].plot(
            [100 * summary[m]["share"] for m in baseline],
            [summary[m]["kl"] for m in baseline],
            "x",
            ms=9,
            label="LMCache's choice",
        )
        ax[0].legend(fontsize=8)
    for m in blends + baseline:
        x = 100 * summary[m]["share"]
        ax[0].annotate(m, (x, summary[m]["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("document tokens recomputed (%)")
    ax[0].set_ylabel("mean first-token KL to full prefill (nats)")
    ax[0].set_title("Divergence from the full prefill")
    ax[1].plot(xs, [100 * summary[m]["top1"] for m in blends], "o-", label="first token same")
    ax[1].plot(xs, [100 * summary[m]["ident"] for m in blends], "s-", label="32 greedy tokens identical")
    ax[1].axhline(95, color="grey", ls=":", lw=1, label="goal at 15%: 95%")
    ax[1].set_xlabel("document tokens recomputed (%)")
    ax[1].set_ylabel(f"prompts (%, of {n})")
    ax[1].set_ylim(0, 105)
    ax[1].legend(fontsize=8)
    ax[1].set_title("Agreement with the full prefill")
    for size in sizes:
        ms = [m for m in blends if (size, m) in ttft]
        ax[2].plot([100 * summary[m]["share"] for m in ms], [ttft[(size, m)] for m in ms], "o-", label=f"{size} tokens")
    ax[2].axhline(1.0, color="black", lw=1, label="full prefill")
    ax[2].axhline(0.45, color="grey", ls=":", lw=1, label="goal at 15%: 0.45")
    ax[2].set_xlabel("document tokens recomputed (%)")
    ax[2].set_ylabel("TTFT / full prefill TTFT")
    ax[2].set_ylim(0, 1.1)
    ax[2].legend(fontsize=8)
    ax[2].set_title("Time to first token")
    fig.suptitle("CacheBlend on SmolLM2-135M (CPU, f32), Python reference topics, kvfs independent chunks")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
