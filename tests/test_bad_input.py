"""Bad input, through the CLI and the Python API: one clear sentence (exit 2 from the
CLI), never a traceback, no unbounded work, and no output file lost or half written."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import qkvflow as qf
from qkvflow import cli
from qkvflow.ir.errors import (ConfigError, GraphError, InputError, ModelLoadError, ParamError,
                               TraceError)


def shell(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkvflow", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=120)


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, the last stderr line one sentence carrying the needles."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qkvflow: error: "), proc.stderr
    for needle in needles:
        assert needle in last, (needle, last)
    return last


@pytest.fixture
def toml(tmp_path):
    def write(text: str, name: str = "m.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path
    return write


# --- configs and model files -------------------------------------------------------------

def test_a_misspelt_key_gets_the_closest_one(toml):
    refused(shell("check", toml('preset = "tiny"\nd_modle = 24\n')), "unknown key 'd_modle' (did you mean 'd_model'?)")


def test_check_o_says_what_it_wrote(tmp_path):
    (tmp_path / "m.toml").write_text('preset = "tiny"\nencoder_layers = -1\n')
    proc = shell("check", tmp_path / "m.toml", "-o", tmp_path / "c.txt")
    assert proc.returncode == 1 and proc.stdout.strip() == f"wrote {tmp_path / 'c.txt'}: 1 error(s), 0 warning(s)"


def test_a_report_without_matplotlib_leaves_out_only_the_heatmaps(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "r.html"
    assert cli.main(["report", "tiny", "-o", str(out), "--src", "5 6", "--tgt", "1"]) == 0
    assert "no heatmaps in the report: heatmaps need matplotlib" in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert 'id="stats"' in text and 'id="heatmaps"' not in text


@pytest.mark.parametrize("value, kind", [('["tiny"]', "list"), ('{ a = 1 }', "dict"), ("3", "int")])
def test_a_preset_that_is_not_a_string_is_named(toml, value, kind):
    refused(shell("check", toml(f"preset = {value}\n")), "preset must be str", kind)
    with pytest.raises(ConfigError, match="a preset is named by a string"):
        qf.preset(["tiny"])


def test_a_factory_raising_any_base_exception_is_one_line(tmp_path):
    (tmp_path / "boom.py").write_text(
        "import qkvflow\n"
        "class Boom(BaseException):\n    pass\n"
        "def at_call():\n    raise Boom('at call')\n"
        "def at_exit():\n    raise SystemExit(3)\n"
        "def at_trace():\n"
        "    def build():\n        raise Boom('while tracing')\n"
        "    return qkvflow.Model(name='m', dims={'batch': None}, build=build)\n")
    refused(shell("check", "boom.py:at_call", cwd=tmp_path), "factory 'boom.py:at_call' failed", "Boom: at call")
    refused(shell("check", "boom.py:at_exit", cwd=tmp_path), "SystemExit: 3")
    refused(shell("check", "boom.py:at_trace", cwd=tmp_path), "tracing 'm' failed", "Boom: while tracing")
    (tmp_path / "dies.py").write_text("class Boom(BaseException):\n    pass\nraise Boom('on import')\n")
    refused(shell("check", "dies.py:f", cwd=tmp_path), "importing 'dies.py' failed", "Boom: on import")


# --- unbounded work ------------------------------------------------------------------------

def test_ten_thousand_layers_are_refused_before_anything_is_built(toml):
    deep = toml('preset = "vaswani-base"\nencoder_layers = 10000\ndecoder_layers = 10000\n')
    start = time.perf_counter()
    refused(shell("check", deep), "20,000 layers", "--allow-large")
    assert time.perf_counter() - start < 30  # seconds, not the minutes tracing would take
    with pytest.raises(TraceError, match="allow_large=True"):
        qf.trace(qf.load_model(str(deep)))


def test_the_node_bound_holds_for_models_without_a_layer_count(monkeypatch):
    from qkvflow.tracing import tracer
    model = qf.load_model(f"{Path(__file__).parent / 'single_stream.py'}:decoder_only")
    n = qf.trace(model).number_of_nodes()
    monkeypatch.setattr(tracer, "MAX_NODES", n - 5)
    model.config = {}  # nothing to count before tracing: the tracer stops at the bound
    with pytest.raises(TraceError, match=f"more than {n - 5:,} graph nodes"):
        qf.trace(model)
    assert qf.trace(model, allow_large=True).number_of_nodes() == n


def test_allow_large_lets_a_large_model_through(toml, monkeypatch, capsys):
    from qkvflow.tracing import tracer
    monkeypatch.setattr(tracer, "MAX_NODES", 100)
    assert cli.main(["check", "tiny"]) == 2
    assert "--allow-large" in capsys.readouterr().err
    assert cli.main(["check", "tiny", "--allow-large"]) == 0


def test_a_run_that_cannot_fit_in_memory_is_refused_before_allocating(toml):
    huge = toml('preset = "tiny"\nd_model = 1200000\nheads = 1\nd_head = 1200000\nd_ff = 1000000\n')
    refused(shell("run", huge, "--src", "5", "--tgt", "1"), "the parameters of model 'm' need", "available")
    with pytest.raises(ParamError, match=r"need \d+\.\d [TP]B; this machine has"):
        qf.init_params(qf.trace(qf.load_model(str(huge))))
    g = qf.trace(qf.load_model("tiny"))
    ids = np.broadcast_to(np.int64(5), (2_000_000, 60))  # 60 tokens in 2 million rows, no copy made
    with pytest.raises(InputError, match=r"this run is too large: node .*scores's value .* would need"):
        qf.forward(g, qf.init_params(g), ids, ids[:, :50])


# --- what check finds, run refuses ---------------------------------------------------------

@pytest.mark.parametrize("change, code", [
    ("encoder_layers = -1", "QKV103"), ("d_model = 22", "QKV1"), ("pad_id = 41", "QKV1"),
    ("norm_eps = nan", "QKV103"), ("norm_eps = inf", "QKV103"),
])
def test_run_generate_and_demo_refuse_a_model_check_rejects(toml, tmp_path, change, code):
    model = toml(f'preset = "tiny"\n{change}\n')
    checked = shell("check", model)
    assert checked.returncode == 1 and code in checked.stdout, checked.stdout
    for args in (("run", model, "--src", "5 6", "--tgt", "1"), ("generate", model, "--src", "5 6"),
                 ("demo", "--model", model, "--out", tmp_path / "demo")):
        proc = shell(*args)
        refused(proc, "error finding(s)", "--no-check")
        assert code in proc.stderr  # the findings are shown
    assert not (tmp_path / "demo").exists()


def test_no_check_runs_such_a_model_anyway(toml):
    model = toml('preset = "tiny"\nencoder_layers = -1\n')
    proc = shell("run", model, "--src", "5 6", "--tgt", "1", "--no-check")
    assert proc.returncode == 0, proc.stderr
    assert "logits: shape (1, 1, 41)" in proc.stdout


def test_an_odd_rotary_head_size_is_refused_by_check_and_named_by_the_kernel_under_no_check(toml):
    model = toml('preset = "llama-tiny"\nd_head = 3\n')
    proc = shell("run", model, "--ids", "5 6 7")
    refused(proc, "error finding(s)", "--no-check")
    assert "QKV201" in proc.stderr and "d_head (3) is odd" in proc.stderr
    last = refused(shell("run", model, "--ids", "5 6 7", "--no-check"), "q_rotary (rotary,")
    assert last.endswith("rotary positions turn pairs of features, but the last axis has 3, an odd count"), last


# --- parameters ----------------------------------------------------------------------------

def test_a_misspelled_parameter_is_named_with_the_closest_real_one(tmp_path):
    g = qf.trace(qf.load_model("tiny"))
    params = qf.init_params(g)
    params["encoder.layers.0.self_attn.q_proj.weigth"] = params.pop("encoder.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ParamError, match=r"encoder\.layers\.0\.self_attn\.q_proj\.weigth is not a parameter of "
                                         r"model 'tiny'; the closest it has is encoder\.layers\.0\.self_attn"
                                         r"\.q_proj\.weight"):
        qf.forward(g, params, [[5, 6]], [[1]])
    qf.save_params(params, tmp_path / "w.safetensors")
    refused(shell("run", "tiny", "--src", "5 6", "--tgt", "1", "--params", tmp_path / "w.safetensors"),
            "q_proj.weigth is not a parameter")
    extra = {**qf.init_params(g), "decoder.extra.weight": np.ones(3)}
    with pytest.raises(ParamError, match="decoder.extra.weight is not a parameter"):
        qf.forward(g, extra, [[5, 6]], [[1]])


@pytest.mark.parametrize("value, needle", [
    ("hello", "dtype <U5"), (np.array([object()]), "dtype object"), ([[1], [1, 2]], "not an array of one shape"),
    (np.array(["a", "b"]), "dtype <U1"),
])
def test_save_params_writes_only_numbers_and_never_pickles(tmp_path, value, needle):
    for name in ("p.npz", "p.safetensors"):
        with pytest.raises(ParamError, match=needle):
            qf.save_params({"a": value}, tmp_path / name)
        assert not (tmp_path / name).exists()
    with pytest.raises(ParamError, match="must be a dict"):
        qf.save_params([np.ones(2)], tmp_path / "p.npz")


@pytest.mark.parametrize("call, error, needle", [
    (lambda g, p: qf.check("tiny"), GraphError, "trace it first: qkvflow.trace(qkvflow.load_model('tiny'))"),
    (lambda g, p: qf.explain("tiny"), GraphError, "got str"),
    (lambda g, p: qf.forward(g, p, [[5, 6], [7]], [[1], [1]]), InputError, "not an array of one shape"),
    (lambda g, p: qf.forward(g, p, [[5, 6]], [[1]], dtype="float16"), ParamError, "float16"),
    (lambda g, p: qf.init_params(g, dtype="bogus"), ParamError, "bogus"),
    (lambda g, p: qf.init_params(g, seed=-1), ParamError, "seed must be a non-negative integer"),
    (lambda g, p: qf.init_params(g, seed=1.5), ParamError, "seed must be a non-negative integer"),
    (lambda g, p: qf.forward(g, {k: v.tolist() for k, v in p.items()}, [[5]], [[1]]), ParamError, "is a list"),
    (lambda g, p: qf.forward(g, [1, 2], [[5]], [[1]]), ParamError, "must be a dict"),
    (lambda g, p: qf.forward(g, p, [["5"]], [[1]]), InputError, "integer token ids"),
    (lambda g, p: qf.eager(qf.load_model("tiny"), p, {"src_ids": [[1, 2], [3]]}), InputError,
     "not an array of one shape"),
    (lambda g, p: qf.load_model(3), ModelLoadError, "got 3"),
])
def test_python_api_misuse_is_one_qkvflow_error(call, error, needle):
    g = qf.trace(qf.load_model("tiny"))
    with pytest.raises(error) as caught:
        call(g, qf.init_params(g))
    assert needle in str(caught.value)


# --- files ---------------------------------------------------------------------------------

def test_a_read_only_output_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "graph.json"
    out.write_text("mine")
    out.chmod(0o444)
    refused(shell("trace", "tiny", "--format", "json", "-o", out), "graph.json' is read-only")
    assert out.read_text() == "mine" and stat.S_IMODE(out.stat().st_mode) == 0o444
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"mine")
    weights.chmod(0o400)
    with pytest.raises(ParamError, match="w.npz' is read-only"):
        qf.save_params(qf.init_params(qf.trace(qf.load_model("tiny"))), weights)
    assert weights.read_bytes() == b"mine"


def test_an_output_named_for_another_format_is_refused(tmp_path):
    refused(shell("render", "tiny", "-o", tmp_path / "x.svg", "--format", "png"),
            "x.svg' is named as svg, but the format asked for is png")
    assert not (tmp_path / "x.svg").exists()
    with pytest.raises(qf.QkvflowError, match="is named as mmd"):
        qf.render(qf.trace(qf.load_model("tiny")), tmp_path / "x.mmd", fmt="dot")
    assert shell("render", "tiny", "-o", tmp_path / "x.diagram", "--format", "mmd").returncode == 0


def test_a_replaced_output_keeps_its_mode_and_a_link_keeps_pointing(tmp_path):
    out = tmp_path / "table.txt"
    out.write_text("old")
    out.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(out)
    assert shell("trace", "tiny", "-o", link).returncode == 0
    assert link.is_symlink() and "path" in out.read_text()  # written through the link
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_failing_demo_leaves_no_output_behind(tmp_path):
    bad = tmp_path / "w.npz"
    np.savez(bad, x=np.ones(2))  # not tiny's parameters: the run, the demo's last stage, fails
    out = tmp_path / "demo"
    refused(shell("demo", "--model", "tiny", "--params", bad, "--out", out), "is not a parameter")
    assert not out.exists()
    out.mkdir()
    (out / "check.txt").write_text("from before")
    refused(shell("demo", "--model", "tiny", "--params", bad, "--out", out), "is not a parameter")
    assert [p.name for p in out.iterdir()] == ["check.txt"] and (out / "check.txt").read_text() == "from before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "w.npz"]  # no staging folder left
    proc = shell("demo", "--model", "tiny", "--out", out)  # the same folder, now whole
    assert proc.returncode == 0, proc.stderr
    assert {"graph.json", "check.sarif", "params.safetensors"} <= {p.name for p in out.iterdir()}


def test_a_folder_or_file_linked_to_another_file_system_is_written_whole(tmp_path):
    """Staged files reach a link's target even on another file system (/dev/shm, a tmpfs)."""
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    if elsewhere is None or os.stat(elsewhere).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to link to")
    try:
        (tmp_path / "linked").symlink_to(elsewhere)
        assert shell("demo", "--model", "tiny", "--out", tmp_path / "linked").returncode == 0
        assert {"graph.json", "params.safetensors"} <= {p.name for p in elsewhere.iterdir()}
        out = tmp_path / "demo"
        assert shell("demo", "--model", "tiny", "--out", out).returncode == 0
        (out / "params.safetensors").unlink()
        (elsewhere / "params.safetensors").write_bytes(b"old")
        (out / "params.safetensors").symlink_to(elsewhere / "params.safetensors")
        (out / "graph.json").write_text("old")
        assert shell("demo", "--model", "tiny", "--out", out).returncode == 0
        assert (out / "params.safetensors").is_symlink() and (elsewhere / "params.safetensors").read_bytes() != b"old"
        assert (out / "graph.json").read_text() != "old"
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_import_writes_both_files_or_neither(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config = transformers.GPT2Config(n_layer=1, n_embd=12, n_head=3, vocab_size=31, n_positions=16)
    folder = tmp_path / "hf"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    from qkvflow.run import params

    def fail(*_a, **_k):
        raise ParamError("cannot save parameters: the disk is full")
    monkeypatch.setattr(params, "save_params", fail)
    out = tmp_path / "out"
    assert cli.main(["import", str(folder), "-o", str(out)]) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert not out.exists()


# --- the command line itself ---------------------------------------------------------------

def test_every_subcommand_documents_its_options_model_forms_and_exit_codes():
    parser = cli._parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"presets", "trace", "check", "explain", "render", "run", "generate", "report",
                             "import", "diff", "demo"}
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        assert "exit codes: 0" in text and "2 the invocation" in text, name
        if name not in ("presets", "import"):
            assert "MODEL is one of" in text and "hf:PATH" in text, name
        for action in sub._actions:
            assert action.help, (name, action.dest)  # every option says what it does
    run_help = commands["run"].format_help()
    assert "seeded random unless --params" in " ".join(run_help.split())


@pytest.mark.parametrize("args, needle", [
    (["run", "tiny", "--source", "5", "--tgt", "1"], "qkvflow run: error: unrecognized arguments: --source 5"),
    (["run", "tiny", "--src", "5", "--tgt", "1", "--head", "1"], "give --attention FILE too"),
    (["check", "vaswani-bse"], "unknown model 'vaswani-bse' (did you mean 'vaswani-base'?)"),
    (["render", "tiny", "-o", "x.jpg"], "or give the format (--format, or fmt= in Python)"),
    (["run", "tiny", "--src", "5", "--tgt", "1", "--top", "-2"], "--top: expected a positive integer"),
    (["run", "tiny", "--src", "٣", "--tgt", "1"], "'٣' is not a token id"),
    (["generate", "tiny", "--src", "5", "--length-penalty", "nan"], "expected a finite number"),
])
def test_small_things(args, needle, tmp_path):
    proc = shell(*args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert needle in proc.stderr, proc.stderr
