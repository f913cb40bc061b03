#!/usr/bin/env python3
"""Builds the retrieval-style prompt set of scripts/bench-blend from real English text.

Source: the Python language reference topics that Debian's libpython3.11-stdlib ships
(/usr/lib/python3.11/pydoc_data/topics.py: a dict of 79 topics, ~465 KB of prose), read at run
time and never copied into the repository. Documents are runs of consecutive paragraphs of one
topic (grammar and code blocks dropped), cut at about 150 words. Every candidate is counted
with the SmolLM2 tokenizer itself, framed as the benchmark frames it (`blend count`, the
example's tokenizer from the GGUF), and only documents of 200..=600 tokens are kept; a seeded
pool of 48 of those makes the prompts, so every prompt's every document is in range. Each prompt
puts 3-6 documents of different topics in a shuffled order; its question quotes one sentence
of one document (the target) and asks for the sentence that follows it there, so the answer
is in exactly one document and the reference answer is that next sentence.

Output (stdout), one record per line, tab-separated, text with backslash and newline escaped:
  D <doc id> <topic> <text>          a document of the pool
  P <prompt id> <target doc> <doc ids comma-separated, in prompt order> <question> <answer>
Usage: scripts/blend-dataset.py BLEND_BIN [PROMPTS] [SEED]   (defaults 30, 13)
  BLEND_BIN: the built example (target/release/examples/blend), run as `BLEND_BIN count`.
"""

import importlib.util
import random
import re
import subprocess
import sys

TOPICS = "/usr/lib/python3.11/pydoc_data/topics.py"


def load_topics():
    spec = importlib.util.spec_from_file_location("topics", TOPICS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.topics


def prose_paragraphs(text):
    """Paragraphs of running text: no indented blocks (grammar, code), no headings."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(l.startswith((" ", "\t")) for l in lines if l.strip()):
            continue
        if all(set(l.strip()) <= set("*=-~^") for l in lines[1:] if l.strip()) and len(lines) <= 2:
            continue
        para = " ".join(l.strip() for l in lines if l.strip())
        if len(para.split()) >= 12 and not re.fullmatch(r"[*=\-~^ ]+", para):
            out.append(para)
    return out


MIN_TOKENS, MAX_TOKENS = 200, 600


def documents(topics):
    """Candidates: runs of paragraphs of one topic, cut once they reach 150 words."""
    docs = []
    for name in sorted(topics):
        cur = []
        for para in prose_paragraphs(topics[name]):
            cur.append(para)
            if sum(len(p.split()) for p in cur) >= 150:
                docs.append((name, "\n\n".join(cur)))
                cur = []
    return docs


def token_counts(blend_bin, texts):
    """SmolLM2 token count of each text framed as a document (`blend count`)."""
    out = subprocess.run(
        [blend_bin, "count"],
        input="".join(esc(t) + "\n" for t in texts),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if len(out) != len(texts):
        sys.exit(f"blend count gave {len(out)} counts for {len(texts)} texts")
    return [int(x) for x in out]


def sentences(text):
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text) if s.strip()]


def question_of(doc, rng):
    ss = sentences(doc)
    pairs = [
        (a, b)
        for a, b in zip(ss, ss[1:])
        if 8 <= len(a.split()) <= 40 and 6 <= len(b.split()) <= 40
    ]
    if not pairs:
        return None
    return rng.choice(pairs)


def esc(s):
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", " ")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    blend_bin = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 13
    rng = random.Random(seed)
    candidates = documents(load_topics())
    counts = token_counts(blend_bin, [text for _, text in candidates])
    docs = [d for d, c in zip(candidates, counts) if MIN_TOKENS <= c <= MAX_TOKENS]
    print(
        f"{len(docs)} of {len(candidates)} candidate documents have "
        f"{MIN_TOKENS}..={MAX_TOKENS} tokens",
        file=sys.stderr,
    )
    # A pool of 48 documents keeps the one-off cost of storing them (each chunk prefilled
    # alone) to about a minute; prompts draw all their documents from it.
    pool = sorted(rng.sample(range(len(docs)), min(48, len(docs))))
    docs = [docs[i] for i in pool]
    for i, (topic, text) in enumerate(docs):
        print(f"D\t{i}\t{topic}\t{esc(text)}")
    targets = list(range(len(docs)))
    rng.shuffle(targets)
    made = 0
    for t in targets:
        if made == n:
            break
        qa = question_of(docs[t][1], rng)
        if qa is None:
            continue
        others = [i for i in range(len(docs)) if docs[i][0] != docs[t][0]]
        k = rng.randint(2, 5)
        chosen = rng.sample(others, k) + [t]
        rng.shuffle(chosen)
        q = (
            "In the documents above, which sentence comes right after this one: "
            f"\"{qa[0]}\" Reply with that sentence only."
        )
        print(f"P\t{made}\t{t}\t{','.join(map(str, chosen))}\t{esc(q)}\t{esc(qa[1])}")
        made += 1
    if made < n:
        sys.exit(f"only {made} prompts could be built")


if __name__ == "__main__":
    main()
