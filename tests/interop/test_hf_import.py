"""`qkvflow import`, `hf:PATH` models and `qkvflow diff`, through the CLI and the API,
and the one-line errors of folders qkvflow cannot read or represent."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import qkvflow as qf
from hf_models import build, save

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def shell(*args):
    return subprocess.run([sys.executable, "-m", "qkvflow", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: save(build(family), tmp_path_factory.mktemp(family)) for family in ("bart", "gpt2", "llama")}


def perturbed(family: str, module: str, folder) -> str:
    """The same model with one bias (or, without biases, one weight row) moved by 0.5."""
    model = build(family)
    target = dict(model.named_modules())[module]
    with torch.no_grad():
        (target.bias if target.bias is not None else target.weight[0]).add_(0.5)
    return save(model, folder)


# --- import ---------------------------------------------------------------------------------------

def test_import_writes_a_model_and_params_that_run_like_the_folder(folders, tmp_path):
    proc = shell("import", folders["bart"], "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "imported encoder_decoder model" in proc.stdout
    toml, params = tmp_path / "out" / "model.toml", tmp_path / "out" / "params.safetensors"
    via_files = shell("run", toml, "--params", params, "--src", "5 6 7 9", "--tgt", "2 8 4")
    direct = shell("run", f"hf:{folders['bart']}", "--src", "5 6 7 9", "--tgt", "2 8 4")
    assert via_files.returncode == direct.returncode == 0, via_files.stderr + direct.stderr
    assert via_files.stdout.splitlines()[1:] == direct.stdout.splitlines()[1:]
    assert direct.stdout.startswith(f"weights: imported with hf:{folders['bart']}")
    assert qf.check(qf.trace(qf.load_model(str(toml)))) == []


def test_sharded_folder_imports_the_same_tensors(folders, tmp_path):
    model = build("gpt2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    one, sharded = qf.load_model(f"hf:{folders['gpt2']}"), qf.load_model(f"hf:{tmp_path}")
    assert one.params.keys() == sharded.params.keys()
    assert all(np.array_equal(one.params[k], sharded.params[k]) for k in one.params)


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "xlnet"}, "model_type 'xlnet' is not supported; qkvflow imports bart, marian, t5, gpt2"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = True is not supported"),
    ({"activation_function": "quick_gelu"}, "activation 'quick_gelu' is not one qkvflow runs"),
    ({"n_embd": 24}, "gives decoder.embed.weight the shape (59, 18), expected (59, 24)"),
])
def test_a_config_qkvflow_cannot_represent_is_one_line_and_exit_2(folders, tmp_path, change, needle):
    folder = _copy(folders["gpt2"], tmp_path)
    _edit_config(folder, **change)
    proc = shell("import", folder, "-o", tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_llama_rope_scaling_is_refused_not_approximated(folders, tmp_path):
    folder = _copy(folders["llama"], tmp_path)
    _edit_config(folder, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})
    with pytest.raises(qf.QkvflowError, match="rope type 'llama3' is not supported"):
        qf.load_model(f"hf:{folder}")


def test_missing_leftover_and_pickled_tensors_are_named(folders, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder = _copy(folders["gpt2"], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "transformer.h.0.attn.c_attn.weigth": tensors["transformer.h.0.attn.c_attn.weight"]},
              folder / "model.safetensors")
    proc = shell("run", f"hf:{folder}", "--ids", "5 6")
    assert proc.returncode == 2 and "tensor transformer.h.0.attn.c_attn.weigth has no place in qkvflow's gpt2 model" \
        in proc.stderr, proc.stderr
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, folder / "model.safetensors")
    proc = shell("run", f"hf:{folder}", "--ids", "5 6")
    assert proc.returncode == 2 and "tensor ln_f.bias (for decoder.norm.bias) is missing" in proc.stderr
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    proc = shell("import", folder, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "only pickled weights" in proc.stderr and "never pickle" in proc.stderr
    proc = shell("run", f"hf:{tmp_path / 'nowhere'}", "--ids", "5")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_untied_weights_that_should_be_tied_are_refused(folders, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder = _copy(folders["bart"], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.shared.weight"] + 1.0
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(qf.QkvflowError, match="lm_head.weight should be the same tied weight"):
        qf.load_model(f"hf:{folder}")


# --- diff -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bart", "gpt2", "llama"])
def test_diff_of_a_faithful_import_agrees_everywhere(folders, family):
    model = qf.load_model(f"hf:{folders[family]}")
    report = qf.diff(model, model.params, f"hf:{folders[family]}")
    assert report.first_divergence is None
    assert len(report.rows) > 10 and report.rows[-1].module == "logits"
    assert max(r.rel for r in report.rows) < (1e-6 if family == "llama" else 1e-12)


@pytest.mark.parametrize("family, module, node", [
    ("bart", "model.decoder.layers.1.self_attn.v_proj", "decoder.layers.1.self_attn.v_proj"),
    ("gpt2", "transformer.h.1.attn.c_attn", "decoder.layers.1.self_attn.q_proj"),
    ("llama", "model.layers.1.self_attn.v_proj", "decoder.layers.1.self_attn.v_proj"),
])
def test_diff_names_the_first_divergent_node_and_its_line(folders, tmp_path, family, module, node):
    other = perturbed(family, module, tmp_path / "other")
    proc = shell("diff", f"hf:{folders[family]}", "--against", f"hf:{other}")
    assert proc.returncode == 1, proc.stderr
    first = proc.stdout.strip().splitlines()[-1]
    assert first.startswith(f"first divergent node: {node} (") and "blocks.py:" in first, first
    assert f"against {module}:" in first
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:] if line.strip() and "  " in line]
    assert rows.index(node) > 0  # earlier nodes agreed


def test_diff_api_with_a_model_in_memory_and_given_ids(folders):
    model = qf.load_model(f"hf:{folders['bart']}")
    other = build("bart")
    with torch.no_grad():
        other.model.encoder.layers[0].fc1.bias.add_(0.25)
    ids = {"src_ids": np.array([[5, 6, 7, 8]]), "tgt_ids": np.array([[2, 9, 10]])}
    report = qf.diff(model, model.params, f"hf:{folders['bart']}", inputs=ids, other=other)
    assert report.first_divergence.node == "encoder.layers.0.linear1"
    assert all(r.agrees(1e-12) for r in report.rows[:report.rows.index(report.first_divergence)])


def test_diff_api_takes_a_model_spec_and_its_own_weights(folders):
    report = qf.diff(f"hf:{folders['gpt2']}", against=f"hf:{folders['gpt2']}")
    assert report.first_divergence is None and str(report).splitlines()[0].startswith("qkvflow node")
    with pytest.raises(qf.QkvflowError, match="needs the qkvflow model's weights"):
        qf.diff("gpt2-tiny", against=f"hf:{folders['gpt2']}")


def test_diff_without_weights_is_a_usage_error(folders):
    proc = shell("diff", "bart-tiny", "--against", f"hf:{folders['bart']}")
    assert proc.returncode == 2 and "has no weights: give --params FILE" in proc.stderr


# --- what a demanding user feeds it ---------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"model_type": ["gpt2"]}, "model_type ['gpt2'] is not supported"),
    ({"model_type": None}, "config.json has no model_type"),
    ({"n_layer": "2"}, "config.json n_layer = '2', expected an integer >= 0"),
    ({"n_head": 0}, "config.json n_head = 0, expected an integer >= 1"),
    ({"activation_function": ["relu"]}, "activation ['relu'] is not one qkvflow runs"),
    ({"scale_attn_weights": "false"}, "config.json scale_attn_weights = 'false', expected true or false"),
    ({"layer_norm_epsilon": -1}, "layer_norm_epsilon = -1, expected a positive number"),
])
def test_wrong_typed_config_values_name_the_key_of_config_json(folders, tmp_path, change, needle):
    folder = _copy(folders["gpt2"], tmp_path)
    _edit_config(folder, **change)
    with pytest.raises(qf.QkvflowError) as err:
        qf.load_model(f"hf:{folder}")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_shard_index_says_where_each_tensor_is(folders, tmp_path):
    from safetensors.numpy import load_file, save_file
    model = build("gpt2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    extra = load_file(tmp_path / second)
    save_file({**extra, name: load_file(tmp_path / first)[name] + 1.0}, tmp_path / second)
    with pytest.raises(qf.QkvflowError, match=f"holds tensor {re_escape(name)}, which the index puts in"):
        qf.load_model(f"hf:{tmp_path}")


def re_escape(text: str) -> str:
    import re
    return re.escape(text)


def test_diff_refuses_another_family_or_size(folders, tmp_path):
    proc = shell("diff", f"hf:{folders['gpt2']}", "--against", f"hf:{folders['llama']}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is a llama model with" in proc.stderr and "diff compares one model in two implementations" \
        in proc.stderr, proc.stderr
    bigger = T_build_gpt2(tmp_path)
    proc = shell("diff", f"hf:{folders['gpt2']}", "--against", f"hf:{bigger}")
    assert proc.returncode == 2 and "is a gpt2 model with d_model = 24" in proc.stderr, proc.stderr
    proc = shell("diff", f"hf:{folders['gpt2']}", "--against", f"hf:{folders['gpt2']}", "--tolerance", "nan")
    assert proc.returncode == 2 and "'nan' is not a non-negative number" in proc.stderr


def T_build_gpt2(tmp_path) -> str:
    import transformers as T
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=59, n_embd=24, n_layer=2, n_head=3, n_positions=37,
                                           pad_token_id=0, bos_token_id=58, eos_token_id=58))
    return save(model, tmp_path / "bigger")


def test_diff_of_a_bare_base_model(tmp_path):
    import transformers as T
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(vocab_size=67, hidden_size=26, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=35, max_position_embeddings=45))
    folder = save(bert, tmp_path / "bert")
    model = qf.load_model(f"hf:{folder}")
    report = qf.diff(model, model.params, f"hf:{folder}")
    assert report.first_divergence is None and len(report.rows) > 10
    assert report.rows[0].module.startswith("embeddings.")  # the bare model's own module names


def test_import_checks_its_output_folder_before_writing(folders, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = shell("import", folders["gpt2"], "-o", tmp_path / "file")
    assert proc.returncode == 2 and "is a file; -o takes a folder" in proc.stderr
    (tmp_path / "out" / "params.safetensors").mkdir(parents=True)
    proc = shell("import", folders["gpt2"], "-o", tmp_path / "out")
    assert proc.returncode == 2 and "is a folder; cannot write the file params.safetensors" in proc.stderr
    assert not (tmp_path / "out" / "model.toml").exists()
    proc = shell("import", folders["gpt2"] + "/config.json", "-o", tmp_path / "x")
    assert proc.returncode == 2 and "is a file; expected the Hugging Face model folder" in proc.stderr
