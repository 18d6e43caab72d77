"""Property tests: random valid configs of every family, and random invalid inputs.

For a valid config (tests/property_configs.py draws one from each family's tiny
presets, every dim a different size):

1. it traces and checks with no finding;
2. it runs on random token ids to finite float64 outputs of the named shapes;
3. a causal sequence (the decoder's target, a decoder-only model's ids): tokens
   after position t change nothing at positions <= t;
4. padding (an encoder–decoder's source, an encoder-only model's ids): the real
   positions of a padded row are the same whatever follows them (no pad, more
   pads, other token types at the pads), and the other row of the batch does not
   see the padded row change;
5. the graph's JSON, read back, checks, explains and runs the same.

Besides: up to max_positions tokens run and one more is an InputError naming it.

For invalid inputs (mutated TOML texts and graph JSON files, token id strings and
arrays, dtypes, seeds, params dicts and files) through the Python API and the CLI:
never an uncaught exception. The API raises a :class:`qkvflow.QkvflowError` with a
one-line message; the CLI returns 2 with one line on stderr starting
``qkvflow: error:`` (or 0/1 when the input happens to be usable). A config that
checks clean runs to finite outputs. ``--dtype`` is the one exception: its choices
are argparse's, which refuses others with its own usage text and SystemExit(2).

Examples are derandomized (the same on every run) and no example database is
written; inputs that once broke qkvflow are pinned with ``@example``.
"""

import contextlib
import functools
import io
import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import qkvflow as qf
from qkvflow import cli
from qkvflow.ir.graph import from_json, read_graph, to_json
from property_configs import BATCH, HUGE, Case, cases, preset_case, real_ids, token_ids, toml_mutations

FAMILIES = ("encoder_decoder", "decoder_only", "encoder_only")
CAUSAL = ("encoder_decoder", "decoder_only")


def examples(n: int, **more):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], **more)


@functools.lru_cache(maxsize=32)
def built(cfg, seed: int = 0):
    """(graph, params) of a config; cached, as hypothesis replays an example while shrinking."""
    g = qf.trace(qf.load_model(cfg))
    return g, qf.init_params(g, seed=seed)


def feeds(draw, case: Case, batch: int = BATCH) -> dict:
    cfg = case.cfg
    if case.family == "encoder_decoder":
        return {"src_ids": token_ids(draw, (batch, case.length("src")), cfg.src_vocab or cfg.vocab),
                "tgt_ids": token_ids(draw, (batch, case.length("tgt")), cfg.vocab)}
    return {"ids": token_ids(draw, (batch, case.length("seq")), cfg.vocab)}


def expected_shapes(case: Case, batch: int = BATCH) -> dict:
    cfg = case.cfg
    if case.family == "encoder_decoder":
        return {"logits": (batch, case.length("tgt"), cfg.vocab)}
    if cfg.head == "pooled":
        return {"hidden": (batch, case.length("seq"), cfg.d_model), "pooled": (batch, cfg.d_model)}
    return {"logits": (batch, case.length("seq"), cfg.vocab)}


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


# --- 1 + 2: trace, check clean, run finite with the named shapes ----------------------------

@pytest.mark.parametrize("family", FAMILIES)
@examples(60)
@given(data=st.data())
def test_a_valid_config_checks_clean_and_runs_finite(family, data):
    case = data.draw(cases(family), label="case")
    seed = data.draw(st.integers(0, 3), label="seed")
    g, params = built(case.cfg, seed)
    assert [d.text() for d in qf.check(g)] == []
    inputs = feeds(data.draw, case)
    if case.cfg.pad_id >= 0:  # at times a row of nothing but padding: every key masked, a defined result
        for name in inputs:
            if name != "type_ids" and data.draw(st.integers(0, 3), label=f"{name}: row 0 all padding") == 0:
                inputs[name][0] = case.cfg.pad_id
    note(f"inputs: {inputs}")
    out = qf.forward(g, params, **inputs)
    assert {k: v.shape for k, v in out.items()} == expected_shapes(case)
    for name, value in out.items():
        assert value.dtype == np.float64, name
        assert np.isfinite(value).all(), name


# --- 3: causality ------------------------------------------------------------------------

@pytest.mark.parametrize("family", CAUSAL)
@examples(50)
@given(data=st.data())
def test_later_tokens_do_not_reach_earlier_positions(family, data):
    case = data.draw(cases(family), label="case")
    g, params = built(case.cfg)
    key, dim = ("tgt_ids", "tgt") if family == "encoder_decoder" else ("ids", "seq")
    inputs = feeds(data.draw, case)
    length, vocab = case.length(dim), case.cfg.vocab
    t = data.draw(st.integers(0, length - 2), label="t")
    moved = inputs[key].copy()
    shift = token_ids(data.draw, moved[:, t + 1:].shape, vocab - 1) + 1  # 1..vocab-1: every later id changes
    moved[:, t + 1:] = (moved[:, t + 1:] + shift) % vocab
    base = qf.forward(g, params, **inputs)["logits"]
    after = qf.forward(g, params, **{**inputs, key: moved})["logits"]
    assert_close(after[:, :t + 1], base[:, :t + 1])
    assert np.abs(after[:, t + 1] - base[:, t + 1]).max() > 1e-9  # the change does reach position t + 1


# --- 3b: max_positions is the longest sequence ----------------------------------------------

@examples(60)
@example(case=preset_case("bart-tiny"), extra=1, longer="src_ids", seed=0)  # learned positions from row 2
@given(case=st.sampled_from(FAMILIES).flatmap(cases), extra=st.integers(-1, 3),
       longer=st.sampled_from(["src_ids", "tgt_ids", "ids"]), seed=st.integers(0, 2**32 - 1))
def test_max_positions_is_the_longest_sequence_that_runs(case, extra, longer, seed):
    """Up to max_positions tokens run; more is an InputError naming max_positions
    (whatever the positions: a learned table with BART's offset rows included)."""
    g, params = built(case.cfg)
    cfg, rng = case.cfg, np.random.default_rng(seed)
    limit, length = cfg.max_positions, cfg.max_positions + extra
    if case.family == "encoder_decoder":
        inputs = {"src_ids": rng.integers(0, cfg.src_vocab or cfg.vocab, (1, case.length("src"))),
                  "tgt_ids": rng.integers(0, cfg.vocab, (1, case.length("tgt")))}
        longer = longer if longer in inputs else "tgt_ids"
    else:
        inputs, longer = {"ids": rng.integers(0, cfg.vocab, (1, case.length("seq")))}, "ids"
    inputs[longer] = rng.integers(0, cfg.src_vocab or cfg.vocab if longer == "src_ids" else cfg.vocab, (1, length))
    if length <= limit:
        out = qf.forward(g, params, **inputs)
        assert all(np.isfinite(v).all() for v in out.values())
    else:
        with pytest.raises(qf.QkvflowError) as err:
            qf.forward(g, params, **inputs)
        assert type(err.value).__name__ == "InputError" and f"max_positions = {limit}" in str(err.value), \
            f"{type(err.value).__name__}: {err.value}"


# --- 4: padding ------------------------------------------------------------------------------

def padded(draw, case: Case, dim: str, vocab: int) -> tuple[np.ndarray, int]:
    """(BATCH, length) ids, no pad but in row 0's last positions; how many of row 0's are real."""
    length, pad = case.length(dim), case.cfg.pad_id
    ids = real_ids(draw, (BATCH, length), vocab, pad)
    real = draw(st.integers(1, length - 1), label="real")
    ids[0, real:] = pad
    return ids, real


def with_pads(row: np.ndarray, pad: int, count: int) -> np.ndarray:
    return np.concatenate([row, np.full((row.shape[0], count), pad, dtype=row.dtype)], axis=1)


@examples(60)
@given(data=st.data())
def test_source_padding_does_not_reach_the_decoder(data):
    case = data.draw(cases("encoder_decoder"), label="case")
    g, params = built(case.cfg)
    cfg = case.cfg
    src, real = padded(data.draw, case, "src", cfg.src_vocab or cfg.vocab)
    tgt = token_ids(data.draw, (BATCH, case.length("tgt")), cfg.vocab)
    note(f"src {src.tolist()}, tgt {tgt.tolist()}")
    logits = qf.forward(g, params, src, tgt)["logits"]
    # the padded row: the same with no pad after its real tokens, or with more of them
    alone = qf.forward(g, params, src[:1, :real], tgt[:1])["logits"]
    assert_close(logits[0], alone[0])
    more = qf.forward(g, params, with_pads(src[:1], cfg.pad_id, data.draw(st.integers(1, 3))), tgt[:1])["logits"]
    assert_close(logits[0], more[0])
    # the unpadded row does not see the padded row's tokens
    other = src.copy()
    other[0, :real] = real_ids(data.draw, (real,), cfg.src_vocab or cfg.vocab, cfg.pad_id)
    assert_close(qf.forward(g, params, other, tgt)["logits"][1], logits[1])


@examples(60)
@given(data=st.data())
def test_padding_does_not_reach_the_real_positions_of_an_encoder(data):
    case = data.draw(cases("encoder_only"), label="case")
    g, params = built(case.cfg)
    cfg = case.cfg
    ids, real = padded(data.draw, case, "seq", cfg.vocab)
    types = token_ids(data.draw, ids.shape, cfg.type_vocab) if cfg.type_vocab else None
    extra = {"type_ids": types} if cfg.type_vocab else {}
    note(f"ids {ids.tolist()}, types {None if types is None else types.tolist()}")
    out = qf.forward(g, params, ids=ids, **extra)

    def real_part(result: dict, row: int, n: int = real) -> dict:
        return {k: v[row, :n] if v.ndim == 3 else v[row] for k, v in result.items()}

    def same(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for k in a:
            assert_close(a[k], b[k])

    alone = qf.forward(g, params, ids=ids[:1, :real], **({"type_ids": types[:1, :real]} if extra else {}))
    same(real_part(out, 0), real_part(alone, 0))
    count = data.draw(st.integers(1, 3), label="more pads")
    more = qf.forward(g, params, ids=with_pads(ids[:1], cfg.pad_id, count),
                      **({"type_ids": with_pads(types[:1], 0, count)} if extra else {}))
    same(real_part(out, 0), real_part(more, 0))
    if cfg.type_vocab:  # other token types at the pads: their embeddings change, the real positions do not
        moved = types.copy()
        moved[0, real:] = (moved[0, real:] + 1) % cfg.type_vocab
        same(real_part(qf.forward(g, params, ids=ids, type_ids=moved), 0), real_part(out, 0))
    other = ids.copy()
    other[0, :real] = real_ids(data.draw, (real,), cfg.vocab, cfg.pad_id)
    length = ids.shape[1]
    same(real_part(qf.forward(g, params, ids=other, **extra), 1, length), real_part(out, 1, length))


# --- 5: the graph's JSON round trip -------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


@pytest.mark.parametrize("family", FAMILIES)
@examples(20)
@given(data=st.data())
def test_the_graph_json_reads_back_to_the_same_model(family, data, folder):
    case = data.draw(cases(family), label="case")
    g, params = built(case.cfg)
    text = to_json(g)
    path = folder / "graph.json"
    path.write_text(text, encoding="utf-8")
    back = read_graph(path)
    assert to_json(back) == text
    assert [d.text() for d in qf.check(back)] == [d.text() for d in qf.check(g)]
    assert qf.explain(back, fmt="json") == qf.explain(g, fmt="json")
    code, _, err = cli_outcome("check", str(path))
    assert code == (1 if any(d.severity == "error" for d in qf.check(g)) else 0), err
    again = qf.init_params(back, seed=0)
    assert again.keys() == params.keys() and all(np.array_equal(again[k], params[k]) for k in params)
    inputs = feeds(data.draw, case)
    want, got = qf.forward(g, params, **inputs), qf.forward(from_json(text), params, **inputs)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# === invalid inputs ===========================================================================

def api_outcome(fn, *args, **kwargs):
    """fn's result, or the QkvflowError it raised (one line); anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except qf.QkvflowError as err:
        message = str(err)
        assert message.strip() and "\n" not in message.strip(), repr(message)
        return err


def cli_outcome(*argv: str, argparse_may_exit: bool = False) -> tuple[int, str, str]:
    """cli.main's exit code, stdout and stderr; an exception escaping it fails the test
    (argparse's SystemExit too, unless ``argparse_may_exit``: then its code is returned)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as stop:
            if not argparse_may_exit:
                raise
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def assert_cli_refuses_or_runs(code: int, stderr: str, allowed=(0, 1, 2)) -> None:
    assert code in allowed, (code, stderr)
    if code == 2:
        lines = stderr.rstrip("\n").split("\n")  # "\n" alone ends a line: a \x1e in a quoted name does not
        assert lines[-1].startswith("qkvflow: error: "), stderr
        # before it only the findings of a model run refuses to run (one line each, and the count)
        assert all(re.search(r": (error|warning): QKV\d{3} ", line) or re.fullmatch(r"\d+ model\(s\) checked: .*", line)
                   for line in lines[:-1]), stderr
    else:
        assert "Traceback" not in stderr


def small_inputs(g) -> dict:
    """Token ids the graph's inputs accept: 2 x 3, ids within every vocabulary."""
    from qkvflow.ir.graph import required_inputs, vocabulary_of
    by_name = {g.nodes[n]["attrs"]["name"]: n for n in g.graph["inputs"]}
    vocab = min((vocabulary_of(g, by_name[n]) or 1 for n in required_inputs(g)), default=1)
    return {name: np.arange(6).reshape(2, 3) % max(vocab, 1) for name in required_inputs(g)}


@examples(150)
@example(mutated=("decoder_only", 'preset = "gpt2-tiny"\nd_ff = -3\nattention_scale = "none"\n'))
@given(mutated=toml_mutations())
def test_a_mutated_toml_loads_or_is_refused_through_the_api(mutated, folder):
    family, text = mutated
    note(text)
    path = folder / "mutated.toml"
    path.write_text(text, encoding="utf-8")
    model = api_outcome(qf.load_model, str(path))
    if isinstance(model, qf.QkvflowError):
        return event("refused by load_model")
    g = api_outcome(qf.trace, model)
    if isinstance(g, qf.QkvflowError):
        return event("refused by trace")
    found = api_outcome(qf.check, g)
    if isinstance(found, qf.QkvflowError) or any(d.severity == "error" for d in found):
        return event("refused by check")
    params = api_outcome(qf.init_params, g, seed=0)
    if isinstance(params, qf.QkvflowError):
        return event("refused by init_params")
    out = api_outcome(qf.forward, g, params, **small_inputs(g))
    if isinstance(out, qf.QkvflowError):
        return event("refused by forward")
    event("ran")
    assert all(np.isfinite(v).all() for v in out.values()), "checked clean, ran to non-finite outputs"


@examples(80)
@given(mutated=toml_mutations())
def test_a_mutated_toml_is_a_one_line_error_for_the_cli(mutated, folder):
    family, text = mutated
    note(text)
    path = folder / "mutated-cli.toml"
    path.write_text(text, encoding="utf-8")
    code, _, err = cli_outcome("check", str(path))
    assert_cli_refuses_or_runs(code, err)
    flags = ["--src=1 2 3", "--tgt=1 2"] if family == "encoder_decoder" else ["--ids=1 2 3"]
    code, _, err = cli_outcome("run", str(path), *flags)
    assert_cli_refuses_or_runs(code, err, allowed=(0, 2))


@functools.cache
def graph_json(name: str) -> str:
    return to_json(qf.trace(qf.load_model(name)))


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from(HUGE), st.text(max_size=6),
    st.sampled_from(["linear", "conv2d", "batch", "d_model", "seq", "float", "int", "q", "k", "x", "ids"]),
    st.lists(st.sampled_from(["batch", "seq", "tgt", "d_model", "vocab", "heads", "nope"]), max_size=4),
    st.lists(st.integers(-2, 9), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(-2, 9), max_size=2),
    st.floats(allow_nan=True, allow_infinity=True),
)


class MutatedGraph:
    """A graph file's text, shown as the changes made to a traced model's JSON."""

    def __init__(self, model: str, changes: list, text: str):
        self.model, self.changes, self.text = model, changes, text

    def __repr__(self):
        return f"MutatedGraph({self.model!r}, {self.changes!r})"


@st.composite
def mutated_graphs(draw) -> MutatedGraph:
    """The JSON of a traced graph (qkvflow trace --format json) with 1-3 changes: a node's,
    an edge's or the graph's attribute set to another value, a node or edge removed, an
    edge pointed elsewhere; at times the text cut short."""
    model = draw(st.sampled_from(["tiny", "gpt2-tiny", "bert-tiny"]))
    data = json.loads(graph_json(model))
    nodes, edges, graph = data["nodes"], data["edges"], data["graph"]
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["node attr", "node attr", "attrs", "edge", "graph", "drop node", "drop edge"]))
        if how == "node attr" and nodes:
            node = draw(st.sampled_from(nodes))
            key, value = draw(st.sampled_from(sorted(node) + ["extra"])), draw(JSON_VALUES)
            node[key] = value
            changes.append(f"nodes[{node.get('id')!r}][{key!r}] = {value!r}")
        elif how == "attrs" and nodes:
            node = draw(st.sampled_from(nodes))
            attrs = node.get("attrs") if isinstance(node.get("attrs"), dict) else {}
            key, value = draw(st.sampled_from(sorted(attrs) + ["name", "pad_id", "extra"])), draw(JSON_VALUES)
            attrs[key] = value
            node["attrs"] = attrs
            changes.append(f"nodes[{node.get('id')!r}]['attrs'][{key!r}] = {value!r}")
        elif how == "edge" and edges:
            at = draw(st.integers(0, len(edges) - 1))
            key = draw(st.sampled_from(["source", "target", "role", "arg", "key"]))
            ids = [n["id"] for n in nodes if "id" in n]
            value = draw(st.one_of(st.sampled_from(ids or ["x"]), JSON_VALUES))
            changes.append(f"edge {edges[at].get('source')!r} -> {edges[at].get('target')!r}: {key} = {value!r}")
            edges[at][key] = value
        elif how == "graph":
            key = draw(st.sampled_from(sorted(graph)))
            if isinstance(graph[key], dict) and graph[key] and draw(st.booleans()):
                inner, value = draw(st.sampled_from(sorted(graph[key]))), draw(JSON_VALUES)
                graph[key][inner] = value
                changes.append(f"graph[{key!r}][{inner!r}] = {value!r}")
            else:
                graph[key] = value = draw(JSON_VALUES)
                changes.append(f"graph[{key!r}] = {value!r}")
        elif how == "drop node" and nodes:
            node = draw(st.sampled_from(nodes))
            nodes.remove(node)
            changes.append(f"drop node {node.get('id')!r}")
        elif how == "drop edge" and edges:
            edge = edges.pop(draw(st.integers(0, len(edges) - 1)))
            changes.append(f"drop edge {edge.get('source')!r} -> {edge.get('target')!r}")
    text = json.dumps(data)
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(text)))
        text = text[:cut]
        changes.append(f"text cut at {cut}")
    return MutatedGraph(model, changes, text)


@examples(100, report_multiple_bugs=False)  # one shrunk example, not one per crash site
@given(mutated=mutated_graphs())
def test_a_mutated_graph_file_is_refused_or_used_through_the_api(mutated, folder):
    path = folder / "mutated-graph.json"
    path.write_text(mutated.text, encoding="utf-8")
    g = api_outcome(read_graph, path)
    if isinstance(g, qf.QkvflowError):
        return event("refused by read_graph")
    found = api_outcome(qf.check, g)
    if isinstance(found, qf.QkvflowError):
        return event("refused by check")
    api_outcome(qf.explain, g)
    if any(d.severity == "error" for d in found):
        return event("error findings")
    params = api_outcome(qf.init_params, g, seed=0)
    if isinstance(params, qf.QkvflowError):
        return event("refused by init_params")
    inputs = {"src_ids": np.array([[5, 6, 7]]), "tgt_ids": np.array([[1, 8]])} if mutated.model == "tiny" \
        else {"ids": np.array([[5, 6, 7]])}  # what the user would give the model the file was traced from
    out = api_outcome(qf.forward, g, params, **inputs)
    event("refused by forward" if isinstance(out, qf.QkvflowError) else "ran")


@examples(50, report_multiple_bugs=False)
@given(mutated=mutated_graphs())
def test_a_mutated_graph_file_is_a_one_line_error_for_the_cli(mutated, folder):
    path = folder / "mutated-graph-cli.json"
    path.write_text(mutated.text, encoding="utf-8")
    for argv in (["check", str(path)], ["explain", str(path)]):
        code, _, err = cli_outcome(*argv)
        assert_cli_refuses_or_runs(code, err)


TOKEN_TEXT = st.one_of(
    st.text(alphabet="0123456789 ,-+.e_x", max_size=12),
    st.text(max_size=8),
    st.sampled_from(["", " ", ",", "5 6 7", "40", "41", "99999999999999999999", "-1", "1e3", "٣",
                     "１２", "0x10", "5,,6", "7\t8", "\x00", "5 " * 70]),
)


@examples(100)
@given(src=TOKEN_TEXT, tgt=TOKEN_TEXT, model=st.sampled_from(["tiny", "gpt2-tiny", "bert-tiny"]))
def test_token_id_strings_run_or_are_a_one_line_error(model, src, tgt):
    flags = [f"--src={src}", f"--tgt={tgt}"] if model == "tiny" else [f"--ids={src}"]
    code, _, err = cli_outcome("run", model, *flags)
    assert_cli_refuses_or_runs(code, err, allowed=(0, 2))


@functools.cache
def preset_graph(name: str):
    g = qf.trace(qf.load_model(name))
    return g, qf.init_params(g, seed=0)


ID_ARRAYS = st.one_of(
    st.lists(st.lists(st.integers(-2**64, 2**64), min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.integers(-3, 60), max_size=5),
    st.sampled_from([
        np.array([[1.0, 2.0]]), np.array([[True, False]]), np.array([["5", "6"]]), np.zeros((2, 0), int),
        np.zeros((0, 3), int), np.array(5), np.zeros((1, 2, 3), int), np.array([[2**63 - 1]]),
        np.array([[3, 4]], dtype=np.uint64), np.array([[3, 4]], dtype=np.int8), np.array([[-1, 3]]),
        np.array([[3, 2**40]]), np.zeros((1, 100), int), np.array([[1, None]], dtype=object),
        np.array([[1 + 2j]]), None, "5 6 7", 5, [[1, 2], [3]], {"a": 1}, np.ma.masked_array([[1, 2]]),
    ]),
)


@examples(100)
@given(ids=ID_ARRAYS, model=st.sampled_from(["tiny", "gpt2-tiny", "bert-tiny"]), which=st.integers(0, 1))
def test_token_id_arrays_run_or_are_refused_through_the_api(model, ids, which):
    g, params = preset_graph(model)
    if model == "tiny":
        good = np.array([[5, 6, 7]])
        inputs = {"src_ids": ids, "tgt_ids": good} if which == 0 else {"src_ids": good, "tgt_ids": ids}
    else:
        inputs = {"ids": ids} if which == 0 else {"ids": np.array([[5, 6, 7]]), "type_ids": ids}
        if model == "gpt2-tiny" and which == 1:
            inputs = {"ids": ids}
    out = api_outcome(qf.forward, g, params, **inputs)
    if not isinstance(out, qf.QkvflowError):
        assert all(np.isfinite(v).all() for v in out.values())


DTYPES = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["float64", "float32", "float16", "f8", "f4", "d", "<f8", ">f8", "float", "FLOAT64",
                     "float64 ", "int64", "bfloat16", "complex128", "object", "", "O", "U3"]),
    st.sampled_from([None, 64, 3.5, np.float64, np.float32, np.float16, np.int64, float, int,
                     np.dtype("float64"), np.dtype(">f8"), np.dtype("float32"), [("a", "f8")],
                     np.array("float64"), np.array([1, 2])]),
)


@examples(60)
@example(dtype=np.array("float64"))  # str() of it is "float64"
@given(dtype=DTYPES)
def test_dtypes_run_or_are_refused_through_the_api(dtype):
    g, params = preset_graph("gpt2-tiny")
    note(f"dtype {dtype!r}")
    out = api_outcome(qf.forward, g, params, ids=np.array([[5, 6, 7]]), dtype=dtype)
    if not isinstance(out, qf.QkvflowError):
        assert out["logits"].dtype in (np.float64, np.float32)
    made = api_outcome(qf.init_params, g, seed=0, dtype=dtype)
    if not isinstance(made, qf.QkvflowError):
        assert all(np.isfinite(v).all() for v in made.values())


@examples(30)
@given(dtype=st.one_of(st.text(max_size=10), st.sampled_from(["float64", "float32", "float16", "f8", "FLOAT64"])))
def test_dtype_strings_for_the_cli_run_or_are_usage_errors(dtype):
    """--dtype has fixed choices: argparse refuses the others with its own SystemExit(2),
    usage lines and "qkvflow run: error: argument --dtype: ..." (not qkvflow's one line)."""
    code, _, err = cli_outcome("run", "gpt2-tiny", "--ids=5 6 7", f"--dtype={dtype}", argparse_may_exit=True)
    if dtype in ("float64", "float32"):
        assert code == 0, err
    else:
        assert code == 2 and err.rstrip("\n").split("\n")[-1].startswith("qkvflow run: error: argument --dtype"), err


def _param_mutations(params: dict) -> st.SearchStrategy:
    names = sorted(params)
    bad_values = st.sampled_from([
        "transpose", "extra axis", "drop axis", "one more", "empty", "ints", "bools", "complex", "strings",
        "objects", "list", "nested list", "scalar", "none", "text", "nan", "inf", "float16", "float32",
        "zero-d", "huge",
    ])
    return st.lists(st.one_of(
        st.tuples(st.just("delete"), st.sampled_from(names)),
        st.tuples(st.just("add"), st.one_of(st.sampled_from(names).map(lambda n: n + ".extra"),
                                            st.text(max_size=8))),
        st.tuples(st.just("rename"), st.sampled_from(names)),
        st.tuples(bad_values, st.sampled_from(names)),
    ), min_size=1, max_size=3)


def _mutate(params: dict, ops: list) -> dict:
    out = dict(params)
    for op, name in ops:
        value = out.get(name, np.zeros(3))
        if op == "delete":
            out.pop(name, None)
        elif op == "add":
            out[name] = np.ones(2)
        elif op == "rename":
            out[name.upper()] = out.pop(name, value)
        else:
            out[name] = {
                "transpose": lambda v: np.asarray(v).T,
                "extra axis": lambda v: np.asarray(v)[None],
                "drop axis": lambda v: np.asarray(v).reshape(-1),
                "one more": lambda v: np.zeros(tuple(s + 1 for s in np.shape(v))),
                "empty": lambda v: np.zeros((0,) + np.shape(v)[1:]),
                "ints": lambda v: np.asarray(v).astype(int),
                "bools": lambda v: np.asarray(v) > 0,
                "complex": lambda v: np.asarray(v).astype(complex),
                "strings": lambda v: np.asarray(v).astype(str),
                "objects": lambda v: np.asarray(v).astype(object),
                "list": lambda v: np.asarray(v).tolist(),
                "nested list": lambda v: [np.asarray(v).tolist()],
                "scalar": lambda v: 0.5,
                "none": lambda v: None,
                "text": lambda v: "weights",
                "nan": lambda v: np.full(np.shape(v), math.nan),
                "inf": lambda v: np.full(np.shape(v), -math.inf),
                "float16": lambda v: np.asarray(v).astype(np.float16),
                "float32": lambda v: np.asarray(v).astype(np.float32),
                "zero-d": lambda v: np.float64(1.0),
                "huge": lambda v: np.full(np.shape(v), 1e300),
            }[op](value)
    return out


class ParamCase:
    """A preset's seeded params with some changes, shown as the changes."""

    def __init__(self, model: str, ops: list):
        self.model, self.ops = model, ops

    def params(self):
        if self.ops and self.ops[0][0] == "instead":  # not a dict of arrays at all
            return self.ops[0][1]
        return _mutate(preset_graph(self.model)[1], self.ops)

    def inputs(self) -> dict:
        return {"src_ids": np.array([[5, 6, 7]]), "tgt_ids": np.array([[1, 8]])} if self.model == "tiny" \
            else {"ids": np.array([[5, 6, 7]])}

    def __repr__(self):
        return f"ParamCase({self.model!r}, {self.ops!r})"


@st.composite
def param_cases(draw, models=("tiny", "llama-tiny", "bert-tiny")) -> ParamCase:
    model = draw(st.sampled_from(models))
    if draw(st.integers(0, 9)) == 0:
        return ParamCase(model, [("instead", draw(st.sampled_from([None, [], (), "params", 3, [("a", np.zeros(2))],
                                                                   set()])))])
    return ParamCase(model, draw(_param_mutations(preset_graph(model)[1])))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # weights of 1e300 overflow on purpose
@examples(120)
@example(case=ParamCase("tiny", [("add", "decoder.x\nprint")]))  # a name of two lines
@given(case=param_cases())
def test_params_of_wrong_names_shapes_and_types_are_refused_through_the_api(case):
    g, _ = preset_graph(case.model)
    api_outcome(qf.forward, g, case.params(), **case.inputs())


def _write_params(path, case: ParamCase, blob: bytes | None) -> None:
    """The case's arrays as a .npz or .safetensors file (what each can hold), or ``blob``."""
    if blob is not None or path.suffix.lower() not in (".npz", ".safetensors"):
        path.write_bytes(blob or b"")
        return
    params = case.params()
    arrays = {}
    for k, v in (params.items() if isinstance(params, dict) else ()):
        try:
            arr = np.asarray(v)
        except ValueError:  # a ragged list
            continue
        if isinstance(k, str) and k and k not in ("file", "allow_pickle") and arr.dtype.kind != "O":
            arrays[k] = arr
    if path.suffix.lower() == ".npz":
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        from safetensors.numpy import save
        path.write_bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items() if v.dtype.kind in "fiub"}))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # weights of 1e300 overflow on purpose
@examples(50)
@example(case=ParamCase("llama-tiny", [("add", "decoder.x\nprint")]), suffix=".npz", blob=None)
@given(case=param_cases(("llama-tiny",)), suffix=st.sampled_from([".npz", ".safetensors", ".NPZ", ".pt", ""]),
       blob=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=64)))
def test_params_files_of_wrong_names_shapes_and_types_are_a_one_line_cli_error(case, suffix, blob, folder):
    path = folder / f"params{suffix}"
    _write_params(path, case, blob)
    code, _, err = cli_outcome("run", "llama-tiny", "--ids=5 6 7", f"--params={path}")
    assert_cli_refuses_or_runs(code, err, allowed=(0, 2))


@examples(30)
@given(seed=st.one_of(st.integers(-5, 2**70), st.sampled_from([-1, 1.5, "0", None, math.nan, [1, 2]])))
def test_init_params_seeds_are_used_or_refused(seed):
    g, _ = preset_graph("gpt2-tiny")
    api_outcome(qf.init_params, g, seed=seed)
