"""Random-weight Hugging Face models of every imported family, built from small configs
(no hub), each the size of the matching qkvflow ``-tiny`` preset, and the feeds to
compare them on: a padded batch, every axis a different size.

Where transformers itself computes in float32 inside a float64 model, ``float64()``
puts the exact values back, so float64 parity measures the models, not that rounding:
Marian builds its sinusoid table with ``torch.FloatTensor``, Llama its rotary angles
with ``.float()``, and the RMSNorms of T5 and Llama take their variance in float32
(``exact=False`` keeps those roundings: T5 then agrees to ~1e-6 only).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

BATCH, SRC, TGT, SEQ = 2, 7, 5, 6


def _configs() -> dict:
    small = dict(encoder_layers=2, decoder_layers=2)
    return {
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=53, d_model=24, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
            decoder_ffn_dim=37, max_position_embeddings=40, **small)),
        "marian": lambda: T.MarianMTModel(T.MarianConfig(
            vocab_size=47, d_model=20, encoder_attention_heads=5, decoder_attention_heads=5, encoder_ffn_dim=33,
            decoder_ffn_dim=33, max_position_embeddings=50, pad_token_id=46, decoder_start_token_id=46,
            eos_token_id=0, activation_function="swish", scale_embedding=True, **small)),
        "marian-separate": lambda: T.MarianMTModel(T.MarianConfig(  # source and target vocabularies apart
            vocab_size=47, decoder_vocab_size=31, share_encoder_decoder_embeddings=False, d_model=20,
            encoder_attention_heads=5, decoder_attention_heads=5, encoder_ffn_dim=33, decoder_ffn_dim=33,
            max_position_embeddings=50, pad_token_id=30, decoder_start_token_id=30, eos_token_id=0,
            activation_function="swish", scale_embedding=True, **small)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=43, d_model=20, d_kv=7, d_ff=29, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, relative_attention_num_buckets=8, relative_attention_max_distance=20)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=59, n_embd=18, n_layer=2, n_head=3, n_positions=37, pad_token_id=0, bos_token_id=58,
            eos_token_id=58)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=61, hidden_size=24, intermediate_size=19, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(
            vocab_size=67, hidden_size=26, num_hidden_layers=2, num_attention_heads=2, intermediate_size=35,
            max_position_embeddings=45)),
    }


CONFIGS = _configs()
ENCODER_DECODER = ("bart", "marian", "marian-separate", "t5")
PADS = {"bart": 1, "marian": 46, "marian-separate": 30, "t5": 0, "gpt2": 0, "llama": 0, "bert": 0}
START = {"bart": 2, "marian": 46, "marian-separate": 30, "t5": 0}  # decoder_start_token_id


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return CONFIGS[family]().eval()


def save(model, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def float64(model, exact: bool = True):
    """The model in float64, with the values transformers rounds to float32 recomputed."""
    model = model.double()
    for module in model.modules() if exact else ():
        name = type(module).__name__
        if name in ("T5LayerNorm", "LlamaRMSNorm"):
            def norm(x, module=module):
                variance = x.pow(2).mean(-1, keepdim=True)
                return module.weight * (x * torch.rsqrt(variance + module.variance_epsilon))

            module.forward = norm
        elif name == "MarianSinusoidalPositionalEmbedding":
            n, d = module.weight.shape
            angle = np.arange(n)[:, None] / np.power(10000, 2 * (np.arange(d) // 2) / d)
            table = np.concatenate([np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])], axis=1)
            module.weight.data = torch.from_numpy(table)
        elif name == "LlamaRotaryEmbedding":
            dim = 2 * module.inv_freq.shape[0]
            theta = module.config.rope_parameters["rope_theta"]
            module.inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

            def forward(x, position_ids, module=module):
                angles = position_ids[..., None].double() * module.inv_freq
                emb = torch.cat((angles, angles), dim=-1)
                return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

            module.forward = forward
    return model


def feeds(family: str, vocab: int, seed: int = 1) -> dict:
    """Token ids with the second row padded at the end (ids 3.. avoid the special tokens)."""
    rng = np.random.default_rng(seed)
    pad = PADS[family]

    def ids(length, real):
        x = rng.integers(3, vocab - 1, size=(BATCH, length))
        x[x == pad] = 3
        x[1, real:] = pad
        return x

    if family in ENCODER_DECODER:
        tgt = ids(TGT, TGT - 1)
        tgt[:, 0] = START[family]  # the decoder starts with its start token (T5's and Marian's is the pad id)
        return {"src_ids": ids(SRC, SRC - 2), "tgt_ids": tgt}
    return {"ids": ids(SEQ, SEQ - 2)}


def hf_logits(model, family: str, inputs: dict) -> np.ndarray:
    pad = PADS[family]
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        if family in ENCODER_DECODER:
            keep = t["tgt_ids"] != pad
            keep[:, 0] = True  # the start token is never padding
            out = model(input_ids=t["src_ids"], attention_mask=t["src_ids"] != pad,
                        decoder_input_ids=t["tgt_ids"], decoder_attention_mask=keep)
        else:
            out = model(input_ids=t["ids"], attention_mask=(t["ids"] != pad).long())
    return out.logits.numpy()
