"""The executor as a numerical reference.

(a) parity with an independent, deliberately plain NumPy forward pass written
    here from the design/reference facts (loops over rows, no qkvflow code);
(b) float32 on request; (c) eager run == graph run; (d) information flow by
    perturbation; (e) symbolic shapes == runtime shapes for every node;
(f) parameter files and input validation.

Sizes: tiny (heads 3, d_head 7, d_model 21, d_ff 29, vocab 41), batch 2,
src 11, tgt 5 -- every axis a different size.
"""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkvflow as qf
from qkvflow.models.config import from_dict
from qkvflow.ir.dims import size_of
from qkvflow.ir.errors import InputError, ParamError
from qkvflow.models.encoder_decoder import build

BATCH, SRC, TGT = 2, 11, 5
PAD, BOS, EOS = 0, 1, 2


# --- the independent reference ------------------------------------------------------

def paper_pe(n: int, d: int) -> np.ndarray:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pe = np.zeros((n, d))
    for p in range(n):
        for j in range(d):
            angle = p / 10000 ** (2 * (j // 2) / d)
            pe[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


def reference_logits(cfg, P: dict, src: np.ndarray, tgt: np.ndarray, pe=paper_pe) -> np.ndarray:
    """Encoder-decoder Transformer, straight from the textbook, one row at a time."""
    d, heads, dh, eps = cfg.d_model, cfg.heads, cfg.head_dim, cfg.norm_eps
    act = {
        "relu": lambda z: np.maximum(z, 0.0),
        "gelu": np.vectorize(lambda z: 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))),
    }[cfg.activation]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, eps inside the root
        return (x - mu) / np.sqrt(var + eps) * P[name + ".weight"] + P[name + ".bias"]

    def linear(x, name):
        return x @ P[name + ".weight"].T + P[name + ".bias"]  # weight is (out, in)

    def attention(name, xq, xkv, allowed):
        q, k, v = linear(xq, name + ".q_proj"), linear(xkv, name + ".k_proj"), linear(xkv, name + ".v_proj")
        out = np.zeros(q.shape)
        for b in range(xq.shape[0]):
            for h in range(heads):
                cols = slice(h * dh, (h + 1) * dh)  # feature h*dh + e belongs to head h
                for i in range(xq.shape[1]):
                    keys = [j for j in range(xkv.shape[1]) if allowed(b, i, j)]
                    if not keys:
                        continue  # no key may be attended: zeros
                    s = np.array([q[b, i, cols] @ k[b, j, cols] for j in keys]) / math.sqrt(dh)
                    w = np.exp(s - s.max())
                    w = w / w.sum()
                    out[b, i, cols] = sum(wj * v[b, j, cols] for wj, j in zip(w, keys))
        return linear(out, name + ".out_proj")

    def ffn(x, prefix):
        return linear(act(linear(x, prefix + ".linear1")), prefix + ".linear2")

    def sublayer(x, f, norm):
        if cfg.norm == "pre":
            return x + f(layer_norm(x, norm))
        return layer_norm(x + f(x), norm)

    def embed(ids, stream, table):
        x = table[ids] * (math.sqrt(d) if cfg.scale_embeddings else 1.0)
        n = ids.shape[1]
        if cfg.positions == "learned":
            return x + P[stream + ".positional.weight"][:n]
        return x + pe(n, d)

    src_real, tgt_real = src != cfg.pad_id, tgt != cfg.pad_id
    x = embed(src, "encoder", P["encoder.embed.weight"])
    for i in range(cfg.encoder_layers):
        at = f"encoder.layers.{i}"
        x = sublayer(x, lambda h: attention(at + ".self_attn", h, h, lambda b, q, k: src_real[b, k]),
                     at + ".norm1")
        x = sublayer(x, lambda h: ffn(h, at), at + ".norm2")
    if cfg.final_norms or cfg.norm == "pre":
        x = layer_norm(x, "encoder.norm")
    memory = x  # every cross-attention reads this one state

    dec_table = P["encoder.embed.weight"] if cfg.shared_embeddings else P["decoder.embed.weight"]
    y = embed(tgt, "decoder", dec_table)
    for i in range(cfg.decoder_layers):
        at = f"decoder.layers.{i}"
        y = sublayer(y, lambda h: attention(at + ".self_attn", h, h,
                                            lambda b, q, k: k <= q and tgt_real[b, k]), at + ".norm1")
        y = sublayer(y, lambda h: attention(at + ".cross_attn", h, memory,
                                            lambda b, q, k: src_real[b, k]), at + ".norm2")
        y = sublayer(y, lambda h: ffn(h, at), at + ".norm3")
    if cfg.final_norms or cfg.norm == "pre":
        y = layer_norm(y, "decoder.norm")
    out_table = dec_table if cfg.tied_embeddings else P["decoder.unembed.weight"]
    return y @ out_table.T


# --- fixtures -------------------------------------------------------------------------------

def noisy_params(g, seed: int) -> dict:
    """init_params with every bias and norm weight moved off 0 / 1, so none can be skipped unseen."""
    rng = np.random.default_rng(seed + 1000)
    params = qf.init_params(g, seed=seed)
    for path, value in params.items():
        if path.endswith(".bias") or g.nodes[path.rsplit(".", 1)[0]]["op"] == "norm":
            params[path] = value + rng.normal(0.0, 0.2, value.shape)
    return params


def token_batch(rng, vocab: int, batch: int, length: int, pads: list[int], bos: bool) -> np.ndarray:
    """Real tokens in 3..vocab-1, then ``pads[b]`` padding ids at the end of row b."""
    ids = rng.integers(3, vocab, size=(batch, length))
    if bos:
        ids[:, 0] = BOS
    for b, n in enumerate(pads):
        if n:
            ids[b, length - n:] = PAD
    return ids


@pytest.fixture(scope="module")
def tiny():
    cfg = qf.preset("tiny")
    g = qf.trace(build(cfg))
    return cfg, g, noisy_params(g, seed=3)


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(7)
    src = token_batch(rng, 41, BATCH, SRC, pads=[0, 4], bos=False)  # row 1: 7 tokens + 4 pads
    src[0, -1], src[1, 6] = EOS, EOS
    tgt = token_batch(rng, 41, BATCH, TGT, pads=[0, 2], bos=True)   # row 1: 3 tokens + 2 pads
    return src, tgt


def test_tiny_sizes_are_all_different(tiny):
    cfg, g, _ = tiny
    dims = g.graph["dims"]
    sizes = [dims[n] for n in ("heads", "d_head", "d_model", "d_ff", "vocab")] + [BATCH, SRC, TGT]
    assert sizes == [3, 7, 21, 29, 41, 2, 11, 5]
    assert len(set(sizes)) == len(sizes)


# --- (a) parity with the independent reference ------------------------------------------------

def test_tiny_matches_reference_with_the_paper_positions(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    got = qf.forward(g, params, src, tgt)["logits"]
    assert np.abs(got - reference_logits(cfg, params, src, tgt)).max() <= 1e-12


def _parity(cfg, seed):
    g = qf.trace(build(cfg))
    assert qf.check(g) == []
    params = noisy_params(g, seed)
    rng = np.random.default_rng(seed)
    src = token_batch(rng, cfg.vocab, BATCH, SRC, pads=[3, 0], bos=False)
    tgt = token_batch(rng, cfg.vocab, BATCH, TGT, pads=[1, 0], bos=True)
    got = qf.forward(g, params, src, tgt)["logits"]
    want = reference_logits(cfg, params, src, tgt)
    assert got.shape == (BATCH, TGT, cfg.vocab)
    return np.abs(got - want).max()


def test_even_width_post_norm_matches_reference_exactly():
    # tiny's wiring with d_head 6 (d_model 18, even), so the paper's positions apply fully
    cfg = from_dict({"preset": "tiny", "name": "tiny-even", "d_model": 18, "d_ff": 13, "vocab": 37})
    assert _parity(cfg, seed=11) <= 1e-12


def test_inner_width_other_than_d_model_matches_reference():
    # heads * d_head = 3 * 5 = 15 != d_model 18 (T5-style inner width): q/k/v (15, 18), out (18, 15)
    cfg = from_dict({"preset": "tiny", "name": "inner", "d_model": 18, "d_head": 5, "d_ff": 13,
                     "vocab": 37})
    g = qf.trace(build(cfg))
    assert g.nodes["encoder.layers.0.self_attn.q_proj"]["params"]["weight"] == ("heads*d_head", "d_model")
    assert qf.init_params(g)["encoder.layers.0.self_attn.out_proj.weight"].shape == (18, 15)
    assert _parity(cfg, seed=15) <= 1e-12


def test_pre_norm_learned_positions_gelu_matches_reference():
    cfg = from_dict({
        "name": "pre-gelu", "encoder_layers": 2, "decoder_layers": 1, "d_model": 21, "heads": 3,
        "d_ff": 29, "vocab": 41, "max_positions": 17, "norm": "pre", "activation": "gelu",
        "positions": "learned", "shared_embeddings": False, "tied_embeddings": False, "scale_embeddings": False,
    })
    assert _parity(cfg, seed=12) <= 1e-12


def test_pre_norm_toml_file_matches_reference(tmp_path):
    path = tmp_path / "prenorm.toml"
    path.write_text(
        'preset = "tiny"\nnorm = "pre"\nactivation = "gelu"\npositions = "learned"\n'
        "max_positions = 19\nencoder_layers = 1\n", encoding="utf-8")
    cfg = qf.load_toml(path)
    assert (cfg.name, cfg.norm, cfg.positions, cfg.encoder_layers) == ("prenorm", "pre", "learned", 1)
    assert _parity(cfg, seed=13) <= 1e-12


def test_torch_transformer_like_final_norms_matches_reference():
    # torch.nn.Transformer adds encoder.norm and decoder.norm also in post-norm
    cfg = from_dict({"preset": "torch-transformer", "encoder_layers": 2, "decoder_layers": 2,
                     "d_model": 18, "heads": 3, "d_ff": 13, "vocab": 37, "max_positions": 23})
    assert cfg.final_norms and not cfg.tied_embeddings and cfg.norm == "post"
    assert _parity(cfg, seed=14) <= 1e-12


def test_reference_is_sensitive_to_the_final_norm():
    # guard on the reference itself: dropping a stage must show up far above 1e-12
    cfg = from_dict({"preset": "torch-transformer", "encoder_layers": 1, "decoder_layers": 1,
                     "d_model": 18, "heads": 3, "d_ff": 13, "vocab": 37, "max_positions": 23})
    g = qf.trace(build(cfg))
    params = noisy_params(g, 5)
    rng = np.random.default_rng(5)
    src = token_batch(rng, 37, BATCH, SRC, [0, 0], False)
    tgt = token_batch(rng, 37, BATCH, TGT, [0, 0], True)
    import dataclasses
    without = dataclasses.replace(cfg, final_norms=False)
    got = qf.forward(g, params, src, tgt)["logits"]
    assert np.abs(got - reference_logits(without, params, src, tgt)).max() > 1e-3


# --- (b) float32 ------------------------------------------------------------------------------

def test_float32_on_request(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    out64 = qf.forward(g, params, src, tgt)
    out32 = qf.forward(g, params, src, tgt, dtype="float32", capture=True)
    assert out64["logits"].dtype == np.float64
    assert out32["logits"].dtype == np.float32
    floats = [n for n, d in g.nodes(data=True) if d["dtype"] == "float"]
    assert floats and all(out32["activations"][n].dtype == np.float32 for n in floats)
    np.testing.assert_allclose(out32["logits"], out64["logits"], rtol=1e-4, atol=1e-5)
    assert not np.array_equal(out32["logits"].astype(np.float64), out64["logits"])


def test_unsupported_dtype_is_refused(tiny, ids):
    cfg, g, params = tiny
    with pytest.raises(ParamError, match="float16"):
        qf.forward(g, params, *ids, dtype="float16")


# --- (c) eager == graph ---------------------------------------------------------------------------

def test_eager_run_equals_graph_execution(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    eager = qf.eager(build(cfg), params, {"src_ids": src, "tgt_ids": tgt})
    graph = qf.forward(g, params, src, tgt)
    assert set(eager) == {"logits"}
    assert eager["logits"].shape == (BATCH, TGT, 41)
    np.testing.assert_allclose(eager["logits"], graph["logits"], rtol=0, atol=1e-13)


def test_eager_pre_norm_learned_equals_graph():
    cfg = from_dict({"preset": "tiny", "norm": "pre", "positions": "learned", "activation": "gelu",
                     "shared_embeddings": False, "tied_embeddings": False})
    g = qf.trace(build(cfg))
    params = noisy_params(g, 21)
    rng = np.random.default_rng(21)
    src = token_batch(rng, 41, BATCH, SRC, [2, 0], False)
    tgt = token_batch(rng, 41, BATCH, TGT, [0, 1], True)
    eager = qf.eager(build(cfg), params, {"src_ids": src, "tgt_ids": tgt})["logits"]
    np.testing.assert_allclose(eager, qf.forward(g, params, src, tgt)["logits"], rtol=0, atol=1e-13)


# --- (d) information flow by perturbation ----------------------------------------------------------

@pytest.mark.parametrize("j", range(TGT))
def test_target_token_j_never_changes_earlier_positions(tiny, ids, j):
    cfg, g, params = tiny
    src, tgt = ids
    base = qf.forward(g, params, src, tgt)["logits"]
    changed = tgt.copy()
    changed[:, j] = np.where(changed[:, j] == 17, 23, 17)  # another real token at j, both rows
    out = qf.forward(g, params, src, changed)["logits"]
    np.testing.assert_array_equal(out[:, :j], base[:, :j])
    assert np.abs(out[:, j] - base[:, j]).max() > 1e-6  # ... but position j itself does see it


def test_source_tokens_change_every_target_position(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    base = qf.forward(g, params, src, tgt)["logits"]
    changed = src.copy()
    changed[:, 2] = np.where(changed[:, 2] == 17, 23, 17)  # a real source token in both rows
    out = qf.forward(g, params, changed, tgt)["logits"]
    assert (np.abs(out - base).max(axis=-1) > 1e-9).all()


def test_more_source_padding_never_changes_logits(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    base = qf.forward(g, params, src, tgt)["logits"]
    longer = np.concatenate([src, np.full((BATCH, 6), PAD)], axis=1)  # src 11 -> 17, all pad
    out = qf.forward(g, params, longer, tgt)["logits"]
    np.testing.assert_allclose(out, base, rtol=0, atol=1e-12)


def test_what_sits_at_source_padding_never_changes_logits(tiny, ids):
    # The embedding row of the pad id is all that reaches the encoder at padding positions.
    # It is tied to the decoder input and the output layer, so with no target padding only
    # the logit of token 0 itself may move.
    cfg, g, params = tiny
    src, _ = ids
    tgt = token_batch(np.random.default_rng(9), 41, BATCH, TGT, [0, 0], bos=True)
    assert (src == PAD).any() and not (tgt == PAD).any()
    base = qf.forward(g, params, src, tgt)["logits"]
    moved = dict(params)
    moved["encoder.embed.weight"] = params["encoder.embed.weight"].copy()
    moved["encoder.embed.weight"][PAD] += np.random.default_rng(1).normal(0, 3.0, 21)
    out = qf.forward(g, moved, src, tgt)["logits"]
    np.testing.assert_array_equal(out[..., 1:], base[..., 1:])
    assert np.abs(out[..., 0] - base[..., 0]).min() > 0


def test_fully_padded_source_row_gives_finite_logits(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    src = src.copy()
    src[1] = PAD
    with np.errstate(invalid="raise", divide="raise"):
        out = qf.forward(g, params, src, tgt, capture=True)
    assert np.isfinite(out["logits"]).all()
    # cross-attention weights of that row are all zero (documented rule), the other row sums to 1
    probs = out["activations"]["decoder.layers.0.cross_attn.softmax"]
    np.testing.assert_array_equal(probs[1], 0.0)
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, atol=1e-12)


# --- (e) symbolic shapes == runtime shapes -------------------------------------------------------------

def _assert_shapes_agree(g, acts, sizes):
    assert set(acts) == set(g.nodes)
    for node, data in g.nodes(data=True):
        want = tuple(size_of(name, sizes) for name in data["shape"])
        assert acts[node].shape == want, (node, data["shape"], acts[node].shape)
        kind = {"bool": "b", "int": "iu", "float": "f"}[data["dtype"]]
        assert acts[node].dtype.kind in kind, (node, data["dtype"], acts[node].dtype)


def test_every_tiny_node_has_its_symbolic_shape_at_runtime(tiny, ids):
    cfg, g, params = tiny
    out = qf.forward(g, params, *ids, capture=True)
    sizes = {**g.graph["dims"], "batch": BATCH, "src": SRC, "tgt": TGT}
    _assert_shapes_agree(g, out["activations"], sizes)
    # spot checks where a src/tgt mix-up would show
    acts = out["activations"]
    assert acts["decoder.layers.1.cross_attn.scores"].shape == (BATCH, 3, TGT, SRC)
    assert acts["decoder.layers.1.self_attn.scores"].shape == (BATCH, 3, TGT, TGT)
    assert acts["encoder.layers.0.self_attn.split_heads_2"].shape == (BATCH, 3, SRC, 7)
    assert acts["decoder.layers.0.linear1"].shape == (BATCH, TGT, 29)


PRIMES = (2, 3, 5, 7, 11, 13)


@st.composite
def model_and_sizes(draw):
    used: set = set()

    def fresh(choices):
        value = draw(st.sampled_from([n for n in choices if n not in used]))
        used.add(value)
        return value

    heads = fresh(PRIMES)
    d_head = fresh(PRIMES)
    if draw(st.booleans()):  # d_model = heads * d_head, d_head implied
        d_model, explicit = heads * d_head, 0
        used.add(d_model)
    else:  # an inner width that differs from d_model (as in T5)
        d_model, explicit = fresh(range(4, 41)), d_head
    values = {
        "name": "drawn", "heads": heads, "d_head": explicit, "d_model": d_model,
        "d_ff": fresh(range(3, 41)), "vocab": fresh(range(6, 51)),
        "max_positions": fresh(range(14, 61)),
        "encoder_layers": draw(st.integers(0, 2)), "decoder_layers": draw(st.integers(0, 2)),
        "norm": draw(st.sampled_from(("post", "pre"))),
        "activation": draw(st.sampled_from(("relu", "gelu"))),
        "positions": draw(st.sampled_from(("sinusoidal", "learned"))),
        "shared_embeddings": draw(st.booleans()), "tied_embeddings": draw(st.booleans()),
        "final_norms": draw(st.booleans()),
    }
    data = {"batch": fresh(range(1, 5)), "src": fresh(range(1, 14)),
            "tgt": fresh(range(1, 10))}
    return from_dict(values), data, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_and_sizes())
def test_drawn_configs_run_with_their_symbolic_shapes(drawn):
    cfg, data, seed = drawn
    g = qf.trace(build(cfg))
    params = qf.init_params(g, seed=seed)
    rng = np.random.default_rng(seed)
    src = rng.integers(0, cfg.vocab, size=(data["batch"], data["src"]))
    tgt = rng.integers(0, cfg.vocab, size=(data["batch"], data["tgt"]))
    out = qf.forward(g, params, src, tgt, capture=True)
    assert out["logits"].shape == (data["batch"], data["tgt"], cfg.vocab)
    assert np.isfinite(out["logits"]).all()
    _assert_shapes_agree(g, out["activations"], {**g.graph["dims"], **data})


# --- (f) parameters and inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_params_round_trip(tiny, tmp_path, suffix, dtype):
    cfg, g, params = tiny
    params = {k: v.astype(dtype) for k, v in params.items()}
    path = qf.save_params(params, tmp_path / f"tiny{suffix}")
    assert path.is_file()
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left behind
    loaded = qf.load_params(path)
    assert sorted(loaded) == sorted(params)
    for key, value in params.items():
        assert loaded[key].dtype == np.dtype(dtype), key
        np.testing.assert_array_equal(loaded[key], value)


def test_loaded_params_give_the_same_logits(tiny, ids, tmp_path):
    cfg, g, params = tiny
    path = qf.save_params(params, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(qf.forward(g, qf.load_params(path), *ids)["logits"],
                                  qf.forward(g, params, *ids)["logits"])


def test_missing_parameter_is_named(tiny, ids):
    cfg, g, params = tiny
    broken = {k: v for k, v in params.items() if k != "decoder.layers.1.cross_attn.v_proj.bias"}
    with pytest.raises(ParamError, match=r"decoder\.layers\.1\.cross_attn\.v_proj\.bias .*missing"):
        qf.forward(g, broken, *ids)


def test_transposed_weight_is_named_with_both_shapes(tiny, ids):
    cfg, g, params = tiny
    broken = dict(params)
    broken["encoder.layers.0.linear1.weight"] = params["encoder.layers.0.linear1.weight"].T  # (21, 29)
    with pytest.raises(ParamError, match=r"encoder\.layers\.0\.linear1\.weight has shape \(21, 29\), "
                                         r"expected .*d_ff.*\(29, 21\)"):
        qf.forward(g, broken, *ids)


def test_nan_weight_is_named(tiny, ids):
    cfg, g, params = tiny
    broken = dict(params)
    broken["decoder.layers.0.norm2.weight"] = params["decoder.layers.0.norm2.weight"].copy()
    broken["decoder.layers.0.norm2.weight"][4] = np.nan
    with pytest.raises(ParamError, match=r"decoder\.layers\.0\.norm2\.weight .*NaN"):
        qf.forward(g, broken, *ids)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy's, on the inf it multiplies
def test_a_weight_made_infinite_in_place_after_a_run_is_still_named(tiny, ids):
    """Arrays read finite once are not read on each call; outputs that are not
    finite make the run read them all again and name the one changed since."""
    cfg, g, _ = tiny
    params = qf.init_params(g, seed=1)
    assert np.isfinite(qf.forward(g, params, *ids)["logits"]).all()
    params["encoder.layers.1.linear2.weight"][3, 5] = np.inf  # the same array, changed in place
    with pytest.raises(ParamError, match=r"encoder\.layers\.1\.linear2\.weight .*infinite"):
        qf.forward(g, params, *ids)


def test_integer_weight_is_refused(tiny, ids):
    cfg, g, params = tiny
    broken = dict(params)
    broken["encoder.embed.weight"] = np.ones((41, 21), dtype=np.int64)
    with pytest.raises(ParamError, match=r"encoder\.embed\.weight has dtype int64"):
        qf.forward(g, broken, *ids)


@pytest.mark.parametrize("where, bad", [("src", 41), ("tgt", 41), ("tgt", -1)])
def test_token_id_out_of_range(tiny, ids, where, bad):
    cfg, g, params = tiny
    src, tgt = (a.copy() for a in ids)
    (src if where == "src" else tgt)[1, 2] = bad
    with pytest.raises(InputError, match=rf"{where}_ids has token id {bad}, expected ids in 0..40"):
        qf.forward(g, params, src, tgt)


def test_float_token_array_is_refused(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    with pytest.raises(InputError, match="src_ids must hold integer token ids, got dtype float64"):
        qf.forward(g, params, src.astype(np.float64), tgt)


def test_batch_mismatch_between_inputs_is_refused(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    with pytest.raises(InputError, match="batch = 1 on axis 0, but batch = 2"):
        qf.forward(g, params, src, tgt[:1])


def test_malformed_id_arrays_are_refused(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    with pytest.raises(InputError, match=r"src_ids has 1 axes, expected \(batch, src\)"):
        qf.forward(g, params, src[0], tgt)
    with pytest.raises(InputError, match="tgt_ids is empty along tgt"):
        qf.forward(g, params, src, tgt[:, :0])
    with pytest.raises(InputError, match="must hold integer token ids, got dtype bool"):
        qf.forward(g, params, src, tgt != 0)


def test_unchecked_run_gives_the_same_numbers(tiny, ids):
    cfg, g, params = tiny
    np.testing.assert_array_equal(qf.forward(g, params, *ids, check=False)["logits"],
                                  qf.forward(g, params, *ids)["logits"])


def test_unsigned_token_ids_run_like_signed_ones(tiny, ids):
    cfg, g, params = tiny
    src, tgt = ids
    want = qf.forward(g, params, src, tgt)["logits"]
    got = qf.forward(g, params, src.astype(np.uint16), tgt.astype(np.uint16))["logits"]
    np.testing.assert_array_equal(got, want)


def test_npz_with_an_object_array_is_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    # the payload works when pickle is allowed ...
    pickle.loads(pickle.dumps(Payload()))
    assert sentinel.exists()
    sentinel.unlink()
    # ... and load_params never gets that far
    path = tmp_path / "evil.npz"
    np.savez(path, **{"encoder.embed.weight": np.array([Payload()], dtype=object)})
    with pytest.raises(ParamError, match="cannot be read"):
        qf.load_params(path)
    assert not sentinel.exists()


def test_load_params_errors(tmp_path):
    with pytest.raises(ParamError, match="does not exist"):
        qf.load_params(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ParamError, match="cannot be read"):
        qf.load_params(tmp_path / "junk.safetensors")
    with pytest.raises(ParamError, match=r"\.safetensors or \.npz"):
        qf.save_params({"a": np.zeros(3)}, tmp_path / "w.pt")
