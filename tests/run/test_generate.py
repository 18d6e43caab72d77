"""Generation: greedy, beam search and sampling, against Hugging Face ``generate``.

The transformers models are random-weight, built from small configs with a
wide initialisation (so the next token depends on the source) and, for the
encoder–decoders, a raised end-token bias (so hypotheses end at different
steps and the EOS paths of beam search run).
"""

import numpy as np
import pytest

import qkvflow as qf


def _hf_models():
    T = pytest.importorskip("transformers")
    small = dict(encoder_layers=2, decoder_layers=2, max_position_embeddings=40)
    return {
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=53, d_model=24, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
            decoder_ffn_dim=37, init_std=0.3, **small)), 4.0),
        "marian": (lambda: T.MarianMTModel(T.MarianConfig(
            vocab_size=47, d_model=20, encoder_attention_heads=5, decoder_attention_heads=5, encoder_ffn_dim=33,
            decoder_ffn_dim=33, pad_token_id=46, decoder_start_token_id=46, eos_token_id=0,
            activation_function="swish", scale_embedding=True, init_std=0.3, **small)), 3.0),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=59, n_embd=18, n_layer=2, n_head=3, n_positions=37, bos_token_id=58, eos_token_id=58,
            initializer_range=0.3)), None),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=61, hidden_size=24, intermediate_size=19, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)), None),
    }


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch = pytest.importorskip("torch")
    made = {}
    for family, (make, eos_bias) in _hf_models().items():
        torch.manual_seed(0)
        model = make().eval()
        if eos_bias is not None:
            with torch.no_grad():
                model.final_logits_bias[0, model.config.eos_token_id] += eos_bias
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        ours = qf.load_model(f"hf:{folder}")
        made[family] = (model.double(), ours, qf.trace(ours))
    return made


def _inputs(family: str, g, ours) -> np.ndarray:
    rng = np.random.default_rng(0)
    vocab = g.graph["dims"]["vocab"]
    if family in ("gpt2", "llama"):
        return rng.integers(3, vocab - 2, size=(2, 4))  # prompts of one length
    pad = ours.config["pad_id"]
    src = rng.integers(3, vocab - 2, size=(4, 6))
    src[src == pad] = 3
    src[1, 4:] = pad  # a padded source in the batch
    return src


def _hf_generate(model, family, ids, ours, beams, max_new):
    import torch
    ids_t = torch.from_numpy(ids)
    kwargs = dict(max_new_tokens=max_new, num_beams=beams, do_sample=False, early_stopping=False,
                  length_penalty=1.0, forced_eos_token_id=None, no_repeat_ngram_size=0, min_length=0,
                  repetition_penalty=1.0, num_return_sequences=1)
    if family in ("gpt2", "llama"):
        kwargs.update(attention_mask=torch.ones_like(ids_t), pad_token_id=ours.config["eos_id"])
    else:
        kwargs.update(attention_mask=ids_t != ours.config["pad_id"])
    with torch.no_grad():
        return model.generate(ids_t, **kwargs).numpy()


def _after_end(ids: np.ndarray, eos: int, start: int) -> np.ndarray:
    """Ids with everything after each row's first end token blanked: what fills a finished
    row (the pad id here, the end token in transformers when the pad id is 0) is not output."""
    out = ids.copy()
    for row in out:
        hit = np.flatnonzero(row[start:] == eos)
        if hit.size:
            row[start + hit[0] + 1:] = -1
    return out


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("family", ["bart", "marian", "gpt2", "llama"])
def test_token_ids_equal_hugging_face_generate(hf, family, beams):
    model, ours, g = hf[family]
    ids = _inputs(family, g, ours)
    got = qf.generate(g, ours.params, ids, max_new_tokens=12, beams=beams).ids
    want = _hf_generate(model, family, ids, ours, beams, 12)
    start = ids.shape[1] if family in ("gpt2", "llama") else 1
    assert got.shape == want.shape
    eos = ours.config["eos_id"]
    assert np.array_equal(_after_end(got, eos, start), _after_end(want, eos, start))


def test_the_end_token_ends_rows_at_different_steps(hf):
    """The EOS paths are exercised: greedy rows of one batch stop at different lengths."""
    _, ours, g = hf["bart"]
    ids = qf.generate(g, ours.params, _inputs("bart", g, ours), max_new_tokens=12).ids
    ends = [np.flatnonzero(row[1:] == ours.config["eos_id"]) for row in ids]
    lengths = {int(e[0]) if e.size else None for e in ends}
    assert len(lengths) > 1, lengths
    for row, end in zip(ids, ends):  # after the end: the pad id
        if end.size:
            assert (row[1 + end[0] + 1:] == ours.config["pad_id"]).all()


# --- without transformers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    g = qf.trace(qf.load_model("tiny"))
    return g, qf.init_params(g, seed=5)


def test_greedy_equals_argmax_of_full_forward(tiny):
    g, params = tiny
    src = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    out = qf.generate(g, params, src, max_new_tokens=6)
    assert out.ids.shape == (2, 7) and (out.ids[:, 0] == 1).all()
    logits = qf.forward(g, params, src, out.ids)["logits"]
    assert np.array_equal(np.argmax(logits[:, :-1], axis=-1), out.ids[:, 1:])


def test_sampling_is_seeded_and_stays_in_the_top_k(tiny):
    g, params = tiny
    src = np.array([[5, 6, 7, 8, 9]])
    a = qf.generate(g, params, src, max_new_tokens=8, sample=True, seed=3, temperature=1.5)
    b = qf.generate(g, params, src, max_new_tokens=8, sample=True, seed=3, temperature=1.5)
    c = qf.generate(g, params, src, max_new_tokens=8, sample=True, seed=4, temperature=1.5)
    assert np.array_equal(a.ids, b.ids) and not np.array_equal(a.ids, c.ids)
    top2 = qf.generate(g, params, src, max_new_tokens=8, sample=True, seed=3, top_k=2)
    logits = qf.forward(g, params, src, top2.ids)["logits"][0, :-1]
    best2 = np.argsort(-logits, axis=-1)[:, :2]
    assert all(tok in best2[t] for t, tok in enumerate(top2.ids[0, 1:]))
    nucleus = qf.generate(g, params, src, max_new_tokens=8, sample=True, seed=3, top_p=1e-9)
    greedy = qf.generate(g, params, src, max_new_tokens=8)
    assert np.array_equal(nucleus.ids, greedy.ids)  # the smallest nucleus is the most likely token


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tiny):
    g, params = tiny
    src = np.array([[5, 6, 7, 8, 9], [13, 14, 15, 16, 0]])
    greedy = qf.generate(g, params, src, max_new_tokens=5)
    beam = qf.generate(g, params, src, max_new_tokens=5, beams=4, length_penalty=0.0)
    assert (beam.scores >= greedy.scores - 1e-12).all()


def test_the_default_length_fits_the_model_without_a_note():
    model = qf.load_model("toy-en-zh")  # max_positions 32: room for 31 new tokens
    g = qf.trace(model)
    src = np.array([[3, 15, 31, 2]])
    quiet = qf.generate(g, model.params, src)
    assert quiet.note == "" and quiet.ids.shape[1] <= 32
    assert "max_new_tokens cut to 31" in qf.generate(g, model.params, src, max_new_tokens=40).note
    assert "generate" in dir(qf) and "diff" in dir(qf)


def test_generate_decoder_only_continues_the_prompt():
    g = qf.trace(qf.load_model("gpt2-tiny"))
    params = qf.init_params(g, seed=2)
    prompt = np.array([[5, 6, 7]])
    out = qf.generate(g, params, prompt, max_new_tokens=4)
    assert out.ids.shape == (1, 7) and np.array_equal(out.ids[:, :3], prompt)


@pytest.mark.parametrize("kwargs, needle", [
    ({"beams": 0}, "beams must be 1"),
    ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative integer, got -1"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
    ({"beams": 2, "sample": True}, "beams or sample"),
    ({"temperature": "a"}, "temperature must be a positive number, got 'a'"),
    ({"temperature": None}, "temperature must be a positive number, got None"),
    ({"length_penalty": "1"}, "length_penalty must be a finite number"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"early_stopping": "yes"}, "early_stopping must be True, False or 'never'"),
    ({"top_k": 5}, "give sample=True to sample"),
    ({"temperature": 2.0}, "give sample=True to sample"),
])
def test_bad_generation_options_are_one_line(tiny, kwargs, needle):
    g, params = tiny
    with pytest.raises(qf.QkvflowError, match=needle):
        qf.generate(g, params, np.array([[5, 6]]), **kwargs)


def test_bad_generation_inputs_are_one_line(tiny):
    g, params = tiny
    with pytest.raises(qf.QkvflowError, match="generate takes one input, src_ids .* got 2 by position"):
        qf.generate(g, params, np.array([[5, 6]]), np.array([[1]]))
    with pytest.raises(qf.QkvflowError, match="must be \\(batch, length\\) integer token ids, got 2 axes of float64"):
        qf.generate(g, params, np.array([[5.5, 6.0]]))
    bert = qf.trace(qf.load_model("bert-tiny"))
    with pytest.raises(qf.QkvflowError, match="its ids sequence is bidirectional, not causal"):
        qf.generate(bert, qf.init_params(bert), np.array([[5, 6]]))
    lm = qf.trace(qf.load_model("gpt2-tiny"))  # max_positions 37
    with pytest.raises(qf.QkvflowError, match="the prompt has 40 tokens, the model's max_positions is 37"):
        qf.generate(lm, qf.init_params(lm), np.full((1, 40), 5))
    cut = qf.generate(lm, qf.init_params(lm), np.full((1, 30), 5), max_new_tokens=20)
    assert cut.ids.shape == (1, 37) and "max_new_tokens cut to 7" in cut.note
    none = qf.generate(g, params, np.array([[5, 6]]), max_new_tokens=0, beams=3)
    assert none.ids.tolist() == [[1]] and none.scores.tolist() == [0.0]
