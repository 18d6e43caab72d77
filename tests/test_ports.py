"""A plain-NumPy GPT-2 and its port: the port changes only the lines it marks,
checks clean, and runs equal to the NumPy model; mistakes planted in it are found."""

import difflib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.views.explain import provenance

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str, path: Path = None):
    path = path or EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def port():
    module = _load("gpt2_qkvflow")
    return module, qf.trace(module.model())


PORTS = {"gpt2": ("def gelu", 5, 2), "transformer": ("def softmax", 13, 6), "llama": ("def softmax", 4, 1)}


@pytest.mark.parametrize("name", PORTS)
def test_the_port_changes_only_the_lines_it_marks(name):
    first, marked, dropped = PORTS[name]
    plain = (EXAMPLES / f"{name}_numpy.py").read_text().split('\n\nif __name__ == "__main__":')[0].splitlines()
    ported = (EXAMPLES / f"{name}_qkvflow.py").read_text().split("# --- port:")[0].splitlines()
    body = lambda lines: lines[next(i for i, t in enumerate(lines) if t.startswith(first)):]  # noqa: E731
    diff = list(difflib.ndiff(body(plain), body(ported)))
    words = lambda line: " ".join(line.split())  # noqa: E731 - the same line, re-indented
    removed = {words(line[2:]) for line in diff if line.startswith("- ")}
    added = [line[2:] for line in diff if line.startswith("+ ") and line[2:].strip()]
    # Every new line is marked, or is an old line indented into the stream scope.
    unmarked = [line for line in added if not line.rstrip().endswith("# port") and words(line) not in removed]
    assert not unmarked, unmarked
    assert sum(line.rstrip().endswith("# port") for line in added) == marked
    assert len(removed - {words(line) for line in added}) == dropped  # lines the marked ones replace


def test_the_port_checks_clean_and_runs_equal_to_numpy(port):
    module, g = port
    assert qf.check(g, strict=True) == []
    assert not any(s["rotary"] for r in g.graph["attention"].values() for s in r["sites"])  # learned positions
    (row,) = provenance(g)
    assert (row["attention"], row["mask"], row["count"]) == ("masked self-attention", "causal", 2)
    plain = _load("gpt2_numpy")
    params = qf.init_params(g, seed=7)
    ids = np.random.default_rng(2).integers(0, 29, (2, 9))
    logits = qf.forward(g, params, ids=ids)["logits"]
    want = plain.gpt2(ids, **qf.nest_params(params), n_head=3)
    assert logits.shape == (2, 9, 29) and np.abs(logits - want).max() <= 1e-12
    assert np.abs(qf.eager(module.model(), params, {"ids": ids})["logits"] - want).max() <= 1e-12
    assert "gpt stream" in qf.render(g, fmt="mmd")


def test_the_port_runs_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "qkvflow", "run", f"{EXAMPLES / 'gpt2_qkvflow.py'}:model",
                           "--ids", "5 6 7"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "logits: shape (1, 3, 29) (batch, seq, vocab), dtype float64"


def test_the_encoder_decoder_port_gives_the_textbook_table_and_numpy_logits():
    module = _load("transformer_qkvflow")
    g = qf.trace(module.model())
    assert qf.check(g, strict=True) == []
    rows = [(r["attention"], r["q"], r["k"], r["v"], r["mask"], r["count"]) for r in provenance(g)]
    assert rows == [
        ("encoder self-attention", "encoder stream", "encoder stream", "encoder stream", "source padding", 2),
        ("masked decoder self-attention", "decoder stream", "decoder stream", "decoder stream",
         "causal + target padding", 2),
        ("cross-attention", "decoder stream", "encoder final output", "encoder final output", "source padding", 2)]
    assert all(len(r["sites"]) == 3 for r in g.graph["attention"].values())  # one softmax per head
    plain = _load("transformer_numpy")
    params = qf.init_params(g, seed=3)
    rng = np.random.default_rng(5)
    src, tgt = rng.integers(1, 29, (2, 8)), rng.integers(1, 29, (2, 6))
    src[1, -3:] = 0
    tgt[0, -2:] = 0
    logits = qf.forward(g, params, src, tgt)["logits"]
    assert np.abs(logits - plain.transformer(src, tgt, **qf.nest_params(params))).max() <= 1e-12


def test_the_llama_port_with_rotary_positions_and_grouped_queries_runs_equal_to_numpy():
    module = _load("llama_qkvflow")
    g = qf.trace(module.model())
    assert qf.check(g, strict=True) == []
    block = g.graph["attention"]["llama.layers.1.self_attn"]
    assert [g.nodes[n]["shape"] for n in g if n.startswith("llama.layers.1.self_attn.repeat")] == [
        ("batch", "heads", "seq", "d_head")] * 2
    assert block["sites"][0]["masks"] == ["causal"]
    assert block["sites"][0]["rotary"] is True  # Q and K rotated by sin/cos of np.arange(T)
    plain = _load("llama_numpy")
    params = qf.init_params(g, seed=11)
    ids = np.random.default_rng(3).integers(0, 29, (2, 9))
    logits = qf.forward(g, params, ids=ids)["logits"]
    assert np.abs(logits - plain.llama(ids, **qf.nest_params(params), n_head=4, n_kv_head=2)).max() <= 1e-12


@pytest.mark.parametrize("name, family", [("gpt2", "masked self-attention"), ("llama", "masked self-attention"),
                                          ("transformer", "cross-attention")])
def test_every_port_explains_and_renders(name, family):
    g = qf.trace(_load(f"{name}_qkvflow").model())
    assert family in {r["attention"] for r in provenance(g)}
    assert "causal" in qf.explain(g, lang="en") and "因果掩码" in qf.explain(g, lang="zh")
    text = qf.render(g, fmt="mmd")
    assert text.startswith("flowchart TB") and "mask: causal" in text


@pytest.mark.parametrize("name, old, new, code", [
    ("gpt2", "softmax(np.where(causal, s, -1e10))", "softmax(s)", "QKV401"),
    ("gpt2", "/ np.sqrt(D // n_head)", "/ np.sqrt(D)", "QKV207"),
    ("transformer", "cross(y, memory, src_keep[:, None, :], W[\"cross\"])",
     "cross(y, y, src_keep[:, None, :], W[\"cross\"])", "QKV301"),
    ("transformer", "encoder_self(x, x, src_keep[:, None, :], W[\"self\"])",
     "encoder_self(x, x, src_keep[:, :, None], W[\"self\"])", "QKV402"),
    ("transformer", "keep = np.tril(np.ones((T, T), dtype=bool))[None] &",
     "keep = np.ones((T, T), dtype=bool)[None] &", "QKV401"),
    ("llama", "k = np.repeat(k, n_head // n_kv_head, axis=1)", "k = np.repeat(k, n_head // n_kv_head, axis=2)",
     "QKV201"),
    ("llama", "causal = np.tril(np.ones((T, T), dtype=bool))", "causal = np.tril(np.ones((T, T), dtype=bool), k=1)",
     "QKV401"),
    ("llama", "q, k = rope(q, T), rope(k, T)", "q, k = rope(q, T), rope(v, T)", "QKV307"),
], ids=["gpt2-no-causal-mask", "gpt2-scaled-by-d_model", "transformer-cross-reads-the-decoder",
        "transformer-padding-on-the-query-axis", "transformer-no-causal-triangle", "llama-repeat-over-positions",
        "llama-mask-one-step-ahead", "llama-k-rotated-from-v"])
def test_mistakes_planted_in_a_port_are_found(tmp_path, name, old, new, code):
    source = (EXAMPLES / f"{name}_qkvflow.py").read_text()
    assert old in source
    path = tmp_path / "planted.py"
    path.write_text(source.replace(old, new))
    found = qf.check(qf.trace(_load("planted", path).model()))
    assert code in {d.code for d in found}, [d.text() for d in found]

