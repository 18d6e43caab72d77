"""The bug zoo: every realistic mistake is reported with its code, node and line.

Each entry of :mod:`zoo` is a small model with one mistake marked
``# BUG(<entry>)`` in its source. The checker must report the entry's code
at its node and on that line. Entries marked ``size_silent`` are also run
eagerly, the same broken code on concrete arrays with the confused sizes
equal: NumPy and jaxtyping/beartype (applied to every ``@attention`` block)
let them through. Every QKV401/QKV402 finding is confirmed by running the
graph: a future target token or a padded source token must really change
logits it should not.
"""

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.passes.checks import CODES, has_errors
from zoo import ENTRIES, SILENT_LENGTH, TINY, wiring

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# Codes no model code can trigger, only a damaged graph (tested in
# test_check_formats.py): not well formed (QKV001), a recorded shape that
# disagrees with its own rule (QKV206).
UNREACHABLE = {"QKV001", "QKV206"}
# Every size different from every other: heads*d_head (15) != d_model (21).
DISTINCT = dataclasses.replace(TINY, d_head=5)
BY_NAME = {e.name: e for e in ENTRIES}
# Findings that do not fail a build unless --strict: a deliberate choice
# (QKV403), a block the checker cannot read (QKV305), wasted work (QKV308).
WARNINGS = {"QKV305", "QKV403", "QKV308"}


def _feeds(src_len: int, tgt_len: int) -> dict:
    """Batch 2; the second source row ends in two padding tokens (pad_id 0)."""
    rng = np.random.default_rng(0)
    src = rng.integers(3, TINY.vocab, size=(2, src_len))
    src[1, -2:] = TINY.pad_id
    tgt = rng.integers(3, TINY.vocab, size=(2, tgt_len))
    tgt[:, 0] = TINY.bos_id
    return {"src_ids": src, "tgt_ids": tgt}


@functools.lru_cache(maxsize=None)
def _traced(name: str):
    model = BY_NAME[name].model()
    graph = qf.trace(model)
    return model, graph, qf.check(graph)


# --- the zoo itself --------------------------------------------------------------------

def test_the_zoo_has_twenty_distinct_mistakes_eight_of_them_size_silent():
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names)) >= 20
    assert sum(e.size_silent for e in ENTRIES) >= 8
    for e in ENTRIES:
        assert e.code in CODES, e
        assert e.what, f"{e}: say what the mistake is in the factory's docstring"
        assert (e.line is None) == e.code.startswith("QKV1"), f"{e}: mark its line with # BUG({e})"


def test_every_reachable_code_has_an_entry():
    missing = sorted(set(CODES) - UNREACHABLE - {e.code for e in ENTRIES})
    assert not missing, f"no zoo entry triggers {', '.join(missing)}"


# --- each entry: code, node, line ---------------------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_the_mistake_is_reported_at_its_node_and_line(entry):
    _, _, found = _traced(entry.name)
    with_code = [d for d in found if d.code == entry.code]
    assert with_code, f"{entry}: no {entry.code}; found {sorted({d.code for d in found})}"
    if entry.line is None:
        where = f"config of {entry.name}"
        hits = [d for d in with_code if d.node == entry.node and d.source == where]
    else:
        where = f"{entry.file.parent.name}/{entry.file.name}:{entry.line}"
        hits = [d for d in with_code if d.node.startswith(entry.node) and d.source.endswith(where)]
    assert hits, (f"{entry}: {entry.code} expected at {entry.node} ({where}); got\n"
                  + "\n".join(d.text() for d in with_code))
    assert all(d.model == entry.name and d.message for d in hits)
    severity = "warning" if entry.code in WARNINGS else "error"
    assert {d.severity for d in hits} == {severity}
    assert has_errors(found) == (severity == "error")


# --- size-silent entries: the same code runs on arrays ------------------------------------

SILENT = [e for e in ENTRIES if e.size_silent]


def _eager(model, feeds):
    params = qf.init_params(qf.trace(model), seed=0)
    return qf.eager(model, params, feeds)["logits"]


@pytest.mark.parametrize("entry", SILENT, ids=str)
def test_size_silent_mistakes_run_eagerly_when_the_sizes_coincide(entry):
    # src == tgt == d_head (7), and d_model (21) == heads * d_head in TINY.
    logits = _eager(entry.model(TINY), _feeds(SILENT_LENGTH, SILENT_LENGTH))
    assert logits.shape == (2, SILENT_LENGTH, TINY.vocab)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("entry", SILENT, ids=str)
def test_only_a_coincidence_of_sizes_hides_them(entry):
    """With every size different, the entries that rely on a coincidence fail
    in NumPy or jaxtyping; the others still run: no size check can see them."""
    model, feeds = entry.model(DISTINCT), _feeds(6, 4)
    if entry.coincide is None:
        assert _eager(model, feeds).shape == (2, 4, TINY.vocab)
    else:
        with pytest.raises((ValueError, TypeError)):  # jaxtyping's TypeCheckError is a TypeError
            _eager(model, feeds)


# --- no false positives ---------------------------------------------------------------------

CLEAN = {
    **{name: (lambda name=name: qf.load_model(name)) for name in ("vaswani-base", "torch-transformer", "tiny")},
    "examples/custom_attention.py": lambda: qf.load_model(f"{EXAMPLES / 'custom_attention.py'}:model"),
    "zoo.wiring.correct": lambda: wiring.correct(TINY),
    "tiny, every size distinct": lambda: qf.load_model(DISTINCT),
}


@pytest.mark.parametrize("name", CLEAN)
def test_correct_models_have_no_findings(name):
    found = qf.check(qf.trace(CLEAN[name]()))
    assert found == [], "\n".join(d.text() for d in found)


# --- information flow: QKV401/QKV402 confirmed by running the graph ------------------------

FLOW_CHECKED = [*ENTRIES, *(n for n in CLEAN if n not in ("vaswani-base", "torch-transformer"))]
CHANGED = 3  # the target position whose token changes; it is real in every row


def _leaks(graph) -> tuple[float, float]:
    """Largest logit change (future, padding) under the two perturbations.

    future: change target token CHANGED, look at positions before it.
    padding: change the padding token's source embedding (the vector every
    padded source position starts from), look at every real logit.
    """
    feeds = _feeds(SILENT_LENGTH, SILENT_LENGTH)
    src, tgt = feeds["src_ids"], feeds["tgt_ids"]
    params = qf.init_params(graph, seed=1)
    base = qf.forward(graph, params, src, tgt)["logits"]
    tgt2 = tgt.copy()
    tgt2[:, CHANGED] = 3 + (tgt[:, CHANGED] - 2) % (TINY.vocab - 3)
    future = qf.forward(graph, params, src, tgt2)["logits"]
    table = params["encoder.embed.weight"].copy()
    table[TINY.pad_id] += np.random.default_rng(2).normal(size=table.shape[1])
    padded = qf.forward(graph, {**params, "encoder.embed.weight": table}, src, tgt)["logits"]
    real = np.arange(TINY.vocab) != TINY.pad_id  # a tied unembedding's pad column moves too
    return (float(np.max(np.abs(future[:, :CHANGED] - base[:, :CHANGED]))),
            float(np.max(np.abs(padded[..., real] - base[..., real]))))


@pytest.mark.parametrize("item", FLOW_CHECKED, ids=str)
def test_information_flow_findings_are_real(item):
    if isinstance(item, str):
        graph, found = qf.trace(CLEAN[item]()), []
    else:
        _, graph, found = _traced(item.name)
    codes = {d.code for d in found}
    try:
        future, padding = _leaks(graph)
    except qf.QkvflowError as err:
        # Only entries without a QKV4xx finding may be ones the executor cannot run.
        assert not codes & {"QKV401", "QKV402"}, err
        return
    if "QKV401" in codes:
        assert future > 1e-6, "QKV401 reported, but no earlier logit depends on a later target token"
    if "QKV402" in codes:
        assert padding > 1e-6, "QKV402 reported, but no real logit depends on a padding token"
    if not any(c.startswith(("QKV1", "QKV2")) for c in codes):
        # With a sound config and shapes named right the analysis misses nothing either.
        assert ("QKV401" in codes) == (future > 1e-6), f"future leak {future:.1e}, codes {sorted(codes)}"
        assert ("QKV402" in codes) == (padding > 1e-6), f"padding leak {padding:.1e}, codes {sorted(codes)}"


# --- the examples and the CLI ----------------------------------------------------------------

def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("example, code", [("custom_attention.py", 0), ("broken_attention.py", 1)])
def test_cli_check_exit_code_of_the_examples(example, code):
    done = _run("-m", "qkvflow", "check", f"examples/{example}:model")
    assert done.returncode == code, done.stdout + done.stderr
    if code:
        assert "broken_attention.py" in done.stdout and "QKV301" in done.stdout


def test_the_examples_run():
    done = _run("examples/custom_attention.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "0 findings"
    broken = _run("examples/broken_attention.py")
    assert broken.returncode == 0, broken.stderr
    assert "QKV301" in broken.stdout and "no error" in broken.stdout
