#!/usr/bin/env python
"""Build the shipped zero-shot task `wiki-next-sentence` from held-out Wikipedia lead paragraphs, so
there is a zero-shot accuracy without any hub:

  python tools/make_zeroshot_task.py HELDOUT.txt OUT.jsonl [--items 200 --choices 4 --seed 0]

With the defaults and the demo's held-out text (tools/make_demo.py, which runs this too) it writes
streamresize/tasks/wiki-next-sentence.jsonl byte for byte.

Each item: the first sentence of an article as context; choices: its true second sentence and
sentences from other articles of similar length (so that length alone gives no hint). Records are
`{"context": ..., "choices": [...], "label": i}`, the format `streamresize eval --tasks` reads.
Deterministic for a given input and seed. The text is Wikipedia's (CC BY-SA 4.0).
"""

import argparse
import json
import os
import random
import re

# A period after one of these (or after a single capital letter, an initial) does not end a sentence.
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "no", "vs", "inc", "ltd", "co", "corp", "mt",
                 "ft", "gen", "col", "lt", "sgt", "rev", "prof", "c", "ca", "approx", "est", "u.s", "u.k"}
BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def split_sentences(text):
    pieces, sentences = BOUNDARY.split(text), []
    for piece in pieces:
        last_word = sentences[-1].rsplit(None, 1)[-1].rstrip(".").lower() if sentences else ""
        if sentences and (last_word in ABBREVIATIONS or re.fullmatch(r"[a-z]", last_word)):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return [s.strip() for s in sentences if s.strip()]


def build_items(articles, items, choices, seed, min_chars=40, max_chars=120, max_context_chars=200,
                length_tolerance=0.25):
    """Items from articles whose first two sentences are of moderate length (short items keep the task
    quick on a CPU); distractors are non-first sentences of other articles within `length_tolerance`
    of the answer's length."""
    split = [split_sentences(a) for a in articles]
    pool = [(i, s) for i, sentences in enumerate(split) for s in sentences[1:] if min_chars <= len(s) <= max_chars]
    candidates = [i for i, s in enumerate(split)
                  if len(s) >= 2 and min_chars <= len(s[0]) <= max_context_chars and min_chars <= len(s[1]) <= max_chars]
    rng = random.Random(seed)
    rng.shuffle(candidates)
    records = []
    for i in candidates:
        answer = split[i][1]
        near = [s for j, s in pool if j != i and abs(len(s) - len(answer)) <= length_tolerance * len(answer)]
        distractors = list(dict.fromkeys(near))  # unique, in a deterministic order
        if len(distractors) < choices - 1:
            continue
        options = rng.sample(distractors, choices - 1)
        label = rng.randrange(choices)
        options.insert(label, answer)
        records.append({"context": split[i][0], "choices": options, "label": label})
        if len(records) == items:
            break
    return records


def read_articles(path):
    with open(path, encoding="utf-8") as f:
        return [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]


def write_task(heldout, out, items=200, choices=4, seed=0):
    records = build_items(read_articles(heldout), items, choices, seed)
    if len(records) < items:
        raise SystemExit(f"{heldout}: only {len(records)} items could be built, {items} asked")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heldout", help="held-out text, articles separated by blank lines (tools/make_demo.py)")
    p.add_argument("out", help="output .jsonl")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write_task(args.heldout, args.out, args.items, args.choices, args.seed))


if __name__ == "__main__":
    main()
