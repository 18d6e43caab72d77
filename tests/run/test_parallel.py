"""A batched run as parts of its batch, one part per core: one run's numbers for every
family, ported NumPy models and models of several outputs (bit for bit where each part's
products have whole blocks of columns, as at the benchmark's size); never for a graph whose
rows meet; BLAS's thread count put back whatever happens; a part's error told as one run
tells it."""

import importlib.util
import multiprocessing
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import qkvflow as qf
from qkvflow import nn
from qkvflow.ir.errors import ExecutionError, InputError
from qkvflow.ir.graph import vocabulary_of
from qkvflow.run import kernels, parallel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def splits(monkeypatch) -> list:
    """Every split run's parts, with no least size for a part (a tiny model splits too) and
    4 cores to split over (parts beyond the pool's threads wait their turn)."""
    seen = []
    run_parts = parallel.run_parts

    def spy(fn, parts, then=None):
        seen.append(list(parts))
        return run_parts(fn, parts, then)
    monkeypatch.setattr(parallel, "MIN_PART_ELEMENTS", 0)
    monkeypatch.setattr("qkvflow.run.execute.run_parts", spy)
    monkeypatch.setattr("qkvflow.run.execute.usable_cores", lambda: 4)  # 3 parts on any machine
    return seen


def feeds_for(g, batch: int, lengths: dict, seed: int) -> dict:
    """Token ids for every input, each sequence its own length, a few pads in each row."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for node in g.graph["inputs"]:
        attrs = g.nodes[node]["attrs"]
        if "default" in attrs:
            continue
        ids = rng.integers(3, vocabulary_of(g, node), (batch, lengths[attrs["shape"][1]]))
        ids[1::2, -2:] = 0  # padding at the end of every other row
        feeds[attrs["name"]] = ids
    return feeds


def runs_alike(g, params, feeds, dtype="float64", workers=(2, 3)) -> np.ndarray:
    """Split runs give one run's numbers: in the same layouts, through the same kernels, to
    the last bits BLAS may round otherwise for another count of columns (as it does for
    another batch size)."""
    one = qf.Executor(g, params, dtype=dtype, workers=1).run(feeds)
    for n in workers:
        split = qf.Executor(g, params, dtype=dtype, workers=n).run(feeds)
        assert split.keys() == one.keys()
        for name in one:
            np.testing.assert_allclose(split[name], one[name], rtol=1e-13, atol=1e-13,
                                       err_msg=f"{name} with {n} workers")
            assert split[name].flags.c_contiguous and split[name].dtype == one[name].dtype
    return one["logits"]


FAMILIES = ["tiny", "bart-tiny", "t5-tiny", "gpt2-tiny", "llama-tiny", "bert-tiny", "marian-tiny"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch, lengths", [(3, (4, 3)), (9, (33, 29))])  # few tokens; 64+ (feature-major)
def test_a_split_run_gives_the_numbers_of_one_run(splits, name, batch, lengths):
    g = qf.trace(qf.load_model(name))
    sequences = sorted(g.graph["sequences"])
    feeds = feeds_for(g, batch, dict(zip(sequences, lengths)), seed=len(name))
    logits = runs_alike(g, qf.init_params(g, seed=3), feeds)
    assert [len(p) for p in splits] == [2, 3]  # both executors split: 2 and 3 parts
    assert splits[0][-1][1] == batch and logits.shape[0] == batch


@pytest.mark.parametrize("example, inputs", [("gpt2_qkvflow", {"ids": (5, 9)}),
                                             ("transformer_qkvflow", {"src_ids": (5, 8), "tgt_ids": (5, 6)}),
                                             ("custom_attention", {"src_ids": (5, 8), "tgt_ids": (5, 6)})])
def test_ported_numpy_models_split_alike(splits, example, inputs):
    """A model written in plain NumPy (matmul, reduce, transpose, einsum): its rows stay apart too."""
    g = qf.trace(_load(EXAMPLES / f"{example}.py").model())
    rng = np.random.default_rng(4)
    feeds = {k: rng.integers(1, 29 if example != "custom_attention" else 41, shape) for k, shape in inputs.items()}
    runs_alike(g, qf.init_params(g, seed=5), feeds, workers=(2,))
    assert splits


def _load(path: Path, replace: tuple = ()):
    source = path.read_text()
    for old, new in replace:
        assert old in source, old
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(f"variant_{abs(hash(source))}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


MIXING = {  # one line of the GPT-2 port changed so that a batch's rows meet
    "softmax over the batch": [("x.max(axis=-1, keepdims=True)", "x.max(axis=0, keepdims=True)"),
                               ("e.sum(axis=-1, keepdims=True)", "e.sum(axis=0, keepdims=True)")],
    "norm over batch and features": [("mean = x.mean(axis=-1, keepdims=True)",
                                      "mean = x.mean(axis=(0, -1), keepdims=True)")],
    "embeddings summed down the batch": [("x = wte[ids] + wpe[:T]", "x = np.cumsum(wte[ids] + wpe[:T], axis=0)")],
    "a triangle over batch and positions": [("T = ids.shape[-1]", "T = ids.shape[-1]; ids = np.tril(ids)")],
    "the batch's rows summed into one": [("x = wte[ids] + wpe[:T]", "x = wte[ids] + wpe[:T] + wte[ids].sum(axis=0)")],
}


@pytest.mark.parametrize("change", MIXING)
def test_a_model_whose_rows_meet_is_never_split(splits, change):
    g = qf.trace(_load(EXAMPLES / "gpt2_qkvflow.py", MIXING[change]).model())
    assert not parallel.keeps_batch_apart(g)
    params = qf.init_params(g, seed=6)
    ids = np.random.default_rng(8).integers(1, 29, (6, 9))
    one = qf.Executor(g, params, workers=1).run({"ids": ids})["logits"]
    halves = [qf.Executor(g, params, workers=1).run({"ids": part})["logits"] for part in (ids[:3], ids[3:])]
    assert not np.allclose(np.concatenate(halves), one)  # run apart, the rows would give other numbers
    np.testing.assert_array_equal(qf.Executor(g, params, workers=2).run({"ids": ids})["logits"], one)
    assert splits == []


@pytest.mark.parametrize("equation, batched, apart", [
    ("bhtd,bhsd->bhts", [True, True], True), ("btd,de->bte", [True, False], True),
    ("bd,bd->d", [True, True], False), ("btd,ctd->bc", [True, True], False),
    ("btd,bd->tb", [True, True], False), ("...d,de->...e", [True, False], False),
    ("btd,be->bte", [True, False], False)])
def test_einsum_keeps_the_batch_apart_only_when_its_letter_leads_every_batched_term(equation, batched, apart):
    assert parallel._einsum_keeps_batch(equation, batched) is apart


def test_small_runs_stay_one_part_and_large_ones_split_by_default():
    tiny = qf.trace(qf.load_model("tiny"))
    assert parallel.batch_parts(_plan(tiny), dict(tiny.graph["dims"], batch=8, src=16, tgt=16), 2) == [(0, 8)]
    big = qf.trace(qf.load_model("vaswani-base"))
    sizes = dict(big.graph["dims"], batch=8, src=64, tgt=64)
    assert parallel.batch_parts(_plan(big), sizes, 2) == [(0, 4), (4, 8)]
    assert parallel.batch_parts(_plan(big), dict(sizes, batch=4), 2) == [(0, 4)]  # 2 x 64 a part: too little
    assert parallel.batch_parts(_plan(big), dict(sizes, batch=11), 3) == [(0, 4), (4, 8), (8, 11)]
    assert parallel.batch_parts(_plan(big), dict(sizes, batch=1), 2) == [(0, 1)]
    assert parallel.batch_parts(_plan(big), sizes, 1) == [(0, 8)]


def _plan(g):
    from qkvflow.run.plan import steps
    return steps(g)


def test_a_split_keeps_every_value_in_its_layout(splits):
    """6 x 11 tokens are laid out feature by feature (64+), a part of 3 x 11 would not be:
    the run stays whole rather than give other bits."""
    g = qf.trace(qf.load_model("tiny"))
    ex = qf.Executor(g, qf.init_params(g, seed=0), workers=2)
    ex.run(feeds_for(g, 6, {"src": 11, "tgt": 12}, seed=1))
    assert splits == []
    ex.run(feeds_for(g, 6, {"src": 22, "tgt": 22}, seed=1))
    assert splits == [[(0, 3), (3, 6)]]


def _vaswani_float32():
    cfg = qf.preset("vaswani-base")
    g = qf.trace(qf.load_model(cfg))
    rng = np.random.default_rng(0)
    feeds = {"src_ids": rng.integers(3, cfg.vocab, (8, 64)), "tgt_ids": rng.integers(3, cfg.vocab, (8, 64))}
    return g, qf.init_params(g, seed=0, dtype="float32"), feeds


def test_vaswani_base_at_the_benchmarks_size_splits_alike_and_makes_the_logits_once(monkeypatch):
    seen = []
    run_parts = parallel.run_parts
    monkeypatch.setattr("qkvflow.run.execute.run_parts",
                        lambda fn, parts, then=None: seen.append(parts) or run_parts(fn, parts, then))
    g, params, feeds = _vaswani_float32()
    one = qf.Executor(g, params, dtype="float32", workers=1).run(feeds)["logits"]
    ex = qf.Executor(g, params, dtype="float32", workers=2)
    ex.run(feeds)  # the first run stacks the weights
    tracemalloc.start()
    split = ex.run(feeds)["logits"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == [[(0, 4), (4, 8)]] * 2
    np.testing.assert_array_equal(split, one)
    # once the parts have ended, each part's logits are written into the whole batch's array
    assert peak < 1.1 * split.nbytes, (peak, split.nbytes)  # the parts' values freed before the logits are made


def _blas_threads() -> int:
    return parallel.blas_threads()


def test_blas_threads_come_back_after_split_runs_failing_parts_and_runs_from_two_threads(splits):
    from threadpoolctl import threadpool_limits
    g = qf.trace(qf.load_model("tiny"))
    params = qf.init_params(g, seed=0)
    feeds = feeds_for(g, 6, {"src": 9, "tgt": 7}, seed=2)
    with threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        ex = qf.Executor(g, params, workers=2)
        ex.run(feeds)
        assert _blas_threads() == before == 2
        errors = []

        def user_thread():
            try:
                for _ in range(5):
                    qf.Executor(g, params, workers=2).run(feeds)
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)
        threads = [threading.Thread(target=user_thread) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and _blas_threads() == 2
        broken = qf.Executor(g, params, workers=2)
        broken.params["decoder.layers.0.linear1.weight"] = broken.params["decoder.layers.0.linear1.weight"][:, :5]
        with pytest.raises(ExecutionError) as split_error:
            broken.run(feeds)
        assert _blas_threads() == 2
    broken.workers = 1
    with pytest.raises(ExecutionError) as one_error:
        broken.run(feeds)
    assert str(split_error.value) == str(one_error.value)  # told of the whole batch, not of a part
    assert "decoder.layers.0.linear1" in str(split_error.value)
    assert len(splits) == 1 + 10 + 1


def test_an_error_in_one_part_alone_is_raised_and_the_other_part_awaited(splits, monkeypatch):
    """The pool thread's part (rows 0-2 of 5) fails, the caller's part (3-4) does not."""
    from qkvflow.run import execute
    g = qf.trace(qf.load_model("tiny"))
    feeds = feeds_for(g, 5, {"src": 4, "tgt": 3}, seed=3)
    run_kernel = execute.run_kernel
    ended = []

    def failing(node, op, source, fn, call, ins, *rest, **kw):
        if op == "softmax" and ins[0].shape[0] == 3 and threading.current_thread() is not threading.main_thread():
            raise ExecutionError(f"node {node} failed in the first part")
        out = run_kernel(node, op, source, fn, call, ins, *rest, **kw)
        if op == "unembed" or (op == "softmax" and ins[0].shape[0] == 2):
            ended.append(ins[0].shape[0])
        return out
    monkeypatch.setattr(execute, "run_kernel", failing)
    before = _blas_threads()
    with pytest.raises(ExecutionError, match="failed in the first part"):
        qf.Executor(g, qf.init_params(g, seed=0), workers=2).run(feeds)
    assert splits == [[(0, 3), (3, 5)]]
    assert 2 in ended  # the caller's part ran on; the whole batch then ran without the failure
    assert _blas_threads() == before


def _split_run_in_child(queue) -> None:
    from qkvflow.run import execute
    g = qf.trace(qf.load_model("tiny"))
    split = []
    execute.run_parts = lambda fn, parts, then=None: split.append(parts) or parallel.run_parts(fn, parts, then)
    out = qf.Executor(g, qf.init_params(g, seed=0), workers=2).run(feeds_for(g, 4, {"src": 5, "tgt": 4}, 0))
    queue.put((out["logits"].shape, split, parallel.blas_threads()))


def test_a_forked_child_runs_split_runs_of_its_own(splits):
    g = qf.trace(qf.load_model("tiny"))
    qf.Executor(g, qf.init_params(g, seed=0), workers=2).run(feeds_for(g, 4, {"src": 5, "tgt": 4}, 0))
    assert splits  # the parent's pool has threads a forked child does not
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_split_run_in_child, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == ((4, 4, 41), [[(0, 2), (2, 4)]], parallel.blas_threads())


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2"])
def test_workers_must_be_a_whole_number_of_cores(bad):
    g = qf.trace(qf.load_model("tiny"))
    with pytest.raises(InputError, match=f"workers must be a whole number of cores, 1 or more, got {bad!r}"):
        qf.Executor(g, qf.init_params(g, seed=0), workers=bad)


def test_the_split_keeps_to_the_kernels_and_executors_own_threshold():
    from qkvflow.run import execute, kernels
    assert parallel.THRESHOLD == kernels._FEW_ROWS == execute._STACK_ROWS


def _lm(kind: str) -> qf.Model:
    """An embedding, a norm and the logits, with a second output of the kinds a split run's
    tail (the logits, each part's rows written into one array) must not break."""
    dims = {"batch": None, "seq": None, "d_model": 6, "vocab": 11, "max_positions": 9}

    def build():
        ids = nn.input("ids", ("batch", "seq"))
        with qf.scope("lm", stream="lm"):
            x = nn.norm(nn.embed(ids), name="norm")
        logits = nn.unembed(x)
        second = {"relu of what the logits read": lambda: {"feats": nn.activation(x, "relu")},
                  "softmax of the logits": lambda: {"probs": nn.softmax(logits)},
                  "what the logits read": lambda: {"hidden": x},
                  "the logits again": lambda: {"again": logits},
                  "none": dict}[kind]()
        return {"logits": logits, **second}
    return qf.Model(f"lm-{kind}", dims, build, sequences={"seq": "causal"}, streams=("lm",))


@pytest.mark.parametrize("kind, tail", [("none", {"unembed"}), ("relu of what the logits read", set()),
                                        ("softmax of the logits", set()), ("what the logits read", set()),
                                        ("the logits again", {"unembed"})])
def test_models_of_several_outputs_split_alike(splits, kind, tail):
    g = qf.trace(_lm(kind))
    assert {n.rsplit(".", 1)[-1] for n in parallel.tail_products(g)} == tail
    ids = np.random.default_rng(1).integers(1, 11, (6, 7))
    one = qf.Executor(g, qf.init_params(g, seed=2), workers=1).run({"ids": ids})
    split = qf.Executor(g, qf.init_params(g, seed=2), workers=2).run({"ids": ids})
    assert splits and split.keys() == one.keys()
    for name in one:
        np.testing.assert_allclose(split[name], one[name], rtol=1e-13, atol=1e-13, err_msg=name)


def test_attention_across_the_batch_keeps_a_graph_whole():
    """Pooled vectors (batch, d) attending to each other: scores (batch, batch)."""
    dims = {"batch": None, "seq": None, "d_model": 6, "vocab": 11, "max_positions": 9}

    def build():
        ids = nn.input("ids", ("batch", "seq"))
        with qf.scope("lm", stream="lm"):
            x = nn.norm(nn.embed(ids), name="norm")
            pooled = x.mean(axis=1)
            mixed = nn.attend(nn.softmax(nn.scores(pooled, pooled, 1.0)), pooled)
        return {"logits": nn.unembed(x + mixed[:, None, :])}
    g = qf.trace(qf.Model("pooled", dims, build, sequences={"seq": "bidirectional"}, streams=("lm",)))
    assert not parallel.keeps_batch_apart(g)


@pytest.mark.skipif(parallel.usable_cores() < 2, reason="one usable core: nothing to split over")
def test_by_default_a_run_takes_as_many_cores_as_blas_would():
    from threadpoolctl import threadpool_limits
    big = qf.trace(qf.load_model("vaswani-base"))
    sizes = dict(big.graph["dims"], batch=8, src=64, tgt=64)

    class Bare(qf.Executor):
        def __init__(self, g):  # the split's decision alone: no weights
            self.graph, self.plan, self.workers, self._split = g, _plan(g), None, {}
            self.dtype = np.dtype("float32")
    with threadpool_limits(2, user_api="blas"):
        assert Bare(big)._parts(sizes) == [(0, 4), (4, 8)]
    with threadpool_limits(1, user_api="blas"):  # NumPy held to one thread: so is the run
        assert Bare(big)._parts(sizes) == [(0, 8)]


def test_two_threads_splitting_runs_with_other_worker_counts_at_once(splits):
    g = qf.trace(qf.load_model("tiny"))
    params = qf.init_params(g, seed=0)
    feeds = feeds_for(g, 6, {"src": 9, "tgt": 7}, seed=4)
    want = qf.Executor(g, params, workers=1).run(feeds)["logits"]
    got, errors = {}, []

    def user(n):
        try:
            for i in range(4):
                got[n, i] = qf.Executor(g, params, workers=n).run(feeds)["logits"]
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
    threads = [threading.Thread(target=user, args=(n,)) for n in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 8
    for logits in got.values():
        np.testing.assert_allclose(logits, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("tokens", [(2, 3), (4, 20)])  # few tokens: linear's path; 64+: one product into out
def test_unembed_writes_the_logits_into_the_array_it_is_given(tokens):
    x = np.arange(np.prod(tokens) * 2, dtype=np.float64).reshape(*tokens, 2) / 10
    weight = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    bias = np.array([0.5, 0.0, -0.5])
    out = np.full((*tokens, 3), np.nan)
    got = kernels.unembed(x, weight, bias, out)
    assert got is out
    np.testing.assert_array_equal(out[0, 1], [x[0, 1, 0] + 0.5, x[0, 1, 1], x[0, 1, 0] - x[0, 1, 1] - 0.5])
    np.testing.assert_array_equal(out, kernels.unembed(x, weight, bias))


def test_an_error_making_the_logits_after_the_parts_is_told_of_the_whole_batch(splits, monkeypatch):
    from qkvflow.run import execute
    g = qf.trace(qf.load_model("tiny"))
    feeds = feeds_for(g, 6, {"src": 9, "tgt": 7}, seed=2)
    run_kernel = execute.run_kernel

    def failing(node, op, source, fn, call, *args, **kw):
        if op == "unembed" and "out" in getattr(call, "keywords", {}):  # a part's rows, after the parts
            raise ExecutionError(f"node {node} failed in a part")
        return run_kernel(node, op, source, fn, call, *args, **kw)
    monkeypatch.setattr(execute, "run_kernel", failing)
    before = _blas_threads()
    with pytest.raises(ExecutionError, match="failed in a part"):
        qf.Executor(g, qf.init_params(g, seed=0), workers=2).run(feeds)
    assert splits == [[(0, 3), (3, 6)]] and _blas_threads() == before


def test_unembed_refuses_to_write_into_an_array_it_would_have_to_copy():
    out = np.empty((3, 4, 5))[:, :, ::2]
    with pytest.raises(ValueError, match="C-ordered"):
        kernels.unembed(np.ones((3, 4, 2)), np.ones((3, 2)), None, out)
