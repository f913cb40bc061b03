"""One vLLM engine in this (fresh) process: runs prompts one after the other and writes what a
test or benchmark checks, as JSON. Used by test_vllm.py and scripts/bench-vllm.

    python vllm_engine.py --model DIR --text FILE --prompt 0:1100 [--prompt 0:825,9000:275]
        [--kv JSON] [--max-tokens 32] [--no-prefix-caching] [--drop-caches] --out OUT.json

A prompt is a comma-separated list of START:LEN slices of the text's token ids (the model's
tokenizer), so two prompts can share an exact prefix; a prompt may be given several times
(each is a separate timed request). `--kv` is the kv_transfer_config. OUT.json is rewritten
after every request, so when the engine dies the requests before it are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--prompt", action="append", required=True)
    ap.add_argument("--kv")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument(
        "--warmup",
        action="store_true",
        help="first serve a 64-token prompt from the text's end (below one block: with a kvfs "
        "connector only its own partial chunk is stored or loaded), so one-time costs stay out "
        "of the timed requests",
    )
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="sync and drop the page cache before each timed request (needs root)",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = {}
    if args.kv:
        kw["kv_transfer_config"] = KVTransferConfig(**json.loads(args.kv))
    t0 = time.monotonic()
    llm = LLM(
        model=args.model,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=args.max_model_len,
        seed=0,
        enable_prefix_caching=not args.no_prefix_caching,
        **kw,
    )
    start_s = time.monotonic() - t0
    with open(args.text, encoding="utf-8") as f:
        ids = llm.get_tokenizer().encode(f.read(), add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=1, seed=0)
    if args.warmup:
        llm.generate([TokensPrompt(prompt_token_ids=ids[-64:])], params, use_tqdm=False)
    results = []
    for spec in args.prompt:
        prompt: list[int] = []
        for part in spec.split(","):
            s, n = (int(x) for x in part.split(":"))
            if s + n > len(ids):
                raise SystemExit(f"the text has {len(ids)} tokens; {part} reaches past them")
            prompt += ids[s : s + n]
        if args.drop_caches:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        t = time.monotonic()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        seconds = time.monotonic() - t
        c = out.outputs[0]
        first = c.logprobs[0] if c.logprobs else {}
        results.append(
            {
                "prompt": spec,
                "prompt_tokens": len(prompt),
                "tokens": list(c.token_ids),
                "num_cached_tokens": out.num_cached_tokens,
                # the chosen first token's logprob
                "first_logprob": first[c.token_ids[0]].logprob if first else None,
                "seconds": seconds,
            }
        )
        with open(args.out + ".tmp", "w") as f:
            json.dump({"start_s": start_s, "results": results}, f)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
