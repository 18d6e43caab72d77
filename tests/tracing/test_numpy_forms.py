"""NumPy forms people write, traced: each runs like NumPy, and a mistake in it is found.

np.repeat (grouped-query attention), np.stack, np.expand_dims / np.squeeze,
.var, .astype, and bare sizes in reshape (``D // H``). Each correct model
checks clean and its graph runs equal to its eager run; each planted
mistake is found.
"""

import numpy as np
import pytest
from jaxtyping import Bool, Float

import qkvflow as qf
from qkvflow import nn
from qkvflow.ir.errors import TraceError

# heads 4 share kv_heads 2 K/V heads; every dim a different size.
DIMS = {"batch": None, "seq": None, "d_model": 12, "heads": 4, "kv_heads": 2, "d_head": 3, "d_ff": 19,
        "vocab": 29}


def layer_norm(x):
    return (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-5)


def layer_norm_over_positions(x):
    return (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-5)  # BUG


def grouped_query(repeat_axis: int = 1, bias_sign: float = 1.0, by_name: bool = False):
    """Masked self-attention with 4 query heads over 2 repeated K/V heads."""

    @qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
    def grouped_query_attention(
        x: Float[np.ndarray, "batch seq d_model"],
        causal: Bool[np.ndarray, "seq seq"],
    ) -> Float[np.ndarray, "batch seq d_model"]:
        """Q from the lm stream in heads; K, V in kv_heads, each repeated heads // kv_heads times."""
        B, T, D = x.shape
        H, KV = qf.dim("heads"), qf.dim("kv_heads")
        Dh = qf.dim("d_head") if by_name else D // H                        # a bare 3: d_head
        q = nn.linear(x, "heads*d_head", name="q_proj").reshape(B, T, H, Dh).transpose(0, 2, 1, 3)
        k = nn.linear(x, "kv_heads*d_head", name="k_proj").reshape(B, T, KV, Dh).transpose(0, 2, 1, 3)
        v = nn.linear(x, "kv_heads*d_head", name="v_proj").reshape(B, T, KV, Dh).transpose(0, 2, 1, 3)
        k = np.repeat(k, H // KV, axis=repeat_axis)                          # (B, heads, T, Dh)
        v = np.repeat(v, H // KV, axis=1)
        keep = np.expand_dims(causal, (0, 1)).astype(np.float32)             # (1, 1, T, T): 1 keep, 0 not
        s = q @ k.swapaxes(-1, -2) / np.sqrt(Dh) + bias_sign * (1.0 - keep) * -1e9
        o = nn.softmax(s, axis=-1) @ v                                       # (B, heads, T, Dh)
        return nn.linear(o.transpose(0, 2, 1, 3).reshape(B, T, H * Dh), "d_model", name="o_proj")

    return grouped_query_attention


def stacked_heads(stack_axis: int = 1):
    """Masked self-attention as a loop over heads, joined with np.stack."""

    @qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
    def stacked_head_attention(
        x: Float[np.ndarray, "batch seq d_model"],
        causal: Bool[np.ndarray, "seq seq"],
    ) -> Float[np.ndarray, "batch seq d_model"]:
        """Q, K, V from the lm stream, one projection per head; heads stacked on axis 1."""
        B, T, _ = x.shape
        outputs = []
        for h in range(qf.dim("heads")):
            q, k, v = (nn.linear(x, "d_head", name=f"head{h}.{r}_proj") for r in "qkv")  # (B, T, Dh)
            s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head")), -np.inf)
            outputs.append(nn.softmax(s, axis=-1) @ v)
        o = np.stack(outputs, axis=stack_axis)                               # (B, heads, T, Dh)
        return nn.linear(o.transpose(0, 2, 1, 3).reshape(B, T, -1), "d_model", name="o_proj")

    return stacked_head_attention


def lm(block, norm=layer_norm, layers: int = 2) -> qf.Model:
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        wte = qf.param("wte", ("vocab", "d_model"))
        causal = nn.causal_mask(ids, name="causal")
        with qf.scope("lm", stream="lm"):
            x = wte[ids]                                                     # (B, T, d_model)
            for i in range(layers):
                with qf.scope(f"layers.{i}", layer=i):
                    x = x + block(norm(x), causal)
                    x = x + nn.linear(nn.activation(nn.linear(norm(x), "d_ff", name="up"), "silu"),
                                      "d_model", name="down")
            return {"logits": norm(x) @ wte.T}

    return qf.Model(f"lm-{block.__name__}", DIMS, run, sequences={"seq": "causal"}, streams=("lm",))


CORRECT = {
    "grouped_query": lambda: lm(grouped_query()),
    "stacked_heads": lambda: lm(stacked_heads()),
}


@pytest.mark.parametrize("name", CORRECT)
def test_correct_forms_check_clean_and_run_like_numpy(name):
    model = CORRECT[name]()
    g = qf.trace(model)
    assert qf.check(g, strict=True) == []
    params = qf.init_params(g, seed=5)
    ids = np.random.default_rng(1).integers(0, 29, (3, 6))
    logits = qf.forward(g, params, ids=ids)["logits"]
    assert logits.shape == (3, 6, 29)
    assert np.abs(qf.eager(model, params, {"ids": ids})["logits"] - logits).max() <= 1e-12
    later = ids.copy()
    later[:, 5] = (ids[:, 5] + 1) % 29
    np.testing.assert_allclose(qf.forward(g, params, ids=later)["logits"][:, :5], logits[:, :5], atol=1e-12)


def test_the_forms_have_their_names():
    g = qf.trace(lm(grouped_query()))
    block = "lm.layers.0.self_attn"
    repeated = [n for n in g if n.startswith(block) and g.nodes[n]["op"] == "repeat"]
    assert [g.nodes[n]["shape"] for n in repeated] == [("batch", "heads", "seq", "d_head")] * 2
    assert g.nodes[f"{block}.reshape"]["shape"] == ("batch", "seq", "heads", "d_head")  # D // H named d_head
    g = qf.trace(lm(stacked_heads()))
    (stacked,) = [n for n in g if n.startswith(block) and g.nodes[n]["op"] == "concat"]
    assert g.nodes[stacked]["shape"] == ("batch", "heads", "seq", "d_head")


@pytest.mark.parametrize("model, code, node", [
    (lambda: lm(grouped_query(repeat_axis=2)), "QKV201", "lm.layers.0.self_attn.matmul"),
    (lambda: lm(grouped_query(bias_sign=-1.0)), "QKV306", "lm.layers.0.self_attn.softmax"),
    (lambda: lm(stacked_heads(stack_axis=2)), "QKV203", "lm.layers.0.self_attn.reshape_4"),
    (lambda: lm(grouped_query(), norm=layer_norm_over_positions), "QKV401", "lm.layers.0.elementwise"),
], ids=["repeat-over-positions", "mask-inverted", "stack-on-the-wrong-axis", "var-over-positions"])
def test_a_mistake_in_each_form_is_found(model, code, node):
    found = qf.check(qf.trace(model()))
    assert any(d.code == code and d.node.startswith(node) for d in found), [d.text() for d in found]


def _refused(body):
    def run():
        x = nn.input("x", ("batch", "seq", "d_model"), dtype="float")
        return {"y": body(x)}
    return qf.trace(qf.Model("refused", DIMS, run))


@pytest.mark.parametrize("body, message", [
    (lambda x: np.squeeze(x, axis=1), "squeeze of x ('batch', 'seq', 'd_model') along axis 1: it is seq"),
    (lambda x: x.reshape(qf.dim("heads"), -1, 6), "the bare size 6 names no one dim (no dim has size 6)"),
    (lambda x: x.var(axis=-1, ddof=1), "only ddof=0 traces"),
    (lambda x: x.astype(np.complex64), "only float, bool and int dtypes trace"),
    (lambda x: np.repeat(x, [1, 2], axis=1), "give one repeat count of 1 or more and an axis"),
    (lambda x: np.repeat(x, 2), "give one repeat count of 1 or more and an axis"),
    (lambda x: np.stack([x, x], axis=7), "axis 7 is out of range for 4 axes"),
    (lambda x: x.var(axis=5), "axis 5 is out of range for 3 axes"),
])
def test_what_is_not_traced_is_one_sentence(body, message):
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _refused(body)


def test_squeeze_and_expand_dims_are_inverse():
    g = _refused(lambda x: np.squeeze(np.expand_dims(x, (0, 2)), axis=(0, 2)) + x)
    assert qf.check(g) == []
    x = np.random.default_rng(0).normal(size=(2, 5, 12))
    np.testing.assert_array_equal(qf.forward(g, {}, x=x)["y"], 2 * x)


def test_a_refusal_names_the_users_line():
    def run():
        x = nn.input("x", ("batch", "seq", "d_model"), dtype="float")
        return {"y": np.sort(x, axis=1)}  # the refused call

    with pytest.raises(TraceError) as info:
        qf.trace(qf.Model("refused", DIMS, run))
    line = next(i for i, text in enumerate(open(__file__, encoding="utf-8"), 1) if "# the refused call" in text)
    assert str(info.value).startswith(f"tracing 'refused' failed at {__file__}:{line}: numpy.sort cannot be traced")


def causal_from_a_table(form: str):
    """Masked self-attention whose causal mask is a NumPy table built from the length."""

    @qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
    def table_masked_attention(
        x: Float[np.ndarray, "batch seq d_model"],
        causal: Bool[np.ndarray, "seq seq"],
    ) -> Float[np.ndarray, "batch seq d_model"]:
        """Q, K, V from the lm stream (one head); the mask is made here from T."""
        B, T, _ = x.shape
        q, k, v = (nn.linear(x, "d_model", name=f"{r}_proj") for r in "qkv")
        s = q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_model"))             # (B, T, T)
        if form == "tril":
            s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
        elif form == "triu":
            s = s + np.triu(np.full((T, T), -np.inf), 1)                        # torch's square subsequent mask
        elif form == "tri":
            s = np.where(np.tri(T, dtype=bool), s, -1e9)
        else:  # one step into the future
            s = np.where(np.tril(np.ones((T, T), dtype=bool), k=1), s, -np.inf)
        return nn.linear(nn.softmax(s, axis=-1) @ v, "d_model", name="o_proj")

    return table_masked_attention


@pytest.mark.parametrize("form", ["tril", "triu", "tri"])
def test_a_causal_mask_built_from_the_length_is_causal(form):
    model = lm(causal_from_a_table(form))
    g = qf.trace(model)
    assert qf.check(g, strict=True) == []
    assert g.graph["attention"]["lm.layers.0.self_attn"]["sites"][0]["masks"] == ["causal"]
    params = qf.init_params(g, seed=2)
    ids = np.random.default_rng(4).integers(0, 29, (2, 7))
    logits = qf.forward(g, params, ids=ids)["logits"]
    assert np.abs(qf.eager(model, params, {"ids": ids})["logits"] - logits).max() <= 1e-12
    assert np.ones((2, 3)).shape == (2, 3) and np.arange(3).tolist() == [0, 1, 2]  # NumPy is NumPy again


def test_a_table_that_lets_a_position_see_ahead_is_found():
    found = qf.check(qf.trace(lm(causal_from_a_table("ahead"))))
    codes = {(d.code, d.node.rsplit(".", 1)[-1]) for d in found}
    assert ("QKV401", "softmax") in codes and ("QKV306", "softmax") in codes


def test_positions_from_arange_and_a_table_prefix():
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        wte, wpe = qf.param("wte", ("vocab", "d_model")), qf.param("wpe", ("d_ff", "d_model"))
        with qf.scope("lm", stream="lm"):
            return {"y": wte[ids] + wpe[np.arange(ids.shape[-1])] - wpe[:ids.shape[-1]]}

    model = qf.Model("positions", DIMS, run, sequences={"seq": "causal"}, streams=("lm",))
    g = qf.trace(model)
    assert qf.check(g) == []
    params = qf.init_params(g)
    ids = np.array([[3, 4, 5]])
    np.testing.assert_allclose(qf.forward(g, params, ids=ids)["y"], params["wte"][ids], atol=1e-15)


def _one_block(block, dims, **declared):
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        with qf.scope("lm", stream="lm"):
            x = qf.param("wte", ("vocab", "d_model"))[ids]
            with qf.scope("layers.0", layer=0):
                return {"y": x + block(x, nn.causal_mask(ids))}
    return qf.Model("one-block", dims, run, sequences={"seq": "causal"}, streams=("lm",), **declared)


def named_apart(kv: str, values: str, out: tuple):
    """Masked self-attention naming its dims in its own words."""

    @qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
    def attention(x, causal):
        B, T, _ = x.shape
        q = (x @ qf.param("wq", ("d_model", "heads*d_head"))).reshape(B, T, qf.dim("heads"), -1)
        k = (x @ qf.param("wk", ("d_model", f"{kv}*d_head"))).reshape(B, T, qf.dim(kv), -1)
        v = (x @ qf.param("wv", ("d_model", f"{kv}*{values}"))).reshape(B, T, qf.dim(kv), -1)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))              # (B, H, T, Dh)
        s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head")), -np.inf)
        o = (nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3)              # (B, T, H, Dv)
        o = o.reshape(B, T, o.shape[2] * o.shape[3])
        return o @ qf.param("wo", out)

    return attention


@pytest.mark.parametrize("kv, values, out, dims, declared", [
    ("heads", "d_head", ("d_head*heads", "d_model"), DIMS, {}),                # products in any order
    ("heads", "d_v", ("heads*d_head", "d_model"), {**DIMS, "d_v": 3}, {"aliases": {"d_v": "d_head"}}),
    ("kv_heads", "d_head", ("heads*d_head", "d_model"), {**DIMS, "kv_heads": 4}, {}),  # no grouping
], ids=["product-order", "alias", "kv_heads-equal-heads"])
def test_one_dim_under_two_names_is_one_dim(kv, values, out, dims, declared):
    model = _one_block(named_apart(kv, values, out), dims, **declared)
    g = qf.trace(model)
    assert qf.check(g, strict=True) == []
    params = qf.init_params(g, seed=3)
    ids = np.array([[1, 2, 3, 4, 5]])
    assert np.abs(qf.forward(g, params, ids=ids)["y"] - qf.eager(model, params, {"ids": ids})["y"]).max() <= 1e-12


def test_two_dims_under_two_names_are_still_two():
    found = qf.check(qf.trace(_one_block(named_apart("heads", "d_v", ("heads*d_head", "d_model")),
                                         {**DIMS, "d_v": 3})))
    assert "QKV202" in {d.code for d in found}  # d_v is d_head only when declared so
    with pytest.raises(TraceError, match="alias d_v = d_ff needs both sized and equal, got 3 and 19"):
        qf.trace(_one_block(named_apart("heads", "d_v", ("heads*d_head", "d_model")), {**DIMS, "d_v": 3},
                            aliases={"d_v": "d_ff"}))
    found = qf.check(qf.trace(_one_block(named_apart("kv_heads", "d_head", ("heads*d_head", "d_model")), DIMS)))
    assert "QKV201" in {d.code for d in found}  # 2 K/V heads against 4 query heads, never repeated


def test_a_lower_triangle_below_the_diagonal_is_not_causal():
    """tril(ones, -1) masks the diagonal too: row 0 keeps no key, and its weights spread over all."""

    @qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
    def strictly_lower(x, causal):
        T = x.shape[1]
        q, k, v = (nn.linear(x, "d_model", name=f"{r}_proj") for r in "qkv")
        s = np.where(np.tril(np.ones((T, T), dtype=bool), -1), q @ k.swapaxes(-1, -2) / np.sqrt(12), -1e9)
        return nn.softmax(s, axis=-1) @ v

    assert {"QKV306", "QKV401"} <= {d.code for d in qf.check(qf.trace(_one_block(strictly_lower, DIMS)))}


def test_grouped_queries_are_named_when_another_dim_has_the_size_of_heads():
    dims = {**DIMS, "d_head": 4, "d_model": 16, "heads": 4, "kv_heads": 2}
    assert qf.check(qf.trace(lm_with(dims, grouped_query(by_name=True))), strict=True) == []
    with pytest.raises(TraceError, match="the bare size 4 names no one dim .dims heads, d_head all have size 4."):
        qf.trace(lm_with(dims, grouped_query()))  # D // H is 4: heads or d_head?


def lm_with(dims, block):
    model = lm(block)
    return qf.Model(model.name, dims, model.build, sequences={"seq": "causal"}, streams=("lm",))


def test_one_part_of_a_fused_projection_taken_twice_is_shared():
    @qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
    def k_is_q(x, causal):
        qkv = x @ qf.param("w", ("d_model", "3*d_model"))
        q, k, v = np.split(qkv, 3, axis=-1)[0], np.split(qkv, 3, axis=-1)[0], np.split(qkv, 3, axis=-1)[2]
        s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(12), -np.inf)
        return nn.softmax(s, axis=-1) @ v

    assert "QKV307" in {d.code for d in qf.check(qf.trace(_one_block(k_is_q, DIMS)))}


def test_the_first_entries_of_a_token_tensor_keep_their_positions():
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        with qf.scope("lm", stream="lm"):
            x = qf.param("wte", ("vocab", "d_model"))[ids]
            return {"y": x[:, :ids.shape[-1]] + x}

    assert qf.check(qf.trace(qf.Model("prefix", DIMS, run, sequences={"seq": "causal"}, streams=("lm",)))) == []


def test_a_softmax_whose_sum_is_expanded_by_indexing_is_a_softmax():
    @qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
    def expanded(x, causal):
        q, k, v = (nn.linear(x, "d_model", name=f"{r}_proj") for r in "qkv")
        s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(12), -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1)[..., None]) @ v

    assert qf.check(qf.trace(_one_block(expanded, DIMS)), strict=True) == []


def test_traces_may_overlap_in_two_threads_and_numpy_comes_back():
    import threading
    ones = np.ones
    results, start = [], threading.Barrier(2)

    def work():
        start.wait()
        for _ in range(3):
            results.append(qf.check(qf.trace(lm(causal_from_a_table("tril")))))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[]] * 6 and np.ones is ones


@pytest.mark.parametrize("body, codes", [
    (lambda x: np.cumsum(x, axis=1) / 2, set()),        # running sums over positions are causal
    (lambda x: x.cumsum(-1), set()),
    (lambda x: x[..., ::-1], set()),                    # features backwards: nothing moves in time
    (lambda x: x * len(qf.param("w", ("d_ff", "d_model"))), {"QKV308"}),  # len: 19, the param unused
    (lambda x: np.roll(x, 1, axis=1), {"QKV401"}),      # position 0 gets the last token
    (lambda x: x[:, ::-1], {"QKV401"}),                 # position 0 gets the last token
], ids=["cumsum-over-positions", "cumsum-over-features", "reverse-features", "len-of-a-sized-dim",
        "roll-over-positions", "reverse-positions"])
def test_running_sums_rolls_and_reversals(body, codes):
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        with qf.scope("lm", stream="lm"):
            return {"y": body(qf.param("wte", ("vocab", "d_model"))[ids])}

    model = qf.Model("moves", DIMS, run, sequences={"seq": "causal"}, streams=("lm",))
    g = qf.trace(model)
    assert {d.code for d in qf.check(g)} == codes
    params, ids = qf.init_params(g), np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert np.abs(qf.forward(g, params, ids=ids)["y"] - qf.eager(model, params, {"ids": ids})["y"]).max() == 0


def _positions_model(body):
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        with qf.scope("lm", stream="lm"):
            return {"y": body(ids, qf.param("wte", ("vocab", "d_model"))[ids])}
    return qf.Model("picks", DIMS, run, sequences={"seq": "causal"}, streams=("lm",))


@pytest.mark.parametrize("body, codes", [
    (lambda ids, x: x[:, -1], set()),                              # the last position, as an output
    (lambda ids, x: x[:, [-1]], set()),
    (lambda ids, x: x + x[:, 0][:, None, :], set()),                # the first token, read by every position
    (lambda ids, x: x + x[:, [-1]], {"QKV401"}),                    # the last token, read by every position
    (lambda ids, x: np.cumsum(x[:, ::-1], axis=1)[:, ::-1], {"QKV401"}),  # suffix sums: the future
    (lambda ids, x: x + qf.param("wpe", ("d_ff", "d_model"))[:ids.shape[0]], {"QKV201"}),  # batch, not seq
    (lambda ids, x: (x @ qf.param("w", ("d_model", "heads*d_head"))).reshape(x.shape[0], x.shape[1], 3, 4),
     {"QKV203"}),                                                   # heads*d_head split as d_head, heads
], ids=["last-as-output", "last-kept-as-1", "first-spread", "last-spread", "suffix-sums",
        "positions-of-the-wrong-length", "bare-sizes-in-the-wrong-order"])
def test_picks_and_positions_planted_and_correct(body, codes):
    model = _positions_model(body)
    dims = {**DIMS, "d_model": 12, "heads": 4, "d_head": 3}
    model = qf.Model(model.name, dims, model.build, sequences={"seq": "causal"}, streams=("lm",))
    g = qf.trace(model)
    assert {d.code for d in qf.check(g)} == codes
    if not codes:
        params, ids = qf.init_params(g), np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
        assert np.abs(qf.forward(g, params, ids=ids)["y"] - qf.eager(model, params, {"ids": ids})["y"]).max() == 0


def test_a_quotient_of_named_dims_keeps_its_name():
    def run():
        x = nn.input("x", ("batch", "seq", "d_model"), dtype="float")
        B, T, D = x.shape
        H = qf.dim("heads")
        hd = qf.dim("heads") * qf.dim("d_head")                     # heads*d_head
        assert (hd // H).name == "d_head" and int(hd // H) == 3
        return {"y": x.reshape(B, T, H, hd // H)}

    g = qf.trace(qf.Model("quotient", DIMS, run))
    assert g.nodes["reshape"]["shape"] == ("batch", "seq", "heads", "d_head")
