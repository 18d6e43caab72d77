"""Incremental decoding derived from the graph: every step equals full recompute.

Covers every family's small preset (learned, sinusoidal, half-split, rotary and
relative positions; grouped-query attention; padded sources) and models written
in plain NumPy (the GPT-2 and Llama ports in examples/, a decoder with an
additive causal bias and einsum), so the cache is found in code qkvflow did
not write. A model whose steps cannot be derived falls back, saying why.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.ir.graph import independent_of
from qkvflow.run.execute import Executor
from qkvflow.run.incremental import IncrementalRunner, NotIncremental

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import gpt2_qkvflow  # noqa: E402
import llama_qkvflow  # noqa: E402
import single_stream  # noqa: E402

MODELS = {
    **{name: (lambda name=name: qf.load_model(name))
       for name in ("tiny", "bart-tiny", "marian-tiny", "t5-tiny", "gpt2-tiny", "llama-tiny", "bert-tiny")},
    "gpt2 port (numpy)": gpt2_qkvflow.model,
    "llama port (numpy)": llama_qkvflow.model,
    "decoder with an additive causal bias": single_stream.decoder_only,
}


def _sequence(g, params, rng) -> tuple[dict, str, np.ndarray]:
    """Fixed feeds, the generated input's name and a token sequence for it."""
    inputs = [g.nodes[n]["attrs"] for n in g.graph["inputs"] if "default" not in g.nodes[n]["attrs"]]
    vocab = g.graph["dims"]["vocab"]
    ids = rng.integers(3, vocab - 1, size=(3, 7))
    if len(inputs) == 2:
        src = rng.integers(3, vocab - 1, size=(3, 5))
        pad = inputs[0].get("pad_id")
        if pad is not None:
            src[src == pad] = 3
            src[2, 3:] = pad  # a padded source
        ids[:, 0] = g.graph["config"].get("bos_id", 1)
        return {inputs[0]["name"]: src}, inputs[1]["name"], ids
    return {}, inputs[0]["name"], ids


@pytest.mark.parametrize("name", MODELS)
def test_every_step_equals_full_recompute(name):
    g = qf.trace(MODELS[name]())
    if g.graph.get("sequences", {}).get(g.nodes[g.graph["inputs"][-1]]["shape"][-1]) == "bidirectional":
        pytest.skip("an encoder-only model generates nothing")
    params = qf.init_params(g, seed=4)
    fixed, seq_input, ids = _sequence(g, params, np.random.default_rng(1))
    ex = Executor(g, params)
    known = {}
    if fixed:
        acts = ex.run({**fixed, seq_input: ids[:, :1]}, capture=True)["activations"]
        known = {n: acts[n] for n in independent_of(g, [seq_input]) if g.nodes[n]["op"] != "input"}
    seq = g.nodes[next(n for n in g.graph["inputs"] if g.nodes[n]["attrs"]["name"] == seq_input)]["shape"][-1]
    runner = IncrementalRunner(ex, seq, set(known))
    assert runner.cached, "no cache found"
    output = g.nodes[g.graph["outputs"][0]]["attrs"]["name"]
    prompt = 2
    out = runner.run({**fixed, seq_input: ids[:, :prompt]}, known, 0)[output]
    full = qf.forward(g, params, **fixed, **{seq_input: ids[:, :prompt]})[output]
    assert np.max(np.abs(out[:, -1] - full[:, -1])) <= 1e-12
    for t in range(prompt, ids.shape[1]):
        out = runner.run({**fixed, seq_input: ids[:, t:t + 1]}, known, t)[output]
        full = qf.forward(g, params, **fixed, **{seq_input: ids[:, :t + 1]})[output]
        assert np.max(np.abs(out[:, -1] - full[:, -1])) <= 1e-12, f"step {t}"


def test_the_cache_is_where_attention_contracts_over_the_sequence():
    g = qf.trace(qf.load_model("tiny"))
    ex = Executor(g, qf.init_params(g))
    known = {n for n in independent_of(g, ["tgt_ids"]) if g.nodes[n]["op"] != "input"}
    cached = set(IncrementalRunner(ex, "tgt", known).cached)
    for layer in range(2):
        self_attn = f"decoder.layers.{layer}.self_attn"
        assert {f"{self_attn}.split_heads_1", f"{self_attn}.split_heads_2"} <= cached  # its K and V heads
    assert not any(".cross_attn." in n for n in cached)  # cross-attention K/V are computed once, not cached


def test_beam_search_with_the_cache_equals_without():
    g = qf.trace(qf.load_model("t5-tiny"))
    params = qf.init_params(g, seed=2)
    src = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    a = qf.generate(g, params, src, max_new_tokens=8, beams=3)
    b = qf.generate(g, params, src, max_new_tokens=8, beams=3, cache=False)
    assert a.cached and not b.cached
    assert np.array_equal(a.ids, b.ids) and np.max(np.abs(a.scores - b.scores)) <= 1e-12


@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def flattened_attention(x, causal):
    """Projections on (batch*seq, d_model) rows: correct, but the sequence is merged with the batch."""
    B, T, D = x.shape
    rows = x.reshape(B * T, D)
    q, k, v = (qf.nn.linear(rows, "heads*d_head", name=f"{r}_proj").reshape(B, T, qf.dim("heads"),
               qf.dim("d_head")).transpose(0, 2, 1, 3) for r in "qkv")
    s = q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head"))
    o = qf.nn.softmax(np.where(causal, s, -np.inf), axis=-1) @ v
    return qf.nn.linear(o.transpose(0, 2, 1, 3).reshape(B, T, D), "d_model", name="out_proj")


def test_a_model_it_cannot_step_falls_back_and_says_why():
    g = qf.trace(single_stream.decoder_only(flattened_attention))
    params = qf.init_params(g, seed=1)
    with pytest.raises(NotIncremental, match=r"merges the generated sequence seq with another dim \(batch\*seq\)"):
        IncrementalRunner(Executor(g, params), "seq", set())
    out = qf.generate(g, params, np.array([[5, 6, 7]]), max_new_tokens=4)
    assert not out.cached and out.note.startswith("full recompute at every step: node lm.h.0.")
    assert np.array_equal(out.ids, qf.generate(g, params, np.array([[5, 6, 7]]), max_new_tokens=4,
                                               cache=False).ids)


# --- attention written in other styles: derived, or refused and recomputed, never wrong -------------

sys.path.insert(0, str(Path(__file__).parent))
import attention_styles as styles  # noqa: E402

INCREMENTAL = {"triu_bias": styles.a_triu, "heads_in_batch": styles.a_bmm, "grouped_rotary": styles.a_gqa,
               "running_sums": styles.a_cumsum}
REFUSED = {"keys_first": styles.a_kq, "arange_mask": styles.a_arange, "alibi": styles.a_alibi}


@pytest.mark.parametrize("name", [*INCREMENTAL, *REFUSED])
def test_other_styles_are_stepped_exactly_or_recomputed(name):
    attn = {**INCREMENTAL, **REFUSED}[name]
    g = qf.trace(styles.make(attn, name=name))
    params = qf.init_params(g, seed=3)
    prompt = np.array([[24, 18, 15], [7, 23, 19]])
    if name in REFUSED:
        with pytest.raises(NotIncremental):
            IncrementalRunner(Executor(g, params), "seq", set())
    else:
        runner = IncrementalRunner(Executor(g, params), "seq", set())
        ids = np.random.default_rng(2).integers(3, 28, size=(2, 7))
        out = runner.run({"ids": ids[:, :2]}, {}, 0)["logits"]
        for t in range(2, ids.shape[1]):
            out = runner.run({"ids": ids[:, t:t + 1]}, {}, t)["logits"]
            full = qf.forward(g, params, ids=ids[:, :t + 1])["logits"]
            assert np.max(np.abs(out[:, -1] - full[:, -1])) <= 1e-12, f"step {t}"
    for beams in (1, 3):
        cached = qf.generate(g, params, prompt, max_new_tokens=8, beams=beams)
        full = qf.generate(g, params, prompt, max_new_tokens=8, beams=beams, cache=False)
        assert cached.cached == (name in INCREMENTAL)
        assert np.array_equal(cached.ids, full.ids) and np.max(np.abs(cached.scores - full.scores)) <= 1e-12


def test_an_encoder_decoder_with_blocks_of_its_own_beam_searches_with_the_cache():
    from qkvflow.models.encoder_decoder import build
    g = qf.trace(build(qf.preset("tiny"), cross=styles.cross_bmm, decoder_self=styles.self_triu))
    params = qf.init_params(g, seed=5)
    src = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [13, 14, 0, 0, 0]])
    for beams in (1, 3):
        cached = qf.generate(g, params, src, max_new_tokens=10, beams=beams)
        full = qf.generate(g, params, src, max_new_tokens=10, beams=beams, cache=False)
        assert cached.cached and np.array_equal(cached.ids, full.ids)
        assert np.max(np.abs(cached.scores - full.scores)) <= 1e-12
