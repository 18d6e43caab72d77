"""The ``qkvflow`` command line, end to end.

Subprocess runs (``python -m qkvflow``) prove what a shell sees: exit codes,
one-line errors, no traceback. The rest goes through ``cli.main`` in-process,
which is the same code without the interpreter start-up.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

import qkvflow as qf
from qkvflow import cli

PRESETS = ("vaswani-base", "torch-transformer", "tiny")
SARIF_SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"  # SARIF 2.1.0, OASIS

def shell(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkvflow", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, nothing on stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qkvflow: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


BROKEN = '''\
"""A cross-attention that is declared to read the memory but reads the decoder."""

import math

import numpy as np
from jaxtyping import Bool, Float

import qkvflow
from qkvflow import nn, transformer


@qkvflow.nn.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_reading_the_decoder(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Q from the decoder stream; K and V (wrongly) from the decoder stream too."""
    q = nn.split_heads(nn.linear(y, "heads*d_head", name="q_proj"))   # (batch, heads, tgt, d_head)
    k = nn.split_heads(nn.linear(y, "heads*d_head", name="k_proj"))   # BUG-K: y, not memory
    v = nn.split_heads(nn.linear(y, "heads*d_head", name="v_proj"))   # BUG-V: y, not memory
    s = nn.scores(q, k, scale=1.0 / math.sqrt(qkvflow.dim("d_head")))  # (batch, heads, tgt, tgt)
    p = nn.softmax(nn.mask(s, src_keep[:, None, None, :]), axis=-1)   # BUG-MASK: src mask on tgt keys
    o = nn.merge_heads(nn.attend(p, v))                                # (batch, tgt, heads*d_head)
    return nn.linear(o, "d_model", name="out_proj")                    # (batch, tgt, d_model)


def broken():
    return transformer.build(qkvflow.preset("tiny"), cross=cross_reading_the_decoder)
'''


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "broken_cross.py"
    path.write_text(BROKEN, encoding="utf-8")
    lines = BROKEN.splitlines()
    marks = {tag: 1 + next(i for i, line in enumerate(lines) if tag in line)
             for tag in ("BUG-K", "BUG-V", "BUG-MASK")}
    return f"{path}:broken", path, marks


# --- presets, trace ------------------------------------------------------------------

def test_presets_lists_every_preset():
    proc = shell("presets")
    assert proc.returncode == 0 and proc.stderr == ""
    names = [line.split()[0] for line in proc.stdout.strip().splitlines()]
    assert sorted(names) == sorted(qf.PRESETS) and set(PRESETS) < set(names)
    assert "heads 3, d_head 7" in proc.stdout


def test_trace_table(capsys):
    code, out, err = main(capsys, "trace", "tiny")
    g = qf.trace(qf.load_model("tiny"))
    lines = out.strip().splitlines()
    assert code == 0 and err == ""
    assert len(lines) == g.number_of_nodes() + 1
    assert lines[0].split() == ["path", "op", "inputs", "shape"]
    assert any(re.match(r"decoder\.layers\.0\.cross_attn\.k_proj\s+linear\s+k=encoder\.layers\.1\.norm2", ln)
               for ln in lines)


def test_trace_json_parses(capsys, tmp_path):
    code, out, _ = main(capsys, "trace", "tiny", "--format", "json")
    data = json.loads(out)
    assert code == 0
    assert len(data["nodes"]) == qf.trace(qf.load_model("tiny")).number_of_nodes()
    assert data["graph"]["memory"] == "encoder.layers.1.norm2"
    assert {e["role"] for e in data["edges"]} >= {"q", "k", "v", "mask", "residual"}
    code, out, _ = main(capsys, "trace", "vaswani-base", "--format", "json", "-o", tmp_path / "g.json")
    assert code == 0 and out == ""
    assert len(json.loads((tmp_path / "g.json").read_text())["graph"]["attention"]) == 18


def test_trace_graphml_file(capsys, tmp_path):
    path = tmp_path / "tiny.graphml"
    code, _, _ = main(capsys, "trace", "tiny", "--format", "graphml", "-o", path)
    assert code == 0
    g = nx.read_graphml(path)
    assert g.number_of_nodes() == qf.trace(qf.load_model("tiny")).number_of_nodes()
    assert g.nodes["decoder.layers.0.cross_attn.scores"]["shape"] == "('batch', 'heads', 'tgt', 'src')"
    roles = {d["role"] for _, _, d in g.edges(data=True)}
    assert {"q", "k", "v"} <= roles


def test_trace_graphml_to_stdout():
    proc = shell("trace", "tiny", "--format", "graphml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("<?xml")
    assert "Traceback" not in proc.stderr


def test_trace_json_sources_name_real_files():
    proc = shell("trace", "tiny", "--format", "json")
    assert proc.returncode == 0
    sources = {n["source"] for n in json.loads(proc.stdout)["nodes"]}
    assert len(sources) > 10  # one line per op kind at least, not one for the whole model
    for source in sources:
        assert Path(source.rpartition(":")[0]).is_file(), source


# --- check ---------------------------------------------------------------------------------

def test_check_every_preset_is_clean():
    proc = shell("check", *PRESETS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "3 model(s) checked: 0 error(s), 0 warning(s)"


@pytest.mark.parametrize("name", PRESETS)
def test_check_each_preset_in_process(capsys, name):
    code, out, _ = main(capsys, "check", name, "--format", "json")
    assert code == 0
    assert json.loads(out) == []


def test_check_broken_model_file_exits_1_and_names_the_lines(broken_model):
    spec, path, marks = broken_model
    proc = shell("check", spec)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert re.search(r"QKV301 decoder\.layers\.0\.cross_attn: K comes from decoder stream", out)
    assert re.search(r"QKV301 decoder\.layers\.1\.cross_attn: V comes from decoder stream", out)
    assert "QKV205" in out
    summary = out.strip().splitlines()[-1]
    counts = re.match(r"1 model\(s\) checked: (\d+) error\(s\), (\d+) warning\(s\)", summary)
    errors, warnings = int(counts.group(1)), int(counts.group(2))
    assert errors == out.count(": error: ") >= 5 and warnings == out.count(": warning: ")
    # The memory is never read, so the whole encoder is dead weight: one warning for it.
    assert warnings == 1 and "warning: QKV308 encoder.layers.1.norm2" in out
    assert f"{path}:{marks['BUG-K']}: error: QKV301" in out


def by_code_of(found: list, *codes: str) -> list:
    return [d for d in found if d["code"] in codes]


def test_check_json_format(capsys, broken_model):
    spec, path, marks = broken_model
    code, out, _ = main(capsys, "check", spec, "--format", "json")
    assert code == 1
    found = json.loads(out)
    assert found and all(set(d) == {"code", "severity", "message", "node", "source", "model"} for d in found)
    assert all(d["model"] == "tiny" for d in found)
    assert {d["severity"] for d in by_code_of(found, "QKV301", "QKV205")} == {"error"}
    by_code = {}
    for d in found:
        by_code.setdefault(d["code"], []).append(d)
    k = [d for d in by_code["QKV301"] if "K comes from" in d["message"]]
    v = [d for d in by_code["QKV301"] if "V comes from" in d["message"]]
    assert len(k) == len(v) == 2  # both decoder layers
    assert {d["source"] for d in k} == {f"{path}:{marks['BUG-K']}"}
    assert {d["source"] for d in v} == {f"{path}:{marks['BUG-V']}"}
    assert {d["source"] for d in by_code["QKV205"]} == {f"{path}:{marks['BUG-MASK']}"}
    assert "declared: the encoder's final output" in k[0]["message"]


def test_check_sarif_format(capsys, broken_model):
    import jsonschema
    spec, path, marks = broken_model
    code, out, _ = main(capsys, "check", spec, "--format", "sarif")
    assert code == 1
    doc = json.loads(out)
    jsonschema.validate(doc, json.loads(SARIF_SCHEMA.read_text(encoding="utf-8")))
    assert doc["version"] == "2.1.0"
    run = doc["runs"][0]
    assert run["tool"]["driver"]["name"] == "qkvflow"
    rule_ids = {r["id"] for r in run["tool"]["driver"]["rules"]}
    results = run["results"]
    assert {r["ruleId"] for r in results} <= rule_ids
    k = [r for r in results if r["ruleId"] == "QKV301" and "K comes from" in r["message"]["text"]]
    assert k
    loc = k[0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == str(path)
    assert loc["region"]["startLine"] == marks["BUG-K"]
    # a clean model gives a valid SARIF log with no results
    code, out, _ = main(capsys, "check", "tiny", "--format", "sarif")
    assert code == 0 and json.loads(out)["runs"][0]["results"] == []


def test_check_github_format(capsys, broken_model):
    spec, path, marks = broken_model
    code, out, _ = main(capsys, "check", spec, "--format", "github")
    assert code == 1
    lines = out.strip().splitlines()
    assert lines and all(re.match(r"::(error|warning) file=[^,]+,line=\d+,title=QKV\d{3}::\S", ln) for ln in lines)
    assert f"::error file={path},line={marks['BUG-K']},title=QKV301::" in out


def test_check_strict_and_output_file(capsys, tmp_path):
    out_file = tmp_path / "report.txt"
    code, out, _ = main(capsys, "check", "tiny", "--strict", "-o", out_file)
    assert code == 0 and out == f"wrote {out_file}: 0 error(s), 0 warning(s)\n"
    assert out_file.read_text().strip() == "1 model(s) checked: 0 error(s), 0 warning(s)"


def test_check_reports_zero_heads_as_a_finding(tmp_path):
    (tmp_path / "noheads.toml").write_text('preset = "tiny"\nheads = 0\n', encoding="utf-8")
    proc = shell("check", tmp_path / "noheads.toml")
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 1
    assert "QKV103" in proc.stdout and "heads" in proc.stdout


def test_check_reports_config_constraints_with_exit_1(capsys, tmp_path):
    (tmp_path / "h4.toml").write_text('preset = "tiny"\nheads = 4\n', encoding="utf-8")
    code, out, _ = main(capsys, "check", tmp_path / "h4.toml")
    assert code == 1
    assert "QKV101 d_model = 21 is not divisible by heads = 4" in out


# --- explain ------------------------------------------------------------------------------------

def test_explain_zh_markdown(capsys):
    code, out, _ = main(capsys, "explain", "tiny", "--lang", "zh", "--format", "md")
    assert code == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == 4  # header + the three attention kinds
    cross = next(r for r in rows if r.startswith("| 交叉注意力 "))
    cells = [c.strip() for c in cross.strip("|").split("|")]
    assert cells[3] == cells[4] == "编码器的最终输出"  # K and V from the encoder's final output
    assert any(r.startswith("| 带掩码的解码器自注意力 ") and "因果掩码" in r for r in rows)


def test_explain_zh_json(capsys):
    code, out, _ = main(capsys, "explain", "vaswani-base", "--lang", "zh", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["lang"] == "zh" and data["model"] == "vaswani-base"
    kinds = {r["kind"]: r for r in data["rows"]}
    assert set(kinds) == {"encoder_self", "decoder_self", "cross"}
    assert kinds["cross"]["count"] == 6
    assert kinds["cross"]["k"] == kinds["cross"]["v"] == "编码器的最终输出"


def test_explain_shows_a_rewired_model(capsys, broken_model):
    spec, _, _ = broken_model
    code, out, _ = main(capsys, "explain", spec, "--format", "json")
    assert code == 0
    cross = next(r for r in json.loads(out)["rows"] if r["kind"] == "cross")
    assert "final output" not in cross["k"] and "decoder" in cross["k"]


# --- render ---------------------------------------------------------------------------------------

def test_public_render_api():
    g = qf.trace(qf.load_model("tiny"))
    text = qf.render(g, fmt="mmd")
    assert text.splitlines()[0] == "flowchart TB"


@pytest.mark.parametrize("suffix, head", [(".dot", "digraph"), (".mmd", "flowchart"), (".svg", "<svg")])
def test_render_writes_the_file(tmp_path, suffix, head):
    out = tmp_path / f"tiny{suffix}"
    proc = shell("render", "tiny", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"wrote {out}" in proc.stdout
    text = out.read_text(encoding="utf-8")
    assert head in text[:2000]
    if suffix != ".svg":
        assert "cross" in text


def test_render_to_an_unwritable_path_is_one_line(tmp_path):
    assert_usage_error(shell("render", "tiny", "-o", tmp_path / "missing" / "x.dot"), "x.dot")


# --- run ----------------------------------------------------------------------------------------------

def test_run_prints_logits_shape_and_the_top_tokens(capsys):
    src, tgt = "5 6 7 8 9 10 11 12 13 2 0", "1 20 21 22 23"
    code, out, err = main(capsys, "run", "tiny", "--src", src, "--tgt", tgt, "--top", "2", "--seed", "4")
    assert code == 0 and err == ""
    said, *lines = out.strip().splitlines()
    assert said == "weights: seeded random (seed 4; --params FILE for real ones)"
    assert lines[0] == "logits: shape (1, 5, 41) (batch, tgt, vocab), dtype float64"
    assert lines.pop(1) == "top 2 token ids per tgt position (batch row 0), as id (logit):"
    assert len(lines) == 1 + 5
    g = qf.trace(qf.load_model("tiny"))
    logits = qf.forward(g, qf.init_params(g, seed=4), np.array([[int(t) for t in src.split()]]),
                        np.array([[int(t) for t in tgt.split()]]))["logits"][0]
    for t, line in enumerate(lines[1:]):
        m = re.fullmatch(r"\s*tgt\[(\d+)\]: (\d+) \((-?\d+\.\d{3})\), (\d+) \((-?\d+\.\d{3})\)", line)
        assert m, line
        assert int(m.group(1)) == t
        best = np.argsort(-logits[t], kind="stable")[:2]
        assert [int(m.group(2)), int(m.group(4))] == best.tolist()
        assert float(m.group(3)) == pytest.approx(logits[t, best[0]], abs=5e-4)


def test_run_float32_with_saved_params_and_activations(capsys, tmp_path):
    g = qf.trace(qf.load_model("tiny"))
    params = qf.init_params(g, seed=8)
    qf.save_params(params, tmp_path / "w.npz")
    acts = tmp_path / "acts.safetensors"
    code, out, _ = main(capsys, "run", "tiny", "--src", "5 6 7", "--tgt", "1 8", "--params",
                        tmp_path / "w.npz", "--dtype", "float32", "--save-activations", acts)
    assert code == 0
    assert out.splitlines()[0].startswith("weights: ")
    assert out.splitlines()[1] == "logits: shape (1, 2, 41) (batch, tgt, vocab), dtype float32"
    saved = qf.load_params(acts)
    want = qf.forward(g, params, np.array([[5, 6, 7]]), np.array([[1, 8]]), dtype="float32")["logits"]
    np.testing.assert_array_equal(saved["logits"], want)
    assert "decoder.layers.1.cross_attn.softmax" in saved


# --- exit 2: one line, no traceback -------------------------------------------------------------------

def test_missing_toml_file(tmp_path):
    assert_usage_error(shell("check", tmp_path / "nope.toml"), "nope.toml", "does not exist")


def test_malformed_toml(tmp_path):
    (tmp_path / "bad.toml").write_text('preset = "tiny"\nheads = \n', encoding="utf-8")
    assert_usage_error(shell("trace", tmp_path / "bad.toml"), "bad.toml", "not valid TOML")


def test_unknown_preset(tmp_path):
    assert_usage_error(shell("check", "tinyy"), "'tinyy'", "tiny", "vaswani-base")
    (tmp_path / "p.toml").write_text('preset = "huge"\n', encoding="utf-8")
    assert_usage_error(shell("check", tmp_path / "p.toml"), "unknown preset 'huge'", "torch-transformer")


def test_unknown_toml_key_is_named(tmp_path):
    (tmp_path / "k.toml").write_text('preset = "tiny"\nd_modle = 21\n', encoding="utf-8")
    line = assert_usage_error(shell("check", tmp_path / "k.toml"), "unknown key 'd_modle'")
    assert "d_model" in line  # the accepted keys are listed


def test_bad_value_names_the_accepted_values(tmp_path):
    (tmp_path / "v.toml").write_text('preset = "tiny"\nactivation = "swish"\n', encoding="utf-8")
    assert_usage_error(shell("explain", tmp_path / "v.toml"), "activation", "'swish'", "relu, gelu")


def test_wrong_type_is_named(capsys, tmp_path):
    (tmp_path / "t.toml").write_text('preset = "tiny"\nheads = "3"\n', encoding="utf-8")
    code, out, err = main(capsys, "check", tmp_path / "t.toml")
    assert code == 2 and out == ""
    assert err.strip() == f"qkvflow: error: {tmp_path / 't.toml'}: heads must be int, got str '3'"


def test_token_id_out_of_range():
    assert_usage_error(shell("run", "tiny", "--src", "5 41 7", "--tgt", "1 8"),
                       "token id 41", "0..40")


@pytest.mark.parametrize("src", ["", "5 six 7"])
def test_bad_token_text(capsys, src):
    code, out, err = main(capsys, "run", "tiny", "--src", src, "--tgt", "1")
    assert code == 2 and out == ""
    assert err.startswith("qkvflow: error: --src") and err.count("\n") == 1


def test_unwritable_output_path(tmp_path):
    assert_usage_error(shell("trace", "tiny", "--format", "json", "-o", tmp_path / "missing" / "g.json"),
                       "cannot write", "g.json")
    assert not (tmp_path / "missing").exists()


def test_output_path_that_is_a_directory(capsys, tmp_path):
    code, _, err = main(capsys, "explain", "tiny", "-o", tmp_path)
    assert code == 2 and "is a directory" in err and err.count("\n") == 1


def test_params_file_with_a_wrong_shape(tmp_path):
    g = qf.trace(qf.load_model("tiny"))
    params = qf.init_params(g)
    params["decoder.layers.1.linear2.weight"] = params["decoder.layers.1.linear2.weight"].T.copy()
    qf.save_params(params, tmp_path / "w.safetensors")
    assert_usage_error(
        shell("run", "tiny", "--src", "5 6 7", "--tgt", "1 8", "--params", tmp_path / "w.safetensors"),
        "decoder.layers.1.linear2.weight", "(29, 21)", "(21, 29)")


def test_params_file_with_pickled_objects_is_refused(capsys, tmp_path):
    np.savez(tmp_path / "evil.npz", w=np.array([{"a": 1}], dtype=object))
    code, out, err = main(capsys, "run", "tiny", "--src", "5", "--tgt", "1", "--params", tmp_path / "evil.npz")
    assert code == 2 and "cannot be read" in err and err.count("\n") == 1


def test_model_file_problems_are_one_line(tmp_path):
    assert_usage_error(shell("check", f"{tmp_path / 'nothere.py'}:make"), "nothere.py", "does not exist")
    (tmp_path / "raises.py").write_text(textwrap.dedent("""\
        def make():
            raise RuntimeError("no model today")
        """), encoding="utf-8")
    assert_usage_error(shell("check", f"{tmp_path / 'raises.py'}:make"), "no model today")


# --- demo ---------------------------------------------------------------------------------------------

def test_demo_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    proc = shell("demo", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("graph.json", "check.txt", "check.sarif", "explain.txt", "explain.zh.txt",
                 "dataflow.dot", "dataflow.mmd", "dataflow-op.dot", "params.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "graph.json").read_text())["graph"]["model"] == "toy-en-zh"
    assert "交叉注意力" in (out / "explain.zh.txt").read_text(encoding="utf-8")
    g = qf.trace(qf.load_model("toy-en-zh"))
    assert set(qf.load_params(out / "params.safetensors")) == set(qf.init_params(g))
    assert "logits: shape (1, 4, 73)" in proc.stdout  # "<bos> 我 爱 中国"
    # the shipped translator tells the seed's story: one word at a time, each from its source word
    told = (out / "translate.txt").read_text(encoding="utf-8")
    assert told.startswith("I love China  ->  我 爱 中国\n")
    for word, source in (("我", "I"), ("爱", "love"), ("中国", "China")):
        assert re.search(rf": {word}\n.*\n.*most weight on {source} \(0\.\d\d\)", told), word


def test_demo_in_chinese_and_of_a_seeded_model(tmp_path):
    proc = shell("demo", "--out", tmp_path / "zh", "--lang", "zh")
    assert proc.returncode == 0, proc.stderr
    assert "第 3 个词：中国" in proc.stdout and "权重最大的是 China" in proc.stdout
    proc = shell("demo", "--model", "tiny", "--out", tmp_path / "tiny")
    assert proc.returncode == 0, proc.stderr
    assert "seeded random weights, seed 0" in proc.stdout and not (tmp_path / "tiny" / "translate.txt").exists()


TRACE_CRASH = """
import numpy as np
from jaxtyping import Bool, Float
import qkvflow as qf
from qkvflow.models.encoder_decoder import build, multi_head_attention


@qf.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="causal+src_padding")
def block(x: Float[np.ndarray, "batch src d_model"],
          src_keep: Bool[np.ndarray, "batch src"]) -> Float[np.ndarray, "batch src d_model"]:
    S = x.shape[1]
    causal = np.eye(S, dtype=bool)  # a data dim has no size while tracing
    return multi_head_attention(x, x, causal & src_keep[:, None, None, :])


def model():
    return build(qf.preset("tiny"), encoder_self=block)
"""


def test_model_code_failing_while_traced_is_one_line_naming_its_line(tmp_path):
    path = tmp_path / "crash.py"
    path.write_text(TRACE_CRASH)
    result = shell("check", f"{path}:model")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"crash.py:{TRACE_CRASH.splitlines().index('    causal = np.eye(S, dtype=bool)  # a data dim has no size while tracing') + 1}" in result.stderr


def test_negative_size_is_a_finding_not_a_crash(tmp_path):
    path = tmp_path / "negative.toml"
    path.write_text('preset = "tiny"\nd_model = -3\n')
    result = shell("check", path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "QKV103 d_model = -3" in result.stdout


@pytest.mark.parametrize("argv, words", [
    (["run", "tiny", "--src", "99999999999999999999999", "--tgt", "1"], "is not a token id"),
    (["run", "tiny", "--src", "3", "--tgt", "1", "--seed", "-1"], "seed must be a non-negative integer"),
    (["check", ":x"], "expected package.module:factory"),
    (["check", "..:x"], "expected package.module:factory"),
])
def test_odd_arguments_are_usage_errors(argv, words):
    result = shell(*argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert words in result.stderr


def test_a_model_file_that_exits_cannot_end_the_check(tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import sys\nsys.exit(0)\n")
    result = shell("check", f"{path}:model")
    assert result.returncode == 2 and "SystemExit" in result.stderr


# --- a graph file as MODEL ------------------------------------------------------------------

def test_a_graph_file_is_a_model_for_every_command(capsys, tmp_path, broken_model):
    spec, _, _ = broken_model
    for model in ("tiny", spec):
        graph = tmp_path / f"{abs(hash(model))}.json"
        assert main(capsys, "trace", model, "--format", "json", "-o", graph)[0] == 0
        for command in (["check", "--format", "json"], ["explain", "--lang", "zh"]):
            traced = main(capsys, command[0], model, *command[1:])
            assert main(capsys, command[0], graph, *command[1:]) == traced
        for fmt in ("mmd", "dot"):
            main(capsys, "render", model, "-o", tmp_path / f"a.{fmt}")
            main(capsys, "render", graph, "-o", tmp_path / f"b.{fmt}")
            assert (tmp_path / f"a.{fmt}").read_text() == (tmp_path / f"b.{fmt}").read_text()
    graph = tmp_path / "tiny.json"
    main(capsys, "trace", "tiny", "--format", "json", "-o", graph)
    run = ["--src", "5 6 7 0", "--tgt", "1 8 9", "--dtype", "float32"]
    assert main(capsys, "run", graph, *run) == main(capsys, "run", "tiny", *run)


def test_a_broken_graph_file_is_one_line_and_exit_2(tmp_path):
    graph = tmp_path / "g.json"
    graph.write_text("{not json")
    assert_usage_error(shell("check", graph), "g.json", "is not a qkvflow graph")
    graph.write_text('{"nodes": 3}')
    assert_usage_error(shell("explain", graph), "is not a qkvflow graph")
    good = json.loads(qf.ir.graph.to_json(qf.trace(qf.load_model("tiny"))))
    good["nodes"][0]["op"] = "conv2d"
    graph.write_text(json.dumps(good))
    assert_usage_error(shell("render", graph, "-o", tmp_path / "x.mmd"), "is not a qkvflow graph", "conv2d")
    assert_usage_error(shell("check", tmp_path / "missing.json"), "missing.json", "cannot be read")


def test_run_feeds_a_model_with_one_input_through_ids(capsys):
    lm = f"{Path(__file__).parent / 'single_stream.py'}:decoder_only"
    code, out, _ = main(capsys, "run", lm, "--ids", "1 2 3 4", "--top", "2")
    assert code == 0
    lines = out.splitlines()[1:]
    assert lines[0] == "logits: shape (1, 4, 53) (batch, seq, vocab), dtype float64"
    assert [line.split(":")[0].strip() for line in lines[2:]] == ["seq[0]", "seq[1]", "seq[2]", "seq[3]"]
    assert_usage_error(shell("run", lm, "--src", "1 2", "--tgt", "3"),
                       "takes 1 input(s), ids: give --ids (its input ids)")
    assert_usage_error(shell("run", "tiny", "--ids", "1 2"),
                       "takes 2 input(s), src_ids, tgt_ids: give --src (its input src_ids) and --tgt")


def test_demo_of_a_model_it_cannot_feed_writes_nothing(tmp_path):
    lm = f"{Path(__file__).parent / 'single_stream.py'}:decoder_only"
    assert_usage_error(shell("demo", "--model", lm, "--src", "1 2", "--out", tmp_path / "d"), "give --ids")
    assert not (tmp_path / "d").exists()


def test_run_refuses_odd_ids_and_counts(tmp_path):
    assert_usage_error(shell("run", "tiny", "--src", "5 ²", "--tgt", "1"), "'²' is not a token id")
    for top in ("0", "-5"):
        proc = shell("run", "tiny", "--src", "5", "--tgt", "1", "--top", top)
        assert proc.returncode == 2 and "expected a positive integer" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_translates_words_and_refuses_unknown_ones():
    proc = shell("generate", "toy-en-zh", "--src", "you like tea", "--beam", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].strip() == "<bos> 你 喜欢 茶 <eos>"
    assert "beam search (2 beams), incremental (KV cache)" in proc.stdout
    assert_usage_error(shell("generate", "toy-en-zh", "--src", "I love Mars"),
                       "'Mars' is neither a word of the model's vocabulary (73 words) nor a token id")
    assert_usage_error(shell("generate", "bert-tiny", "--ids", "5 6"), "bidirectional, not causal")
    assert_usage_error(shell("generate", "tiny", "--ids", "5 6"), "generates from --src (its input src_ids)")
    proc = shell("generate", "toy-en-zh", "--src", "I love China", "--sample", "--temperature", "0")
    assert proc.returncode == 2 and "0 is not a positive number" in proc.stderr
