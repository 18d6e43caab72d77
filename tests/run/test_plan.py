"""The plain forward's plan: the projections of one input stacked into one product, and
kernels writing into inputs read for the last time. None of it may change a number: every
run is compared bit for bit with the step-by-step run (``capture=True``), which does none
of it."""

import math

import networkx as nx
import numpy as np
import pytest

import attention_styles
import qkvflow as qf
from qkvflow import nn
from qkvflow.ir.graph import param_path, position_limit, vocabulary_of
from qkvflow.ir.ops import spec
from qkvflow.run.plan import STACKED, fast_plan

PRESETS = ["tiny", "bart-tiny", "t5-tiny", "marian-tiny", "gpt2-tiny", "llama-tiny", "bert-tiny", "toy-en-zh"]


def feeds_for(g, rows: int = 70, seed: int = 0) -> dict:
    """Token ids for every input without a default: a different length per sequence dim, a
    batch making at least ``rows`` tokens (so the projections are stacked), pads at the end."""
    rng = np.random.default_rng(seed)
    limit = position_limit(g) or 64
    lengths = dict(zip(sorted(g.graph["sequences"]), (min(limit, 13), min(limit, 11), min(limit, 9))))
    batch = math.ceil(rows / min(lengths.values()))
    feeds = {}
    for node in g.graph["inputs"]:
        attrs = g.nodes[node]["attrs"]
        if "default" in attrs:
            continue
        ids = rng.integers(3, vocabulary_of(g, node), size=(batch, lengths[attrs["shape"][-1]]))
        ids[1, -2:] = attrs.get("pad_id", 0)
        feeds[attrs["name"]] = ids
    return feeds


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if name == "activations":
            _same(value, b[name])
        else:
            np.testing.assert_array_equal(value, b[name], strict=True)


def _outputs(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "activations"}


def runs_agree(g, dtype: str, large: dict, small: dict) -> qf.Executor:
    """A run's numbers depend on its inputs alone: not on what ran before (a run of 64+
    tokens stacks the weights), nor on whether it keeps every value, writes in place, is
    given values computed before or computes some nodes only."""
    ex = qf.Executor(g, qf.init_params(g, seed=1, dtype=dtype), dtype=dtype)
    small_ref = ex.run(small)
    _same(_outputs(ex.run(small, capture=True)), small_ref)
    large_ref = ex.run(large, capture=True)
    for _ in range(2):
        _same(ex.run(large), _outputs(large_ref))
    _same(ex.run(large, capture=True), large_ref)
    _same(ex.run(small), small_ref)
    acts = large_ref["activations"]
    computed = [n for n in acts if n not in g.graph["inputs"]]
    given = {n: acts[n] for n in computed[:len(computed) // 3]}
    _same(ex.run(large, initial=given), _outputs(large_ref))
    last = computed[len(computed) // 2]
    wanted = nx.ancestors(g, last) | {last}
    got = ex.run(large, only=wanted)["activations"]
    _same({n: got[n] for n in wanted}, {n: acts[n] for n in wanted})
    return ex


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("preset", PRESETS)
def test_a_run_gives_the_same_numbers_whatever_ran_before_and_whatever_it_keeps(preset, dtype):
    g = qf.trace(qf.load_model(preset))
    assert runs_agree(g, dtype, feeds_for(g), feeds_for(g, rows=20, seed=1))._stacked


@pytest.mark.parametrize("style", ["a_triu", "a_bmm", "a_gqa", "a_cumsum"])
def test_models_in_other_numpy_styles_give_the_same_numbers(style):
    """Projections written as x @ W (matmul, not a linear op) are not stacked; the in-place
    kernels still apply."""
    g = qf.trace(attention_styles.make(getattr(attention_styles, style)))
    runs_agree(g, "float32", feeds_for(g), feeds_for(g, rows=20, seed=1))


def test_few_tokens_keep_the_weights_as_given():
    """Under 64 tokens a run is not worth copying the weights for: none are stacked."""
    g = qf.trace(qf.load_model("tiny"))
    params = qf.init_params(g, seed=0, dtype="float32")
    ex = qf.Executor(g, params, dtype="float32")
    feeds = feeds_for(g, rows=20)
    for _ in range(3):
        ex.run(feeds)
    assert not ex._stacked
    assert all(ex.params[k] is params[k] for k in params)


def test_q_k_v_of_one_input_are_one_product_and_the_members_view_it():
    g = qf.trace(qf.load_model("tiny"))
    plan, _, stacks = fast_plan(g, True)
    ops = {step[0]: step[1] for step in plan}
    block = "encoder.layers.0.self_attn"
    assert ops[f"{block}.q_proj{STACKED}"] == "linear"
    assert [ops[f"{block}.{p}_proj"] for p in "qkv"] == ["slice"] * 3
    # every decoder layer's cross-attention K and V read the memory: one product for all
    (memory,) = [st for st in stacks if st.node.startswith("decoder.layers.0.cross_attn.k_proj")]
    assert [m for m, _, _ in memory.members] == [f"decoder.layers.{i}.cross_attn.{p}_proj"
                                                 for i in range(2) for p in "kv"]
    params = qf.init_params(g, seed=0, dtype="float32")
    ex = qf.Executor(g, params, dtype="float32")
    feeds = feeds_for(g)
    ex.run(feeds)
    ex.run(feeds)
    stacked = ex.params[param_path(f"{block}.q_proj{STACKED}", "weight")]
    for p in "qkv":
        path = f"{block}.{p}_proj.weight"
        assert np.shares_memory(ex.params[path], stacked)
        np.testing.assert_array_equal(ex.params[path], params[path])
    assert stacked.shape == (3 * 21, 21) and stacked.flags.c_contiguous


DIMS = {"batch": None, "seq": None, "d_model": 12, "heads": 3, "d_head": 4, "vocab": 29}


def _aliased(donor):
    """A fresh value (a projection) read last by an op that may write into it, while a view
    of it (a reshape) is read after: writing into it would change the view's numbers."""
    def build():
        ids = nn.input("ids", ("batch", "seq"))
        x = nn.embed(ids)
        h = nn.linear(x, "d_model", name="proj")
        B, T, D = h.shape
        view = h.reshape(B, T, qf.dim("heads"), qf.dim("d_head"))
        y = donor(h)
        return {"out": nn.output(nn.add(y, view.reshape(B, T, D)), "out")}
    return qf.Model("aliased", DIMS, build, sequences={"seq": "bidirectional"})


def _relu(h):
    return np.maximum(h, 0)


def _norm(h):
    c = h - h.mean(axis=-1, keepdims=True)
    return c / np.sqrt((c * c).mean(axis=-1, keepdims=True) + 1e-5)


def _softmax(h):
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("donor, by_hand", [
    (lambda h: nn.activation(h, "relu"), _relu), (lambda h: nn.norm(h, name="norm"), _norm),
    (lambda h: nn.softmax(h), _softmax)], ids=["relu", "norm", "softmax"])
def test_a_value_still_seen_through_a_view_is_not_written_into(donor, by_hand):
    g = qf.trace(_aliased(donor))
    params = qf.init_params(g, seed=0)
    ids = np.random.default_rng(0).integers(0, 29, (7, 11))
    ex = qf.Executor(g, params)
    got = ex.run({"ids": ids})["out"]
    np.testing.assert_array_equal(got, ex.run({"ids": ids}, capture=True)["out"])
    h = params["embed.weight"][ids] @ params["proj.weight"].T + params["proj.bias"]
    np.testing.assert_allclose(got, by_hand(h) + h, rtol=1e-12, atol=1e-12)


def test_the_residual_add_writes_into_its_dead_input():
    """The plan writes in place where it may: the residual add, ReLU, mask, softmax and norm
    of a Transformer layer allocate nothing new."""
    g = qf.trace(qf.load_model("tiny"))
    plan, _, _ = fast_plan(g, False)
    written = {step[1] for step in plan if step[7] is not spec(step[1]).kernel.call}
    assert {"add", "activation", "mask", "softmax", "norm"} <= written


def _uneven():
    """Q wider than K and V (grouped-query shapes), all three outputs; OpenBLAS blocks the
    stacked product otherwise than the three alone, so this is where stacking shows."""
    def build():
        x = nn.embed(nn.input("ids", ("batch", "seq")))
        q, k, v = (nn.linear(x, d, name=n) for n, d in (("q", "d_model"), ("k", "kv"), ("v", "kv")))
        return {n: nn.output(t, n) for n, t in zip("qkv", (q, k, v))}
    return qf.Model("uneven", {"batch": None, "seq": None, "d_model": 64, "kv": 16, "vocab": 29}, build,
                    sequences={"seq": "bidirectional"})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_projections_of_uneven_widths_give_the_same_numbers_in_every_kind_of_run(dtype):
    g = qf.trace(_uneven())
    rng = np.random.default_rng(0)
    ex = runs_agree(g, dtype, {"ids": rng.integers(0, 29, (8, 8))}, {"ids": rng.integers(0, 29, (3, 5))})
    assert ex._stacked


def test_a_scalar_value_is_never_written_into():
    """A ufunc on a 0-d value returns a NumPy scalar, which no kernel may take as out=."""
    def build():
        h = nn.linear(nn.embed(nn.input("ids", ("batch", "seq"))), "d_model", name="proj")
        return {"out": nn.output(h + np.exp(h.sum()) * 2.0, "out")}
    g = qf.trace(qf.Model("scalar", {"batch": None, "seq": None, "d_model": 4, "vocab": 29}, build,
                          sequences={"seq": "bidirectional"}))
    ex = qf.Executor(g, qf.init_params(g, seed=0))
    ids = np.array([[5, 6, 7]])
    np.testing.assert_array_equal(ex.run({"ids": ids})["out"], ex.run({"ids": ids}, capture=True)["out"])


def test_a_mask_of_zeros_and_ones_is_taken_as_np_where_takes_it():
    def build():
        ids = nn.input("ids", ("batch", "seq"))
        h = nn.linear(nn.embed(ids), "d_model", name="proj")
        return {"out": nn.output(nn.mask(nn.scores(h, h, 1.0), (ids != 0).astype(int)[:, None, :]), "out")}
    g = qf.trace(qf.Model("int_mask", {"batch": None, "seq": None, "d_model": 4, "vocab": 29}, build,
                          sequences={"seq": "bidirectional"}))
    ex = qf.Executor(g, qf.init_params(g, seed=0), check=False)  # checked, the kernel wants bools
    out = ex.run({"ids": np.array([[5, 6, 0]])})["out"]
    np.testing.assert_array_equal(out, ex.run({"ids": np.array([[5, 6, 0]])}, capture=True)["out"])
    assert np.isneginf(out[0, :, 2]).all() and np.isfinite(out[0, :, :2]).all()


def _held_feature_major(a: np.ndarray) -> bool:
    return a.reshape(-1, a.shape[-1]).flags.f_contiguous and not a.flags.c_contiguous


@pytest.mark.parametrize("rows, feature_major", [(70, True), (20, False)])
def test_from_64_tokens_values_are_feature_major_and_the_outputs_token_major(rows, feature_major):
    """From 64 tokens the residual stream, the projections and the merged heads are held
    feature by feature (what OpenBLAS multiplies fastest); below, token by token. The logits
    a caller gets are token-major either way."""
    g = qf.trace(qf.load_model("tiny"))
    ex = qf.Executor(g, qf.init_params(g, seed=0, dtype="float32"), dtype="float32")
    out = ex.run(feeds_for(g, rows=rows), capture=True)
    acts = out["activations"]
    ops = {n: g.nodes[n]["op"] for n in acts if n in g}
    for op in ("embed", "linear", "merge_heads", "norm", "add"):
        values = [acts[n] for n, o in ops.items() if o == op]
        assert values and all(_held_feature_major(v) == feature_major for v in values), op
    assert out["logits"].flags.c_contiguous


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_values_given_in_another_layout_give_the_same_bits(dtype):
    """Values given to a run (``initial``) as a file would give them back, token-major, where
    the run itself holds them feature by feature: the norms copy them into the run's layout
    first, so their sums add in the same order and the logits are the same bit for bit."""
    g = qf.trace(qf.load_model("bart-tiny"))
    ex = qf.Executor(g, qf.init_params(g, seed=1, dtype=dtype), dtype=dtype)
    feeds = feeds_for(g, rows=70)
    ref = ex.run(feeds, capture=True)
    given = {n: np.ascontiguousarray(v) for n, v in ref["activations"].items()
             if n in g and g.nodes[n]["op"] in ("embed", "positional", "add", "norm")}
    assert any(not v.flags.c_contiguous for n, v in ref["activations"].items() if n in given)
    _same(ex.run(feeds, initial=given), _outputs(ref))
    first = {n: v for n, v in given.items() if n.startswith("encoder.") and g.nodes[n]["op"] == "positional"}
    assert first
    _same(ex.run(feeds, initial=first), _outputs(ref))
