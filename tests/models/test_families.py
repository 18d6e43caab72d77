"""Every preset of the three families, end to end, through the public API and the CLI.

For every preset: it traces and checks clean, explains with its family's table
(en and zh), renders. For the "-tiny" presets: it runs (float64 and float32,
named shapes), over the CLI too, and its masks hold numerically (causality,
padding). Then hand-checked values of the new kernels (rotary,
relative_buckets, unembed), family options from TOML, and BERT's pooled head
and token types.
"""

import functools
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.models.config import from_dict
from qkvflow.run import kernels

PRESETS = tuple(qf.PRESETS)
TINY = tuple(name for name in PRESETS if name.endswith("tiny") or name == "tiny")
FAMILY = {name: qf.PRESETS[name].family for name in PRESETS}

BATCH, SEQ, SRC, TGT = 2, 9, 11, 10  # no model dim of a tiny preset is a sequence length


def shell(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkvflow", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, exactly one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkvflow: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@functools.cache
def graph(name: str):
    return qf.trace(qf.load_model(name))


@functools.cache
def params(name: str) -> dict:
    return qf.init_params(graph(name), seed=0)


def token_ids(name: str, *shape: int, seed: int = 1) -> np.ndarray:
    """Random ids that avoid every special token (pad, bos, eos) of the tiny presets."""
    vocab = qf.PRESETS[name].vocab
    return np.random.default_rng(seed).integers(3, vocab - 1, size=shape)


def feeds(name: str) -> dict:
    """The inputs of a preset, by name: type_ids of an encoder-only model left out (zeros)."""
    if FAMILY[name] == "encoder_decoder":
        return {"src_ids": token_ids(name, BATCH, SRC), "tgt_ids": token_ids(name, BATCH, TGT, seed=2)}
    return {"ids": token_ids(name, BATCH, SEQ)}


def run(name: str, dtype="float64", **inputs) -> dict:
    return qf.forward(graph(name), params(name), dtype=dtype, **(inputs or feeds(name)))


# --- 1. every preset traces and checks clean -------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_preset_traces_and_checks_clean(name):
    g = graph(name)
    assert qf.check(g) == []
    names = [g.nodes[n]["attrs"]["name"] for n in g.graph["inputs"]]
    assert names == {"encoder_decoder": ["src_ids", "tgt_ids"], "decoder_only": ["ids"],
                     "encoder_only": ["ids", "type_ids"]}[FAMILY[name]]


def test_cli_checks_every_preset_clean():
    proc = shell("check", *PRESETS)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(PRESETS)} model(s) checked: 0 error(s), 0 warning(s)" in proc.stdout


# --- 2. explain: the family's table --------------------------------------------------

ENC_DEC = {
    "en": [("encoder_self", "encoder self-attention", "encoder stream", "encoder stream", "source padding"),
           ("decoder_self", "masked decoder self-attention", "decoder stream", "decoder stream",
            "causal + target padding"),
           ("cross", "cross-attention", "decoder stream", "encoder final output", "source padding")],
    "zh": [("encoder_self", "编码器自注意力", "编码器的输入", "编码器的输入", "源端填充"),
           ("decoder_self", "带掩码的解码器自注意力", "解码器的输入", "解码器的输入", "因果掩码 + 目标端填充"),
           ("cross", "交叉注意力", "解码器的输入", "编码器的最终输出", "源端填充")],
}
WORDS = {  # words the text table must show, and words it must not
    "encoder_decoder": {"en": (["encoder self-attention", "masked decoder self-attention", "cross-attention"],
                               ["bidirectional"]),
                        "zh": (["编码器自注意力", "带掩码的解码器自注意力", "交叉注意力", "编码器的最终输出"], ["双向"])},
    "decoder_only": {"en": (["masked self-attention", "decoder stream", "causal"],
                            ["cross-attention", "bidirectional", "encoder"]),
                     "zh": (["带掩码的自注意力", "解码器的输入", "因果掩码"], ["交叉注意力", "双向", "编码器"])},
    "encoder_only": {"en": (["bidirectional self-attention", "encoder stream", "seq padding"],
                            ["cross-attention", "masked", "causal", "decoder"]),
                     "zh": (["双向自注意力", "编码器的输入", "seq 填充"], ["交叉注意力", "带掩码", "因果", "解码器"])},
}


def expected_rows(name: str, lang: str) -> list[tuple]:
    """(kind, attention, q, k, mask, count, blocks) of each row of the preset's table."""
    cfg, zh = qf.PRESETS[name], lang == "zh"
    if cfg.family == "encoder_decoder":
        blocks = [[f"encoder.layers.{i}.self_attn" for i in range(cfg.encoder_layers)],
                  [f"decoder.layers.{i}.self_attn" for i in range(cfg.decoder_layers)],
                  [f"decoder.layers.{i}.cross_attn" for i in range(cfg.decoder_layers)]]
        return [(*row, len(b), b) for row, b in zip(ENC_DEC[lang], blocks)]
    if cfg.family == "decoder_only":
        source = "解码器的输入" if zh else "decoder stream"
        mask = ("因果掩码" if zh else "causal") + (
            (" + seq 填充" if zh else " + seq padding") if cfg.pad_id >= 0 else "")
        n = cfg.decoder_layers
        return [("decoder_self", "带掩码的自注意力" if zh else "masked self-attention", source, source, mask,
                 n, [f"decoder.layers.{i}.self_attn" for i in range(n)])]
    source, n = ("编码器的输入" if zh else "encoder stream"), cfg.encoder_layers
    return [("encoder_self", "双向自注意力" if zh else "bidirectional self-attention", source, source,
             "seq 填充" if zh else "seq padding", n, [f"encoder.layers.{i}.self_attn" for i in range(n)])]


def facts(rows: list[dict]) -> list[tuple]:
    return [(r["kind"], r["attention"], r["q"], r["k"], r["mask"], r["count"], r["blocks"]) for r in rows]


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("name", PRESETS)
def test_explain_json_gives_the_family_table(name, lang):
    data = json.loads(qf.explain(graph(name), lang=lang, fmt="json"))
    assert data["model"] == name and data["lang"] == lang
    assert facts(data["rows"]) == expected_rows(name, lang)
    assert all(r["v"] == r["k"] for r in data["rows"])


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("name", PRESETS)
def test_explain_text_uses_the_family_words(name, lang):
    text = qf.explain(graph(name), lang=lang)
    shown, absent = WORDS[FAMILY[name]][lang]
    assert name in text.splitlines()[0]
    for word in shown:
        assert word in text, word
    for word in absent:
        assert word not in text, word
    body = text.split("\n\n")[1].splitlines()  # header, rule, one line per row
    assert len(body) == 2 + len(expected_rows(name, lang))


@pytest.mark.parametrize("name, lang", [("llama-tiny", "zh"), ("bert-tiny", "en"), ("t5-tiny", "zh")])
def test_cli_explain_json_matches_the_api(name, lang):
    proc = shell("explain", name, "--lang", lang, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(qf.explain(graph(name), lang=lang, fmt="json"))


# --- 3. render -----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["dot", "mmd"])
@pytest.mark.parametrize("name", PRESETS)
def test_block_diagram_shows_every_attention_block(name, suffix, tmp_path):
    path = tmp_path / f"{name}.{suffix}"
    text = qf.render(graph(name), path, level="block")
    assert path.read_text(encoding="utf-8") == text
    assert text.startswith("digraph" if suffix == "dot" else "flowchart")
    for block in graph(name).graph["attention"]:
        assert block.split(".", 1)[1] in text, block  # e.g. layers.0.self_attn
    assert ("cross_attn" in text) == (FAMILY[name] == "encoder_decoder")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot is not installed")
@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny"])
def test_render_svg(name, tmp_path):
    svg = qf.render(graph(name), tmp_path / f"{name}.svg")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot is not installed")
@pytest.mark.parametrize("name, suffix", [("gpt2-tiny", "svg"), ("t5-tiny", "mmd")])
def test_cli_render(name, suffix, tmp_path):
    out = tmp_path / f"{name}.{suffix}"
    proc = shell("render", name, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0 and f"wrote {out}" in proc.stdout


# --- 4. the tiny presets run ----------------------------------------------------------

def test_run_sizes_are_all_distinct():
    """No sequence length is a model dim, and batch is not the vocabulary: every axis of
    every output (and of the attention tensors, save batch) can be told apart by its size."""
    for name in TINY:
        model = {v for v in graph(name).graph["dims"].values() if isinstance(v, int)}
        assert not model & {SEQ, SRC, TGT} and BATCH != qf.PRESETS[name].vocab, name
    assert len({BATCH, SEQ, SRC, TGT}) == 4


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_runs_with_named_shapes(name, dtype):
    g = graph(name)
    out = run(name, dtype)
    dims = g.graph["dims"]
    sizes = {**{k: v for k, v in dims.items() if v is not None},
             "batch": BATCH, "seq": SEQ, "src": SRC, "tgt": TGT}
    for node in g.graph["outputs"]:
        label, shape = g.nodes[node]["attrs"]["name"], g.nodes[node]["shape"]
        assert shape == ("batch", "tgt" if FAMILY[name] == "encoder_decoder" else "seq", "vocab")
        assert out[label].shape == tuple(sizes[d] for d in shape)
        assert out[label].dtype == np.dtype(dtype)
        assert np.isfinite(out[label]).all()


@pytest.mark.parametrize("name", TINY)
def test_float32_agrees_with_float64(name):
    np.testing.assert_allclose(run(name, "float32")["logits"], run(name)["logits"], rtol=0, atol=1e-4)


def cli_inputs(name: str) -> list[str]:
    if FAMILY[name] == "encoder_decoder":
        return ["--src", "5 6 7 8", "--tgt", "3 9"]
    return ["--ids", "5 6 7"]


@pytest.mark.parametrize("name", TINY)
def test_cli_runs_tiny_preset(name):
    proc = shell("run", name, *cli_inputs(name), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    seq = "tgt" if FAMILY[name] == "encoder_decoder" else "seq"
    length = 2 if seq == "tgt" else 3
    vocab = qf.PRESETS[name].vocab
    said, _, rest = proc.stdout.partition("\n")
    assert said.startswith("weights: seeded random (seed 0")
    assert rest.startswith(f"logits: shape (1, {length}, {vocab}) (batch, {seq}, vocab), dtype float32")
    assert f"{seq}[{length - 1}]:" in proc.stdout


def test_cli_run_gives_the_same_logits_as_the_api(tmp_path):
    proc = shell("run", "llama-tiny", "--ids", "5 6 7", "--top", "1")
    assert proc.returncode == 0, proc.stderr
    logits = run("llama-tiny", ids=np.array([[5, 6, 7]]))["logits"][0]
    for t, line in enumerate(proc.stdout.splitlines()[3:]):  # weights, shape, column header
        assert line.strip() == f"seq[{t}]: {int(np.argmax(logits[t]))} ({logits[t].max():.3f})"


# --- 5. masks hold numerically ---------------------------------------------------------

def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def perturbed(ids: np.ndarray, at: int, vocab: int) -> np.ndarray:
    out = ids.copy()
    out[:, at] = 3 + (ids[:, at] - 3 + 1) % (vocab - 4)  # another ordinary token
    return out


@pytest.mark.parametrize("name", [n for n in TINY if FAMILY[n] != "encoder_only"])
@pytest.mark.parametrize("at", [4, -1])
def test_a_later_token_does_not_change_earlier_logits(name, at):
    key = "tgt_ids" if FAMILY[name] == "encoder_decoder" else "ids"
    inputs = feeds(name)
    base = run(name, **inputs)["logits"]
    inputs[key] = perturbed(inputs[key], at, qf.PRESETS[name].vocab)
    moved = run(name, **inputs)["logits"]
    at %= base.shape[1]
    assert_same(moved[:, :at], base[:, :at])
    assert np.abs(moved[:, at] - base[:, at]).max() > 1e-6  # the perturbation does reach position `at`


def padded_bert() -> tuple[np.ndarray, int]:
    """bert-tiny ids (BATCH, SEQ): row 0 has its last 3 positions padded; the number of real ones."""
    ids, real = token_ids("bert-tiny", BATCH, SEQ), SEQ - 3
    ids[0, real:] = qf.PRESETS["bert-tiny"].pad_id
    return ids, real


def test_bert_padded_positions_do_not_reach_real_ones():
    ids, real = padded_bert()
    types = np.zeros_like(ids)
    base = run("bert-tiny", ids=ids, type_ids=types)["logits"]
    types[0, real:] = 1  # the padded positions' embeddings change ...
    moved = run("bert-tiny", ids=ids, type_ids=types)["logits"]
    assert np.abs(moved[0, real:] - base[0, real:]).max() > 1e-6
    assert_same(moved[0, :real], base[0, :real])  # ... the real positions do not see it
    assert_same(moved[1], base[1])


def test_bert_padding_equals_the_unpadded_sequence():
    ids, real = padded_bert()
    padded = run("bert-tiny", ids=ids)["logits"]
    alone = run("bert-tiny", ids=ids[:1, :real])["logits"]
    assert_same(padded[0, :real], alone[0])


# --- 6. the new kernels, by hand -----------------------------------------------------------

def test_rotary_by_hand():
    x = np.array([[0.3, -1.2, 0.7, 2.0],
                  [1.5, 0.4, -0.8, 0.9]])  # (seq 2, d 4): pairs (x0, x2) and (x1, x3)
    out = kernels.rotary(x, 10000.0, 0)
    np.testing.assert_array_equal(out[0], x[0])  # position 0: angle 0
    x0, x1, x2, x3 = x[1]
    a, b = 1.0, 1e-2  # position 1: angles 1 * 10000^0 and 1 * 10000^(-2/4)
    hand = [x0 * math.cos(a) - x2 * math.sin(a), x1 * math.cos(b) - x3 * math.sin(b),
            x2 * math.cos(a) + x0 * math.sin(a), x3 * math.cos(b) + x1 * math.sin(b)]
    np.testing.assert_allclose(out[1], hand, rtol=0, atol=1e-15)


def test_rotary_offset_and_relative_positions():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    np.testing.assert_allclose(kernels.rotary(q, 500.0, 2), kernels.rotary(np.vstack([q[:2], q]), 500.0, 0)[2:],
                               rtol=0, atol=1e-14)
    # q.k after rotary depends on the positions' difference only
    same_q, same_k = np.tile(q[:1], (5, 1)), np.tile(k[:1], (5, 1))
    rq, rk = kernels.rotary(same_q, 500.0, 0), kernels.rotary(same_k, 500.0, 0)
    np.testing.assert_allclose(rq[3] @ rk[1], rq[4] @ rk[2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(same_q, axis=-1), rtol=1e-14)


def bucket(rel: int, bidirectional: bool, buckets: int = 32, max_distance: int = 128) -> int:
    """The bucket of key - query = rel (one query at position -rel, one key at 0)."""
    return int(kernels.relative_buckets(1, 1, bidirectional, buckets, max_distance, offset=-rel)[0, 0])


@pytest.mark.parametrize("rel, want", [
    (0, 0), (-1, 1), (1, 17), (-7, 7), (-8, 8), (7, 23),
    (-200, 15),  # 8 + int(log(200/8) / log(128/8) * 8) = 8 + 9 = 17, capped at 16 - 1
    (200, 31),
])
def test_relative_buckets_bidirectional_by_hand(rel, want):
    assert bucket(rel, bidirectional=True) == want


@pytest.mark.parametrize("rel, want", [
    (0, 0), (-1, 1), (5, 0), (-15, 15), (-16, 16),
    (-20, 17),  # 16 + int(log(20/16) / log(128/16) * 16) = 16 + int(1.72) = 17
    (-1000, 31),
])
def test_relative_buckets_unidirectional_by_hand(rel, want):
    assert bucket(rel, bidirectional=False) == want


def test_relative_buckets_matrix_is_key_minus_query():
    got = kernels.relative_buckets(3, 4, True, 32, 128)
    want = [[bucket(k - q, True) for k in range(4)] for q in range(3)]
    np.testing.assert_array_equal(got, want)


def test_unembed_with_bias_by_hand():
    x = np.array([[[1.0, 2.0]], [[-1.0, 0.5]]])  # (2, 1, d 2)
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (vocab 3, d 2)
    b = np.array([0.5, -1.0, 2.0])
    np.testing.assert_array_equal(kernels.unembed(x, w, b), [[[1.5, 1.0, 5.0]], [[-0.5, -0.5, 1.5]]])
    np.testing.assert_array_equal(kernels.unembed(x, w, None), [[[1.0, 2.0, 3.0]], [[-1.0, 0.5, -0.5]]])


@pytest.mark.parametrize("name", ["bart-tiny", "marian-tiny", "bert-tiny"])
def test_logits_bias_is_added_to_every_position(name):
    (path,) = [k for k in params(name) if k.endswith("unembed.bias")]
    bias = np.random.default_rng(3).normal(size=params(name)[path].shape)
    base = run(name)["logits"]
    shifted = qf.forward(graph(name), {**params(name), path: bias}, **feeds(name))["logits"]
    np.testing.assert_allclose(shifted - base, np.broadcast_to(bias, base.shape), rtol=0, atol=1e-12)


# --- 7. family options from TOML ----------------------------------------------------------

LLAMA_TOML = """\
family = "decoder_only"
decoder_layers = 2
d_model = 24
heads = 4
kv_heads = 2
d_ff = 19
vocab = 61
max_positions = 64
norm = "pre"
norm_type = "rms"
norm_eps = 1e-6
positions = "rotary"
ffn = "gated"
activation = "silu"
bias = false
tied_embeddings = false
scale_embeddings = false
"""


def test_decoder_only_toml_loads_checks_and_equals_llama_tiny(tmp_path):
    path = tmp_path / "my-llama.toml"
    path.write_text(LLAMA_TOML, encoding="utf-8")
    cfg = qf.load_toml(path)
    assert (cfg.family, cfg.encoder_layers, cfg.kv_heads, cfg.positions) == ("decoder_only", 0, 2, "rotary")
    g = qf.trace(qf.load_model(str(path)))
    assert qf.check(g) == []
    assert g.graph["dims"]["kv_heads"] == 2
    assert facts(json.loads(qf.explain(g, fmt="json"))["rows"]) == expected_rows("llama-tiny", "en")
    ids = token_ids("llama-tiny", BATCH, SEQ)
    assert_same(qf.forward(g, params("llama-tiny"), ids=ids)["logits"], run("llama-tiny", ids=ids)["logits"])
    proc = shell("check", path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only", "encoder_only"])
def test_a_bare_family_toml_checks_clean(family, tmp_path):
    path = tmp_path / "bare.toml"
    path.write_text(f'family = "{family}"\n', encoding="utf-8")
    proc = shell("check", path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("toml, needles", [
    ('family = "decoder_only"\nencoder_layers = 3\n', ["encoder_layers", "decoder_only"]),
    ("type_vocab = 2\n", ["type_vocab", "encoder_decoder"]),
    ('family = "decoder_only"\nhead = "pooled"\n', ["head", "pooled", "decoder_only"]),
    ('family = "rnn"\n', ["family", "rnn"]),
    ("position_offset = 2\n", ["position_offset", "sinusoidal"]),
], ids=["encoder-stack-on-decoder-only", "type-vocab-on-enc-dec", "pooled-on-decoder-only",
        "unknown-family", "offset-on-sinusoidal"])
def test_invalid_family_options_are_one_line_errors(toml, needles, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(toml, encoding="utf-8")
    assert_usage_error(shell("check", path), "bad.toml", *needles)
    with pytest.raises(qf.QkvflowError):
        qf.load_toml(path)


# --- 8. BERT: pooled head, token types ----------------------------------------------

@functools.cache
def pooled_bert():
    g = qf.trace(qf.load_model(from_dict({"preset": "bert-tiny", "head": "pooled"})))
    return g, qf.init_params(g, seed=0)


def test_bert_pooled_head_outputs_hidden_and_pooled():
    g, p = pooled_bert()
    assert qf.check(g) == []
    out = qf.forward(g, p, ids=token_ids("bert-tiny", BATCH, SEQ))
    d_model = qf.PRESETS["bert-tiny"].d_model
    assert {k: v.shape for k, v in out.items()} == {"hidden": (BATCH, SEQ, d_model), "pooled": (BATCH, d_model)}
    assert np.isfinite(out["hidden"]).all() and (np.abs(out["pooled"]) <= 1).all()  # tanh


def test_bert_type_ids_default_to_zeros_and_change_the_output():
    g, p = pooled_bert()
    ids = token_ids("bert-tiny", BATCH, SEQ)
    types = np.zeros_like(ids)
    omitted = qf.forward(g, p, ids=ids)
    zeros = qf.forward(g, p, ids=ids, type_ids=types)
    types[:, SEQ // 2:] = 1  # a second segment
    given = qf.forward(g, p, ids=ids, type_ids=types)
    for key in ("hidden", "pooled"):
        np.testing.assert_array_equal(zeros[key], omitted[key])
        assert np.abs(given[key] - omitted[key]).max() > 1e-6, key


@pytest.mark.parametrize("option, needle", [
    ("rope_theta = 500000.0", "rope_theta is an option of rotary positions, not sinusoidal"),
    ("relative_buckets = 16", "relative_buckets is an option of relative positions"),
])
def test_an_option_of_positions_the_model_does_not_have_is_refused(option, needle, tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(f'preset = "tiny"\n{option}\n', encoding="utf-8")
    proc = shell("check", path)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_kv_heads_that_do_not_divide_heads_is_one_finding():
    cfg = qf.models.config.from_dict({"preset": "tiny", "kv_heads": 2})  # heads 3
    found = qf.check(qf.trace(qf.load_model(cfg)))
    assert [d.code for d in found] == ["QKV102"], [d.text() for d in found]
