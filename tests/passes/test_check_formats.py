"""Diagnostics people can act on: formats, strictness, several models, pytest helper."""

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from jaxtyping import Bool, Float

import qkvflow as qf
from qkvflow.passes.checks import CODES, check
from qkvflow.passes.formats import format_diagnostics
from qkvflow.cli import main
from qkvflow.testing import assert_clean
from qkvflow.models.encoder_decoder import build, multi_head_attention

SCHEMA = json.loads((Path(__file__).parents[1] / "data" / "sarif-schema-2.1.0.json").read_text())


@qf.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_reads_decoder(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Declared to read the memory, but K and V are computed from the decoder."""
    return multi_head_attention(y, y, src_keep[:, None, None, :])  # the mistake


@qf.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="causal+src_padding")
def causal_encoder(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention that is (perhaps deliberately) causal."""
    causal = qf.nn.causal_mask(src_keep)
    return multi_head_attention(x, x, causal[None, None, :, :] & src_keep[:, None, None, :])


def broken_model():
    return build(qf.preset("tiny"), cross=cross_reads_decoder)


def warning_model():
    return build(qf.preset("tiny"), encoder_self=causal_encoder)


@pytest.fixture(scope="module")
def findings():
    return check(qf.trace(broken_model()))


def test_broken_model_findings_carry_code_node_and_line(findings):
    codes = {d.code for d in findings}
    assert "QKV301" in codes
    d = next(d for d in findings if d.code == "QKV301")
    assert d.severity == "error"
    assert d.node.startswith("decoder.layers.0.cross_attn")
    assert d.source.endswith(f"test_check_formats.py:{_line_of('# the mistake')}")
    assert "encoder's final output" in d.message and "decoder" in d.message


def _line_of(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.rstrip().endswith(marker))


def test_sarif_is_valid_against_the_official_schema(findings):
    sarif = json.loads(format_diagnostics(findings, "sarif"))
    jsonschema.validate(sarif, SCHEMA)
    results = sarif["runs"][0]["results"]
    assert len(results) == len(findings)
    assert {r["ruleId"] for r in results} <= set(CODES)
    located = [r for r in results if "physicalLocation" in r["locations"][0]]
    assert located and all(r["locations"][0]["physicalLocation"]["region"]["startLine"] >= 1 for r in located)


def test_clean_sarif_is_valid_too():
    sarif = json.loads(format_diagnostics(check(qf.trace(qf.load_model("tiny"))), "sarif"))
    jsonschema.validate(sarif, SCHEMA)
    assert sarif["runs"][0]["results"] == []


def test_json_and_github_formats(findings):
    rows = json.loads(format_diagnostics(findings, "json"))
    assert {"code", "severity", "message", "node", "source", "model"} <= set(rows[0])
    lines = format_diagnostics(findings, "github").splitlines()
    assert len(lines) == len(findings)
    kinds = [line.split(" ", 1)[0] for line in lines]
    assert kinds == ["::" + d.severity for d in findings]
    assert all(" file=" in line and "title=QKV" in line for line in lines)


def test_text_format_is_compiler_style(findings):
    text = format_diagnostics(findings, "text")
    first = text.splitlines()[0]
    assert ": error: QKV" in first
    errors = sum(d.severity == "error" for d in findings)
    assert text.splitlines()[-1].endswith(f"{errors} error(s), {len(findings) - errors} warning(s)")


def test_warning_is_not_an_error_unless_strict(capsys):
    spec = f"{__file__}:warning_model"
    assert main(["check", spec]) == 0
    assert "warning: QKV403" in capsys.readouterr().out
    assert main(["check", "--strict", spec]) == 1
    assert "error: QKV403" in capsys.readouterr().out


def test_several_models_in_one_call(capsys):
    assert main(["check", "tiny", "vaswani-base"]) == 0
    assert "2 model(s) checked: 0 error(s)" in capsys.readouterr().out
    assert main(["check", "tiny", f"{__file__}:broken_model", "--format", "json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert {r["model"] for r in rows} == {"tiny"} and any(r["code"] == "QKV301" for r in rows)


def test_assert_clean_passes_presets_and_fails_with_every_finding():
    assert_clean("tiny")
    with pytest.raises(AssertionError) as err:
        assert_clean(broken_model())
    assert "QKV301" in str(err.value) and "decoder.layers.1.cross_attn" in str(err.value)


def test_a_damaged_graph_is_reported_not_crashed_on():
    g = qf.trace(qf.load_model("tiny"))
    g.nodes["decoder.layers.0.cross_attn.k_proj"]["shape"] = ("batch", "tgt", "heads*d_head")
    found = check(g)
    assert [d.code for d in found] == ["QKV206"] or "QKV206" in {d.code for d in found}
    d = next(d for d in found if d.code == "QKV206")
    assert d.node == "decoder.layers.0.cross_attn.k_proj" and "src" in d.message
    g.add_edge("logits", "src_ids", role="x", arg=0)
    g.nodes["masks.causal"]["op"] = "conv2d"
    structural = check(g)
    assert {d.code for d in structural} == {"QKV001"}
    messages = " ".join(d.message for d in structural)
    assert "cycle" in messages and "unknown op 'conv2d'" in messages


def test_mask_declarations_are_validated():
    with pytest.raises(qf.QkvflowError, match="mask='causal\\+padding'"):
        qf.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+padding")
