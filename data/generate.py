#!/usr/bin/env python3
"""Writes data/long_prompt.txt: a deterministic, English-like text (not a copy of any book).

Sentences are assembled from small word lists with a fixed-seed PRNG, so the file is the same
on every machine and carries no third-party copyright. Run: python3 data/generate.py
"""
import os
import random

rng = random.Random(7)
subjects = ["the engineer", "a small team", "the old librarian", "our neighbour", "the river pilot",
            "a quiet student", "the village baker", "the night guard", "a travelling merchant",
            "the harbour master", "the young doctor", "a careful gardener"]
verbs = ["carried", "studied", "repaired", "described", "measured", "painted", "followed",
         "remembered", "opened", "counted", "returned", "explained"]
objects = ["the broken clock", "a map of the northern coast", "the letters from the mill",
           "a basket of winter apples", "the long bridge", "an unfinished song", "the lamp by the door",
           "the ledger of the market", "a box of copper nails", "the path through the forest",
           "the notes about the weather", "a story about the lighthouse"]
places = ["before dawn", "in the late afternoon", "after the storm", "during the harvest",
          "near the station", "behind the school", "on the hill above the town", "by the canal",
          "in the narrow street", "at the edge of the field"]
links = ["Later,", "Meanwhile,", "After a while,", "Even so,", "In the end,", "That evening,",
         "Before long,", "For a moment,"]
thoughts = ["nobody was sure why it mattered", "the work seemed slower than usual",
            "everyone agreed it was worth the trouble", "the wind changed direction twice",
            "the price of bread rose again", "a bell rang somewhere in the distance",
            "the answer was simpler than expected", "the numbers did not quite add up"]

paras = []
for p in range(90):
    sents = []
    for s in range(rng.randint(4, 7)):
        sent = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(places)}"
        if rng.random() < 0.5:
            sent = f"{rng.choice(links)} {sent}, and {rng.choice(thoughts)}"
        sents.append(sent[0].upper() + sent[1:] + ".")
    paras.append(" ".join(sents))
text = "\n\n".join(paras) + "\n"
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "long_prompt.txt")
with open(out, "w") as f:
    f.write(text)
print(out, len(text.split()), "words")
