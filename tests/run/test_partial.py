"""Partial evaluation: nodes that do not depend on the target ids are computed once."""

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.ir.graph import independent_of


@pytest.fixture(scope="module")
def tiny():
    g = qf.trace(qf.load_model("tiny"))
    return g, qf.init_params(g, seed=3)


def test_the_encoder_and_cross_attention_keys_and_values_do_not_depend_on_the_target(tiny):
    g, _ = tiny
    fixed = independent_of(g, ["tgt_ids"])
    encoder = {n for n in g if g.nodes[n]["stream"] == "encoder"}
    assert encoder and encoder <= fixed
    for layer in range(2):
        cross = f"decoder.layers.{layer}.cross_attn"
        assert {f"{cross}.k_proj", f"{cross}.v_proj"} <= fixed
        assert f"{cross}.q_proj" not in fixed and f"decoder.layers.{layer}.self_attn.k_proj" not in fixed
    assert "masks.src_keep" in fixed and "masks.causal" not in fixed and "decoder.unembed" not in fixed
    assert independent_of(g, ["src_ids", "tgt_ids"]) == set()


def test_values_given_before_are_taken_and_give_the_same_logits(tiny):
    g, params = tiny
    src = np.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]])
    first = qf.forward(g, params, src, np.array([[1, 14, 15], [1, 16, 0]]), capture=True)
    fixed = independent_of(g, ["tgt_ids"])
    cache = {n: first["activations"][n] for n in fixed if g.nodes[n]["op"] != "input"}
    tgt = np.array([[1, 17, 18, 19], [1, 20, 21, 0]])  # another target, another length
    again = qf.forward(g, params, src, tgt, initial=cache)["logits"]
    assert np.array_equal(again, qf.forward(g, params, src, tgt)["logits"])
    # the given values are taken, not recomputed: other values where the cache meets the
    # rest of the graph (the cross-attention K and V heads) give other logits
    edge = [n for n in cache if cache[n].dtype.kind == "f" and any(s not in cache for s in g.successors(n))]
    assert edge and all(".cross_attn." in n for n in edge)
    moved = qf.forward(g, params, src, tgt, initial={**cache, **{n: cache[n] + 1.0 for n in edge}})["logits"]
    assert not np.allclose(moved, again)


def test_given_values_are_checked(tiny):
    g, params = tiny
    src, tgt = np.array([[5, 6, 7]]), np.array([[1, 8]])
    with pytest.raises(qf.QkvflowError, match="not a computed node"):
        qf.forward(g, params, src, tgt, initial={"no.such.node": np.zeros(3)})
    with pytest.raises(qf.QkvflowError, match="encoder.layers.0.norm1"):
        qf.forward(g, params, src, tgt, initial={"encoder.layers.0.norm1": np.zeros((1, 4, 21))})
    with pytest.raises(qf.QkvflowError, match="no input 'ids'"):
        independent_of(g, ["ids"])


def test_a_mask_sized_by_the_target_changes_with_it():
    """np.tril(np.ones((T, T))) reads no target id, but its size is the target's: not fixed."""
    from jaxtyping import Bool, Float
    from qkvflow.models.encoder_decoder import build, multi_head_attention

    @qf.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
    def tril_self_attention(y: Float[np.ndarray, "batch tgt d_model"], causal: Bool[np.ndarray, "tgt tgt"],
                            tgt_keep: Bool[np.ndarray, "batch tgt"]) -> Float[np.ndarray, "batch tgt d_model"]:
        T = y.shape[1]
        mine = np.tril(np.ones((T, T), dtype=bool))                      # (tgt, tgt), from no input
        return multi_head_attention(y, y, mine[None, None] & tgt_keep[:, None, None, :])

    g = qf.trace(build(qf.preset("tiny"), decoder_self=tril_self_attention))
    fixed = independent_of(g, ["tgt_ids"])
    fills = [n for n in g if g.nodes[n]["op"] == "fill"]
    assert fills and not set(fills) & fixed
    params = qf.init_params(g, seed=1)
    src = np.array([[5, 6, 7, 8]])
    out = qf.generate(g, params, src, max_new_tokens=5)  # the encoder once, the masks at every length
    assert out.cached and np.array_equal(out.ids, qf.generate(g, params, src, max_new_tokens=5, cache=False).ids)


def test_non_finite_weights_are_found_however_large_the_finite_ones():
    from qkvflow.run.params import all_finite
    assert all_finite(np.ones((3, 4))) and all_finite(np.zeros((0, 3))) and all_finite(np.array([1e200, -1e200]))
    for bad in (np.nan, np.inf, -np.inf):
        for big in (1.0, 1e200):
            assert not all_finite(np.array([big, bad, 2.0])), (big, bad)
    assert not all_finite(np.asfortranarray(np.array([[1.0, 2.0], [np.nan, 3.0]], dtype=np.float32)))
