"""K candidate rows fed at one position under a tree mask == K separate single-token steps."""

from __future__ import annotations

import numpy as np
import pytest

from safesteer_runtime.masks import causal_mask, tree_mask
from safesteer_rt import Generator


@pytest.mark.parametrize("block_size", [1, 0])
def test_tree_rows_equal_separate_steps(tiny, block_size):
    gen = Generator(tiny.artifact("LlamaForCausalLM", "gqa", block_size))
    engine = gen.engine
    prompt = gen.codec.encode("The quick brown fox", add_bos=True)
    candidates = [17, 42, 99, 150, 201]
    k = len(candidates)

    cache = engine.new_cache(len(prompt) + k)
    engine.step(cache, causal_mask(0, len(prompt)), np.arange(len(prompt))[None], ids=np.array([prompt]))
    cache.advance(len(prompt))
    t = cache.length
    positions = np.full((1, k), t, dtype=np.int64)
    tree_logits = engine.step(cache, tree_mask(t, k), positions, ids=np.array([candidates]),
                              head_rows=np.arange(k)).logits[0]
    tree_keys, tree_values = cache.stored(t, t + k)

    for row, token in enumerate(candidates):
        single = engine.step(cache, causal_mask(t, 1), np.array([[t]]), ids=np.array([[token]]))  # overwrites slot t
        np.testing.assert_allclose(tree_logits[row], single.logits[0, 0], atol=1e-5, rtol=1e-5)
        keys, values = cache.stored(t, t + 1)
        np.testing.assert_allclose(tree_keys[:, :, row], keys[:, :, 0], atol=1e-5)
        np.testing.assert_allclose(tree_values[:, :, row], values[:, :, 0], atol=1e-5)
    # and the rows did differ, so the check above compared distinct computations
    assert np.max(np.abs(tree_logits[0] - tree_logits[1])) > 1e-3


def test_tree_mask_shape_and_blocking():
    mask = tree_mask(3, 4)
    assert mask.shape == (1, 1, 4, 7)
    assert np.all(mask[0, 0, :, :3] == 0)
    assert np.all(np.diag(mask[0, 0, :, 3:]) == 0)
    off = mask[0, 0, :, 3:][~np.eye(4, dtype=bool)]
    assert np.all(off == np.finfo(np.float32).min)


def test_windowed_mask_blocks_keys_a_window_behind():
    """Hugging Face's sliding rule: a key is visible when its position > the query's - window; the call's own rows
    (here: lookahead candidates, all at position 5) keep their tree structure."""
    from safesteer_runtime.masks import windowed

    blocked = np.finfo(np.float32).min
    mask = windowed(causal_mask(4, 2), np.array([[4, 5]]), window=3)
    assert (mask[0, 0] == blocked).tolist() == [[True, True, False, False, False, True],
                                                 [True, True, True, False, False, False]]
    tree = windowed(tree_mask(5, 2), np.array([[5, 5]]), window=2)
    assert (tree[0, 0] == blocked).tolist() == [[True, True, True, True, False, False, True],
                                                 [True, True, True, True, False, True, False]]
