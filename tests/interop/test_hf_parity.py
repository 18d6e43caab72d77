"""Hugging Face models imported from their saved folders run like the originals.

Each family's random-weight model is saved with ``save_pretrained`` and read
back with qkvflow's importer (no transformers at import time); logits must
agree on a padded batch: float64 to 1e-12 (with transformers' float32 steps
inside its float64 models recomputed in float64, see ``hf_models.float64``; T5
as transformers runs it, its norm's variance in float32, to 1e-5), float32 to 1e-4.
"""

import numpy as np
import pytest

import qkvflow as qf
from hf_models import CONFIGS, build, feeds, float64, hf_logits, save

pytest.importorskip("transformers")



@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    made = {}
    for family in CONFIGS:
        model = build(family)
        folder = save(model, tmp_path_factory.mktemp(family))
        made[family] = (model, qf.load_model(f"hf:{folder}"))
    return made


@pytest.mark.parametrize("family", CONFIGS)
def test_imported_model_checks_clean(imported, family):
    _, model = imported[family]
    assert qf.check(qf.trace(model)) == []


@pytest.mark.parametrize("family", CONFIGS)
def test_float64_logits_agree(imported, family):
    hf, model = imported[family]
    g = qf.trace(model)
    inputs = feeds(family, g.graph["dims"]["vocab"])
    ours = qf.forward(g, model.params, **inputs)["logits"]
    theirs = hf_logits(float64(hf), family, inputs)
    assert ours.shape == theirs.shape and ours.dtype == np.float64
    assert np.max(np.abs(ours - theirs)) <= 1e-12


def test_t5_as_transformers_runs_it_in_float64(imported):
    """T5's RMSNorm variance is taken in float32 even in a float64 model: that rounding is all there is."""
    _, model = imported["t5"]
    g = qf.trace(model)
    inputs = feeds("t5", g.graph["dims"]["vocab"])
    theirs = hf_logits(float64(build("t5"), exact=False), "t5", inputs)
    assert 1e-12 < np.max(np.abs(qf.forward(g, model.params, **inputs)["logits"] - theirs)) <= 1e-5


@pytest.mark.parametrize("family", CONFIGS)
def test_float32_logits_agree(imported, family):
    hf, model = imported[family]
    g = qf.trace(model)
    inputs = feeds(family, g.graph["dims"]["vocab"], seed=2)
    ours = qf.forward(g, model.params, dtype="float32", **inputs)["logits"]
    theirs = hf_logits(build(family).float(), family, inputs)
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_bert_pooled_output_agrees(tmp_path):
    """A bare BertModel (no MLM head) imports with the pooled head: hidden states and pooler output."""
    import torch
    import transformers as T
    torch.manual_seed(3)
    bert = T.BertModel(T.BertConfig(vocab_size=67, hidden_size=26, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=35, max_position_embeddings=45)).eval()
    model = qf.load_model(f"hf:{save(bert, tmp_path)}")
    assert model.config["head"] == "pooled"
    ids = feeds("bert", 67)["ids"]
    types = (np.arange(ids.shape[1]) >= 3).astype(np.int64)[None].repeat(2, axis=0)
    ours = qf.forward(qf.trace(model), model.params, ids=ids, type_ids=types)
    with torch.no_grad():
        out = bert.double()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0).long(),
                            token_type_ids=torch.from_numpy(types))
    assert np.max(np.abs(ours["hidden"] - out.last_hidden_state.numpy())) <= 1e-12
    assert np.max(np.abs(ours["pooled"] - out.pooler_output.numpy())) <= 1e-12


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_a_start_token_that_is_the_pad_id_is_read_not_masked(imported, family):
    """T5 and Marian begin the target with the pad id; transformers, given no decoder mask, reads it."""
    import torch
    hf, model = imported[family]
    g = qf.trace(model)
    src = np.array([[5, 6, 7, 8]])
    tgt = np.array([[model.config["pad_id"], 9, 10]])
    ours = qf.forward(g, model.params, src, tgt)["logits"]
    with torch.no_grad():
        theirs = float64(hf)(input_ids=torch.from_numpy(src), decoder_input_ids=torch.from_numpy(tgt)).logits
    assert np.max(np.abs(ours - theirs.numpy())) <= 1e-12
