"""Decoder-only and encoder-only models: sequence dims and streams are the model's own.

The models in :mod:`single_stream` name their sequence dims ``seq`` and
``tokens`` and their streams ``lm`` and ``text``. They trace, check clean,
explain with the words of their family and run through ``qf.forward`` with
their own input names; their broken twins are found, and each finding is
confirmed by running the graph.
"""

import numpy as np
import pytest

import qkvflow as qf
import single_stream as ss
from qkvflow.ir.errors import InputError, TraceError
from qkvflow.views.explain import provenance

VOCAB = ss.DIMS["vocab"]


def _ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(batch, length))


def _bug_line(marker: str) -> str:
    lines = open(ss.__file__, encoding="utf-8").read().splitlines()
    (line,) = [i for i, text in enumerate(lines, 1) if f"# BUG({marker})" in text]
    return f"single_stream.py:{line}"


# --- decoder-only -------------------------------------------------------------------

def test_decoder_only_checks_clean_explains_one_row_and_runs():
    model = ss.decoder_only()
    g = qf.trace(model)
    assert g.graph["sequences"] == {"seq": "causal"} and g.graph["streams"] == ["lm"]
    assert qf.check(g, strict=True) == []
    (row,) = provenance(g)
    assert (row["attention"], row["q"], row["k"], row["v"], row["mask"], row["count"]) == (
        "masked self-attention", "lm stream", "lm stream", "lm stream", "causal", 2)
    (zh,) = provenance(g, lang="zh")
    assert zh["attention"] == "带掩码的自注意力"
    assert "all 2 attention blocks that read K/V from the lm stream are causally masked" in qf.explain(g)
    params = qf.init_params(g, seed=2)
    ids = _ids(3, 7)
    logits = qf.forward(g, params, ids=ids)["logits"]
    assert logits.shape == (3, 7, VOCAB)
    np.testing.assert_array_equal(qf.forward(g, params, ids)["logits"], logits)
    eager = qf.eager(model, params, {"ids": ids})["logits"]
    assert np.abs(eager - logits).max() <= 1e-12
    later = ids.copy()
    later[:, 4:] = _ids(3, 3, seed=9)
    changed = qf.forward(g, params, ids=later)["logits"]
    np.testing.assert_allclose(changed[:, :4], logits[:, :4], rtol=0, atol=1e-12)  # the past is untouched
    assert np.abs(changed[:, 4:] - logits[:, 4:]).max() > 1e-3


def test_a_residual_written_with_plus_is_a_residual():
    g = qf.trace(ss.decoder_only(post_norm=True))
    assert qf.check(g, strict=True) == []
    site = g.graph["attention"]["lm.h.1.self_attn"]["sites"][0]
    assert site["origins"]["q"] == "lm.h.0.add"  # the state entering layer 1, not a stale one


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "derived"])
def test_decoder_only_without_causal_mask_is_qkv401(declare):
    model = ss.decoder_only(ss.unmasked_attention, declare=declare)
    g = qf.trace(model)
    assert g.graph["sequences"] == {"seq": "causal"}  # derived from the decoder_self blocks when undeclared
    found = qf.check(g)
    assert [(d.code, d.node) for d in found] == [("QKV401", "lm.h.0.self_attn.softmax")]
    assert found[0].source.endswith(_bug_line("decoder_only_unmasked"))
    assert "causal sequence seq depends on seq tokens after t" in found[0].message
    assert "No causal mask on lm.h.0.self_attn, lm.h.1.self_attn" in qf.explain(g)
    params = qf.init_params(g, seed=2)
    ids = _ids(2, 6)
    later = ids.copy()
    later[:, -1] = (ids[:, -1] + 1) % VOCAB
    first = qf.forward(g, params, ids=ids)["logits"][:, 0]
    assert np.abs(qf.forward(g, params, ids=later)["logits"][:, 0] - first).max() > 1e-6  # it sees the future


# --- encoder-only -------------------------------------------------------------------

def _padded(batch: int, length: int, pads: int) -> np.ndarray:
    ids = _ids(batch, length, seed=5)
    ids[1, length - pads:] = ss.PAD
    return ids


def test_encoder_only_checks_clean_explains_one_row_and_runs():
    model = ss.encoder_only()
    g = qf.trace(model)
    assert qf.check(g, strict=True) == []
    (row,) = provenance(g)
    assert (row["attention"], row["q"], row["k"], row["mask"], row["count"]) == (
        "bidirectional self-attention", "text stream", "text stream", "tokens padding", 2)
    assert provenance(g, lang="zh")[0]["attention"] == "双向自注意力"
    params = qf.init_params(g, seed=3)
    ids = _padded(2, 8, pads=3)
    logits = qf.forward(g, params, token_ids=ids)["logits"]
    assert logits.shape == (2, 8, VOCAB)
    assert np.abs(qf.eager(model, params, {"token_ids": ids})["logits"] - logits).max() <= 1e-12
    # More padding after the real tokens changes nothing at the real positions.
    longer = np.concatenate([ids, np.full((2, 4), ss.PAD)], axis=1)
    np.testing.assert_allclose(qf.forward(g, params, token_ids=longer)["logits"][1, :5], logits[1, :5],
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("declare_pad", [True, False], ids=["pad-declared", "pad-from-the-mask"])
def test_encoder_only_with_the_padding_mask_on_the_query_axis_is_found(declare_pad):
    g = qf.trace(ss.encoder_only(ss.query_masked_attention, declare_pad=declare_pad))
    found = qf.check(g)
    assert [(d.code, d.node) for d in found] == [("QKV402", "text.layer.0.self_attn.softmax")]
    assert found[0].source.endswith(_bug_line("encoder_only_query_mask"))
    params = qf.init_params(g, seed=3)
    ids = _padded(2, 8, pads=3)
    other = ids.copy()
    other[1, -1] = 7  # what stands in a padded position
    row = qf.forward(g, params, token_ids=ids)["logits"][1, :5]
    assert np.abs(qf.forward(g, params, token_ids=other)["logits"][1, :5] - row).max() > 1e-6


def test_a_padding_mask_of_another_token_than_the_declared_pad_is_found():
    assert qf.check(qf.trace(ss.encoder_only(ss.masking_with(ss.PAD))), strict=True) == []
    found = qf.check(qf.trace(ss.encoder_only(ss.masking_with(ss.PAD + 1))))
    assert [(d.code, d.node) for d in found] == [("QKV306", "text.layer.0.self_attn.softmax"),
                                                ("QKV306", "text.layer.1.self_attn.softmax"),
                                                ("QKV402", "text.layer.0.self_attn.softmax")]
    assert "declared but not applied: tokens_padding" in found[0].message


# --- declarations ------------------------------------------------------------------

def test_inputs_are_given_by_their_own_names():
    g = qf.trace(ss.decoder_only())
    params = qf.init_params(g)
    with pytest.raises(InputError, match="the model's inputs are ids"):
        qf.forward(g, params, src_ids=_ids(1, 3))
    with pytest.raises(InputError, match="takes 1: ids"):
        qf.forward(g, params, _ids(1, 3), _ids(1, 3))
    with pytest.raises(InputError, match="input ids has token id 53, expected ids in 0..52"):
        qf.forward(g, params, ids=np.array([[1, 53]]))


def test_declarations_are_checked():
    def with_(**kw):
        base = ss.decoder_only()
        return qf.Model(base.name, base.dims, base.build, **kw)

    with pytest.raises(TraceError, match="declares sequence dim 'd_model', which is not a data dim"):
        qf.trace(with_(sequences={"d_model": "causal"}))
    with pytest.raises(TraceError, match="sequence dim 'seq' is 'forward'; expected one of causal, bidirectional"):
        qf.trace(with_(sequences={"seq": "forward"}))
    with pytest.raises(TraceError, match=r"scopes name the stream\(s\) lm, which the model does not declare"):
        qf.trace(with_(sequences={"seq": "causal"}, streams=("decoder",)))

    @qf.attention("decoder_self", q="lm", k="lm", v="decoder", mask="causal")
    def misnamed(x, causal):
        return ss.causal_attention.__wrapped__(x, causal)

    found = qf.check(qf.trace(ss.decoder_only(misnamed)))
    assert {d.code for d in found} == {"QKV301"}
    assert "declares v='decoder', which is not a stream of the model (streams: lm; or 'memory')" in found[0].message


@pytest.mark.parametrize("kwargs, message", [
    ({"sequences": ["seq"]}, "sequences must map sequence dims to 'causal' or 'bidirectional', got list"),
    ({"streams": "lm"}, "streams must be a tuple of stream names, got str"),
    ({"streams": ("lm", "lm")}, "streams names a stream twice"),
    ({"dims": {**ss.DIMS, "d_model": "22"}}, "dims must map dim names to integer sizes"),
    ({"dims": {**ss.DIMS, "d_model": 22.0}}, "dims must map dim names to integer sizes"),
    ({"config": [1]}, "config must be a dict, got list"),
])
def test_a_model_of_the_wrong_parts_is_one_sentence(kwargs, message):
    base = ss.decoder_only()
    args = {"dims": base.dims, **kwargs}
    with pytest.raises(qf.QkvflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        qf.Model(base.name, args.pop("dims"), base.build, **args)


@pytest.mark.parametrize("kwargs, message", [
    ({"sequences": {}}, "token input 'ids' runs over 'seq', which is not one of its sequence dims (none declared)"),
    ({"sequences": {"seq": "causal", "tokens": "causal"}}, "declares the sequence dim 'tokens', which no tensor has"),
    ({"sequences": {"seq": "causal"}, "streams": ("lm", "ghost")}, "declares the stream 'ghost', which no scope"),
])
def test_declarations_the_code_does_not_use_are_refused(kwargs, message):
    base = ss.decoder_only(ss.unmasked_attention)
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        qf.trace(qf.Model(base.name, base.dims, base.build, **kwargs))


@pytest.mark.parametrize("args, message", [
    ((("batch seq"),), "shape must be a tuple of dim names"),
    ((("batch", "toks"),), "'toks' is not a dim of the model"),
    ((("batch", "seq"), "bogus"), "dtype 'bogus' is not one of int, float, bool"),
    ((("batch", "seq"), "int", True), "pad_id must be a non-negative integer token id"),
    ((("batch", "seq"), "int", -1), "pad_id must be a non-negative integer token id"),
    ((("batch", "seq"), "int", "0"), "pad_id must be a non-negative integer token id"),
])
def test_a_malformed_input_is_one_sentence(args, message):
    def run():
        shape, *rest = args
        ids = qf.nn.input("ids", shape, *rest[:1], **({"pad_id": rest[1]} if len(rest) > 1 else {}))
        return {"y": qf.nn.embed(ids)}

    with pytest.raises(TraceError, match=message):
        qf.trace(qf.Model("m", ss.DIMS, run))


def test_a_pad_id_outside_the_vocabulary_and_a_bad_eps_are_findings():
    def run():
        ids = qf.nn.input("ids", ("batch", "tokens"), pad_id=53)
        with qf.scope("text", stream="text"):
            return {"y": qf.nn.norm(qf.nn.embed(ids), eps=float("nan"), name="norm")}

    found = qf.check(qf.trace(qf.Model("m", ss.DIMS, run)))
    assert [(d.code, d.node, d.message) for d in found] == [
        ("QKV103", "text.norm", "norm text.norm has eps = nan, expected a positive number"),
        ("QKV104", "ids", "input ids declares pad_id 53, which is not a token id of its vocabulary 0..52")]


def test_forward_refuses_what_is_not_a_run():
    g = qf.trace(ss.decoder_only())
    params = qf.init_params(g)
    with pytest.raises(InputError, match="input ids is not an array of one shape"):
        qf.forward(g, params, ids=[[5, 6], [7]])
    with pytest.raises(qf.QkvflowError, match="dtype 'bogus' is not supported"):
        qf.forward(g, params, ids=_ids(1, 3), dtype="bogus")
    with pytest.raises(qf.QkvflowError, match="params must be a dict"):
        qf.forward(g, None, ids=_ids(1, 3))
    with pytest.raises(qf.QkvflowError, match="expected a traced graph"):
        qf.forward(ss.decoder_only(), params, ids=_ids(1, 3))
    for stage in (qf.check, qf.explain, lambda m: qf.render(m, fmt="mmd")):
        with pytest.raises(qf.QkvflowError, match=r"expected a traced graph \(qkvflow.trace\(model\)\), got Model"):
            stage(ss.decoder_only())
