"""The NumPy reference against torch.nn.Transformer layers carrying the same weights.

Skipped when torch is not installed (`pip install torch==2.13.0`; CI installs it).
Tolerances from REFERENCE facts: ~2e-15 in float64, ~1e-6 in float32.
"""

import warnings

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.models.config import from_dict

torch = pytest.importorskip("torch")
from qkvflow.interop.torch_export import to_torch  # noqa: E402 - after the skip

CONFIGS = {
    "torch-transformer (final norms)": {"preset": "torch-transformer"},
    "vaswani-base (tied, post-norm)": {"preset": "vaswani-base"},
    "pre-norm, gelu, learned": {"preset": "vaswani-base", "norm": "pre", "activation": "gelu",
                                "positions": "learned", "shared_embeddings": False, "tied_embeddings": False},
}
# Small sizes, each different: heads 3, d_head 7, d_model 21, d_ff 29, vocab 41; batch 2, src 11, tgt 5.
SMALL = {"encoder_layers": 2, "decoder_layers": 2, "d_model": 21, "heads": 3, "d_ff": 29,
         "vocab": 41, "max_positions": 64}


def _ids():
    rng = np.random.default_rng(0)
    src = rng.integers(3, 41, (2, 11))
    src[1, -3:] = 0  # source padding
    tgt = rng.integers(3, 41, (2, 5))
    tgt[:, 0] = 1
    tgt[0, -1] = 0  # target padding
    return src, tgt


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 2e-5)])
def test_forward_matches_torch(name, dtype, tolerance):
    cfg = from_dict({**CONFIGS[name], **SMALL, "name": name})
    g = qf.trace(qf.load_model(cfg))
    params = qf.init_params(g, seed=7, dtype=dtype)
    src, tgt = _ids()
    ours = qf.forward(g, params, src, tgt, dtype=dtype)["logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on mixing bool and float masks
        theirs = to_torch(cfg, params)(src, tgt)
    assert ours.dtype == theirs.dtype == np.dtype(dtype)
    assert np.abs(ours - theirs).max() <= tolerance
