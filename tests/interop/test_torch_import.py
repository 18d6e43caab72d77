"""A torch.nn.Transformer state_dict imported into qkvflow: same logits, and errors that name the tensor.

Skipped when torch is not installed. The torch side is written here (embedding
* sqrt(d_model) + sinusoids, nn.Transformer with explicit masks, output
projection), independent of qkvflow's exporter.
"""

import math
import warnings

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.ir.errors import ConfigError, ParamError
from qkvflow.models.config import from_dict
from qkvflow.run.kernels import sinusoidal_table
from qkvflow.run.params import validate_params

torch = pytest.importorskip("torch")
from qkvflow.interop.torch_import import from_torch_state_dict  # noqa: E402 - after the skip

CFG = from_dict({"preset": "tiny", "shared_embeddings": False, "tied_embeddings": False, "final_norms": True})
D, VOCAB = 21, 41


def _transformer(seed: int = 0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no nested tensors with an odd head count: fine, we disable them anyway
        model = torch.nn.Transformer(d_model=D, nhead=3, num_encoder_layers=2, num_decoder_layers=2,
                                     dim_feedforward=29, dropout=0.0, batch_first=True, dtype=dtype, **options)
    with torch.no_grad():  # norm weights and biases random too, not torch's ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def _tables(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0.0, D ** -0.5, (VOCAB, D))
            for name in ("encoder.embed.weight", "decoder.embed.weight", "decoder.unembed.weight")}


def _ids():
    rng = np.random.default_rng(0)
    src = rng.integers(3, VOCAB, (2, 6))
    tgt = rng.integers(3, VOCAB, (2, 5))
    tgt[:, 0] = 1
    src[1, -2:] = 0  # the second row padded at the end
    tgt[1, -1:] = 0
    return src, tgt


def _torch_logits(model, tables: dict, src, tgt) -> np.ndarray:
    def t(a):
        return torch.as_tensor(a, dtype=torch.float64)

    def positions(stream: str, length: int):
        if f"{stream}.positional.weight" in tables:  # learned
            return t(tables[f"{stream}.positional.weight"][:length])
        return t(sinusoidal_table(length, D, "sinusoidal", np.float64))

    src, tgt = torch.as_tensor(src), torch.as_tensor(tgt)
    scale = math.sqrt(D)
    x = t(tables["encoder.embed.weight"])[src] * scale + positions("encoder", src.shape[1])
    y = t(tables["decoder.embed.weight"])[tgt] * scale + positions("decoder", tgt.shape[1])
    causal = torch.triu(torch.full((tgt.shape[1], tgt.shape[1]), float("-inf"), dtype=torch.float64), 1)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on mixing bool and float masks
            out = model(x, y, tgt_mask=causal, src_key_padding_mask=src == 0, tgt_key_padding_mask=tgt == 0,
                        memory_key_padding_mask=src == 0)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return (out @ t(tables["decoder.unembed.weight"]).T).numpy()


@pytest.fixture(scope="module")
def graph():
    return qf.trace(qf.load_model(CFG))


@pytest.fixture(scope="module")
def model():
    return _transformer()


def test_logits_match_torch(graph, model):
    tables = _tables()
    params = from_torch_state_dict(model.state_dict(), CFG, embeddings=tables)
    validate_params(graph, params)
    assert params["encoder.layers.0.self_attn.q_proj.weight"].shape == (D, D)
    packed = model.state_dict()["decoder.layers.1.multihead_attn.in_proj_weight"].numpy()
    assert np.array_equal(params["decoder.layers.1.cross_attn.v_proj.weight"], packed[2 * D:])
    src, tgt = _ids()
    ours = qf.forward(graph, params, src, tgt, dtype="float64")["logits"]
    theirs = _torch_logits(model, tables, src, tgt)
    assert ours.dtype == theirs.dtype == np.float64
    assert np.abs(ours - theirs).max() <= 1e-12


def test_pre_norm_gelu_learned_positions():
    cfg = from_dict({"preset": "tiny", "norm": "pre", "activation": "gelu", "positions": "learned",
                     "shared_embeddings": False, "tied_embeddings": False})
    model = _transformer(seed=5, norm_first=True, activation="gelu")
    rng = np.random.default_rng(2)
    tables = {**_tables(), **{f"{s}.positional.weight": rng.normal(0.0, 0.3, (64, D)) for s in ("encoder", "decoder")}}
    g = qf.trace(qf.load_model(cfg))
    params = from_torch_state_dict(model.state_dict(), cfg, embeddings=tables)
    src, tgt = _ids()
    ours = qf.forward(g, params, src, tgt)["logits"]
    assert np.abs(ours - _torch_logits(model, tables, src, tgt)).max() <= 1e-12


def test_params_are_copies(model):
    params = from_torch_state_dict(model.state_dict(), CFG, embeddings=_tables())
    weight = model.state_dict()["encoder.layers.0.linear1.weight"]
    params["encoder.layers.0.linear1.weight"][0, 0] = 123.0
    assert weight[0, 0].item() != 123.0


def test_prefixed_state_and_tables_in_state(graph, model):
    class Wrapper(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer
            self.src_embed = torch.nn.Embedding(VOCAB, D, dtype=torch.float64)
            self.generator = torch.nn.Linear(D, VOCAB, bias=False, dtype=torch.float64)

    wrapper = Wrapper(model)
    tables = _tables()
    with torch.no_grad():
        wrapper.src_embed.weight.copy_(torch.from_numpy(tables["encoder.embed.weight"]))
        wrapper.generator.weight.copy_(torch.from_numpy(tables["decoder.unembed.weight"]))
    state = dict(wrapper.state_dict())
    state["transformer.decoder.embed.weight"] = tables["decoder.embed.weight"]  # a qkvflow name under the prefix
    params = from_torch_state_dict(state, CFG, embeddings={"encoder.embed.weight": "src_embed.weight",
                                                           "decoder.unembed.weight": "generator.weight"})
    src, tgt = _ids()
    ours = qf.forward(graph, params, src, tgt)["logits"]
    assert np.abs(ours - _torch_logits(model, tables, src, tgt)).max() <= 1e-12


def test_numpy_state_float32():
    model = _transformer(seed=3, dtype=torch.float32)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tables = {k: v.astype(np.float32) for k, v in _tables().items()}
    params = from_torch_state_dict(state, CFG, embeddings=tables)
    assert {v.dtype for v in params.values()} == {np.dtype(np.float32)}


def test_exporter_round_trip(model):
    """The imported params, exported again with to_torch, give the original model's logits."""
    from qkvflow.interop.torch_export import to_torch
    tables = _tables()
    params = from_torch_state_dict(model.state_dict(), CFG, embeddings=tables)
    src, tgt = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = to_torch(CFG, params)(src, tgt)
    assert np.abs(again - _torch_logits(model, tables, src, tgt)).max() <= 1e-12


def _error(state, **kwargs) -> str:
    with pytest.raises(ParamError) as info:
        from_torch_state_dict(state, CFG, **{"embeddings": _tables(), **kwargs})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor(model):
    state = dict(model.state_dict())
    del state["decoder.layers.1.norm3.bias"]
    message = _error(state)
    assert "decoder.layers.1.norm3.bias" in message and "missing" in message and "(21,)" in message


def test_missing_table(model):
    tables = _tables()
    del tables["decoder.unembed.weight"]
    message = _error(model.state_dict(), embeddings=tables)
    assert "decoder.unembed.weight" in message and "embeddings=" in message and "(41, 21)" in message


def test_wrong_shape(model):
    state = dict(model.state_dict())
    state["encoder.layers.0.self_attn.in_proj_weight"] = state["encoder.layers.0.self_attn.in_proj_weight"][:D]
    message = _error(state)
    assert "encoder.layers.0.self_attn.in_proj_weight" in message
    assert "(21, 21)" in message and "(63, 21)" in message


def test_misspelled_name_suggests_the_expected_one(model):
    state = {("transformer." + k).replace("encoder.layers.1.linear1.weight", "encoder.layers.1.linear1.weigth"): v
             for k, v in model.state_dict().items()}
    message = _error(state)
    assert "transformer.encoder.layers.1.linear1.weigth" in message
    assert "did you mean transformer.encoder.layers.1.linear1.weight?" in message


def test_nan_weights(model):
    state = dict(model.state_dict())
    bad = state["decoder.layers.0.linear2.weight"].clone()
    bad[3, 4] = float("nan")
    state["decoder.layers.0.linear2.weight"] = bad
    message = _error(state)
    assert "decoder.layers.0.linear2.weight" in message and "NaN" in message


def test_final_norms_need_the_config_option(model):
    cfg = from_dict({"preset": "tiny", "shared_embeddings": False, "tied_embeddings": False})
    with pytest.raises(ParamError, match=r"encoder\.norm\.(weight|bias).*final_norms = true"):
        from_torch_state_dict(model.state_dict(), cfg, embeddings=_tables())


def test_unsupported_config(model):
    with pytest.raises(ConfigError, match="RMS|rms"):
        from_torch_state_dict(model.state_dict(), from_dict({"preset": "tiny", "norm_type": "rms"}))
