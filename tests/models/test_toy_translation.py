"""The toy English -> Chinese translator: its language, its split and its shipped weights.

The weights (``qkvflow/models/data/toy-en-zh.safetensors``) come from
``training/train_toy_translation.py``; here they are only read and run with
qkvflow's own forward pass (no torch needed).
"""

import functools
import pickle
from importlib import resources

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.demo import translate
from qkvflow.models import toy_translation as toy
from qkvflow.run.params import param_specs, validate_params


@functools.cache
def shipped():
    model, params, vocab = toy.load()
    return qf.trace(model), params, vocab


def weights_file():
    return resources.files("qkvflow.models").joinpath(toy.WEIGHTS)


def test_the_vocabulary_starts_with_the_special_tokens_then_english_then_chinese():
    assert toy.VOCAB[:3] == ("<pad>", "<bos>", "<eos>")
    assert (toy.CONFIG.pad_id, toy.CONFIG.bos_id, toy.CONFIG.eos_id) == (0, 1, 2)
    assert len(set(toy.VOCAB)) == len(toy.VOCAB) == toy.CONFIG.vocab
    is_chinese = [any("\u4e00" <= c <= "\u9fff" for c in w) for w in toy.VOCAB[3:]]
    first = is_chinese.index(True)
    assert not any(is_chinese[:first]) and all(is_chinese[first:])
    assert shipped()[2] == list(toy.VOCAB)


def test_every_sentence_and_every_word_round_trips():
    for en, zh in toy.sentence_pairs():
        for sentence in (en, zh):
            ids = toy.encode(sentence)
            assert min(ids) >= 3 and toy.decode(ids) == sentence
    for i, word in enumerate(toy.VOCAB[3:], start=3):
        assert toy.encode(word) == [i] and toy.decode([i]) == word
    used = {w for pair in toy.sentence_pairs() for s in pair for w in s.split()}
    assert used == set(toy.VOCAB[3:])  # no word of the vocabulary is unused


def test_decode_stops_at_eos_and_drops_bos_and_pad():
    ids = [1] + toy.encode("我 爱 中国") + [2] + toy.encode("茶") + [0, 0]
    assert toy.decode(ids) == "我 爱 中国"
    assert toy.decode(np.array([0, 1, 2])) == ""


def test_a_word_outside_the_language_is_refused_by_name():
    with pytest.raises(ValueError, match="'France'"):
        toy.encode("I love France")


def test_the_examples_are_in_the_language():
    pairs = dict(toy.sentence_pairs())
    assert pairs["I love China"] == "我 爱 中国"
    assert pairs["you like tea"] == "你 喜欢 茶"
    assert pairs["he does not drink coffee today"] == "他 今天 不 喝 咖啡"
    assert len(pairs) == len(toy.sentence_pairs())  # one translation per sentence


def test_the_heldout_split_is_fixed_about_15_percent_and_never_trained_on():
    pairs, train, heldout = toy.sentence_pairs(), toy.train_pairs(), toy.heldout_pairs()
    assert sorted(train + heldout) == sorted(pairs)
    train_en = {en for en, _ in train}
    assert not any(en in train_en for en, _ in heldout)
    assert 0.12 <= len(heldout) / len(pairs) <= 0.18
    assert heldout == [p for p in pairs if toy.is_heldout(p[0])]  # a hash of the sentence, not of the run


def test_the_shipped_weights_are_small_safetensors_read_without_pickle(monkeypatch):
    data = weights_file().read_bytes()
    assert len(data) < 2 * 1024 * 1024
    header = int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{" and header < len(data)  # a safetensors header, not a pickle

    def no_pickle(*args, **kwargs):
        raise AssertionError("the weights were read through pickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    model, params, _ = toy.load()
    graph = qf.trace(model)
    validate_params(graph, params)
    assert set(params) == set(param_specs(graph))
    assert {a.dtype for a in params.values()} == {np.dtype(np.float32)}
    with resources.as_file(weights_file()) as path:
        from_file = qf.load_params(path)
    assert all(np.array_equal(from_file[k], params[k]) for k in params)


def test_the_model_is_the_configured_torch_shaped_encoder_decoder():
    cfg = toy.CONFIG
    assert (cfg.family, cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.heads, cfg.d_ff) == (
        "encoder_decoder", 2, 2, 64, 4, 128)
    assert cfg.final_norms and cfg.shared_embeddings and cfg.tied_embeddings and cfg.norm == "post"
    graph, params, _ = shipped()
    assert not [d for d in qf.check(graph) if d.severity == "error"]
    assert "encoder.embed.weight" in params and "decoder.unembed.weight" not in params


def test_i_love_china_translates_with_the_shipped_weights():
    graph, params, _ = shipped()
    assert translate(["I love China", "you like tea"], graph=graph, params=params) == ["我 爱 中国", "你 喜欢 茶"]
    assert translate(["I love China"], graph=graph, params=params, dtype="float32") == ["我 爱 中国"]
    assert translate(["I love China"], graph=graph, params=params, beams=3) == ["我 爱 中国"]
    assert translate([], graph=graph, params=params) == []


def test_a_batch_of_different_lengths_translates_as_each_sentence_alone():
    graph, params, _ = shipped()
    sentences = ["she often does not drink tea", "I love China", "they also do not want noodles today"]
    together = translate(sentences, graph=graph, params=params)
    assert together == [translate([s], graph=graph, params=params)[0] for s in sentences]
    assert together == [dict(toy.sentence_pairs())[s] for s in sentences]


def test_heldout_exact_match_is_at_least_95_percent():
    graph, params, _ = shipped()
    heldout = toy.heldout_pairs()
    assert len(heldout) >= 100
    got = translate([en for en, _ in heldout], graph=graph, params=params)
    wrong = [(en, zh, g) for (en, zh), g in zip(heldout, got) if g != zh]
    assert 1 - len(wrong) / len(heldout) >= 0.95, wrong[:10]
