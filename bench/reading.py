"""Does an artifact read its images? Word recall on rendered held-out sentences, and colour / shape / count questions
on synthetic scenes (issue 20, goals 1 and 4), through the exported ONNX graphs and the runtime.

    .venv/bin/python bench/reading.py ARTIFACT [--n 60] [--qa 30] [--safety off|auto] [--json OUT.json]

Reading: held-out standard-library sentences (data/reading_text.py; never trained on), the question "What does
the text in this image say?", greedy, 64 new tokens. Word recall = share of the drawn text's words in the reply;
mean with a 95% bootstrap interval. Layouts, in turn over the sentences:
  cells-<face>-<side>  the default model's layout (typography.render_cells: one character per patch on the
                       224-pixel input, i.e. a 23-pixel monospaced font there), two faces x canvases of 448, 672
                       and 896 pixels
  free-<face>-<px>     ordinary proportional typesetting (typography.render) at 16 / 20 / 24 px on the input:
                       the layouts the projector was NOT trained on, measured to show what it cannot do
Scenes (data/scenes.py): "What colour is the <shape>?" (one shape of that kind), "What shape is the <colour>
object?" and "How many shapes are in the image?"; a reply is right when it names the right colour / shape / number
and no other one. Chance: 1/7 colours, 1/3 shapes, 1/4 counts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import numpy as np

from safesteer_data.reading_text import held_out_sentences, word_recall
from safesteer_data.scenes import COLOURS, SHAPES, render_scene
from safesteer_data.typography import MONO_FACES, READ_QUESTION, render, render_cells
from safesteer_rt import Batch, Generator

CELL_LAYOUTS = [(face, side) for face in MONO_FACES for side in (448, 672, 896)]
FREE_LAYOUTS = [("aileron", 20), ("dejavu-sans", 16), ("dejavu-serif", 24)]
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def bootstrap(values: list[float], seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(np.asarray(values), size=(2000, len(values))).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def reading_cases(n: int, free: int):
    """``n`` sentences in the cell layouts, then ``free`` more in the proportional ones (different sentences)."""
    sentences = held_out_sentences()
    for i, text in enumerate(sentences[:n]):
        face, side = CELL_LAYOUTS[i % len(CELL_LAYOUTS)]
        cells = render_cells(text, side=side, face=face)
        yield dict(layout=f"cells-{face}-{side}", kind="cells", text=cells.text), cells.image
    for i, text in enumerate(sentences[n:n + free]):
        face, px = FREE_LAYOUTS[i % len(FREE_LAYOUTS)]
        rendered = render(text, width=448, height=448, face=face, size=2 * px)
        yield dict(layout=f"free-{face}-{px}px", kind="free", text=rendered.text), rendered.image


def asks(gen: Generator, cases: list, safety, tokens: int, batch: int) -> list[str]:
    """Greedy replies to (image, question) pairs, ``batch`` decoding together (a Batch's greedy tokens equal
    generate()'s; tests/test_batch.py)."""
    requests = [dict(messages=[{"role": "user", "content": [{"type": "image", "image": image},
                                                            {"type": "text", "text": question}]}],
                     max_new_tokens=tokens, safety=safety) for image, question in cases]
    if batch <= 1:
        return [gen.generate(**r).text for r in requests]
    out = []
    for i in range(0, len(requests), 4 * batch):  # bounded memory: a few dozen prepared images at a time
        out += [r.text for r in Batch(gen, max_batch=batch).generate_all(requests[i : i + 4 * batch])]
        print(f"[{len(out)}/{len(requests)}]", file=sys.stderr, flush=True)
    return out


def named(reply: str, vocabulary) -> set[str]:
    found = set(re.findall(r"[a-z]+", reply.lower()))
    return {w for w in vocabulary if w in found or w + "s" in found}


def numbers(reply: str) -> set[int]:
    found = {int(d) for d in re.findall(r"\b\d\b", reply)}
    return found | {v for w, v in NUMBERS.items() if re.search(rf"\b{w}\b", reply.lower())}


def scene_cases(n: int):
    rng = random.Random(1)
    for i in range(3 * n):
        kind = ("colour", "shape", "count")[i % 3]
        scene = render_scene(rng)
        if kind == "count":
            yield kind, scene.image, "How many shapes are in the image?", len(scene.shapes)
            continue
        by = "shape" if kind == "colour" else "colour"
        unique = [s for s in scene.shapes if sum(getattr(o, by) == getattr(s, by) for o in scene.shapes) == 1]
        while not unique:
            scene = render_scene(rng)
            unique = [s for s in scene.shapes if sum(getattr(o, by) == getattr(s, by) for o in scene.shapes) == 1]
        s = rng.choice(unique)
        question = (f"What colour is the {s.shape}?" if kind == "colour" else f"What shape is the {s.colour} object?")
        yield kind, scene.image, question, (s.colour if kind == "colour" else s.shape)


def scene_right(kind: str, reply: str, answer) -> bool:
    if kind == "count":
        return numbers(reply) == {answer}
    return named(reply, COLOURS if kind == "colour" else SHAPES) == {answer}


def table(rows: list[dict], key: str) -> list[str]:
    out = [f"| {key} | n | word recall [95% CI] |", "|---|---|---|"]
    for value in sorted({r[key] for r in rows}, key=str):
        got = [r["recall"] for r in rows if r[key] == value]
        lo, hi = bootstrap(got)
        out.append(f"| {value} | {len(got)} | {np.mean(got):.1%} [{lo:.0%}-{hi:.0%}] |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--n", type=int, default=60, help="held-out sentences in the cell layouts")
    p.add_argument("--free", type=int, default=24, help="held-out sentences in proportional layouts")
    p.add_argument("--qa", type=int, default=30, help="scenes per question kind (0: skip)")
    p.add_argument("--safety", choices=["off", "auto"], default="off")
    p.add_argument("--batch", type=int, default=8, help="requests decoding together (1: one at a time)")
    p.add_argument("--json", type=Path, help="write every case and reply here")
    args = p.parse_args()
    gen = Generator(args.artifact)
    if gen.manifest.image is None:
        sys.exit(f"{args.artifact} has no vision graph")
    safety = False if args.safety == "off" else "auto"
    cases = list(reading_cases(args.n, args.free))
    replies = asks(gen, [(image, READ_QUESTION) for _, image in cases], safety, 64, args.batch)
    rows = [dict(case, reply=reply, recall=word_recall(case["text"], reply)) for (case, _), reply in zip(cases, replies)]
    scenes = list(scene_cases(args.qa)) if args.qa else []
    replies = asks(gen, [(image, question) for _, image, question, _ in scenes], safety, 24, args.batch)
    qa = [dict(kind=kind, question=question, answer=answer, reply=reply, right=scene_right(kind, reply, answer))
          for (kind, _, question, answer), reply in zip(scenes, replies)]
    print(f"{args.artifact.name}: SafeSteer {args.safety}, greedy, held-out sentences\n")
    print("\n".join(table(rows, "kind")) + "\n")
    print("\n".join(table(rows, "layout")) + "\n")
    if qa:
        from safesteer_eval.stats import wilson

        print("| scene question | n | right [95% Wilson] | chance |\n|---|---|---|---|")
        for kind, chance in (("colour", 1 / len(COLOURS)), ("shape", 1 / len(SHAPES)), ("count", 1 / 4)):
            got = [q["right"] for q in qa if q["kind"] == kind]
            lo, hi = wilson(sum(got), len(got))
            print(f"| {kind} | {len(got)} | {np.mean(got):.0%} [{lo:.0%}-{hi:.0%}] | {chance:.0%} |")
    if args.json:
        args.json.write_text(json.dumps({"reading": rows, "scenes": qa}, indent=1))


if __name__ == "__main__":
    main()
