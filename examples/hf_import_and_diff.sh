#!/usr/bin/env bash
# Import a Hugging Face model folder, run it, and compare it node by node with transformers.
# Needs torch (CPU wheel: pip install torch==2.13.0) and transformers to make the folder;
# qkvflow's import itself reads only config.json and the safetensors.
set -euo pipefail
dir=${1:-/tmp/qkvflow-bart}
python - "$dir" <<'PY'
import sys, torch, transformers as T
torch.manual_seed(0)
config = T.BartConfig(vocab_size=53, d_model=24, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=40)
T.BartForConditionalGeneration(config).save_pretrained(sys.argv[1])              # a random-weight BART
model = T.BartForConditionalGeneration.from_pretrained(sys.argv[1])
with torch.no_grad():
    model.model.decoder.layers[1].self_attn.v_proj.bias[0] += 0.5                   # one planted difference
model.save_pretrained(sys.argv[1] + "-perturbed")
PY
qkvflow import "$dir" -o "$dir-qkvflow"
qkvflow run "hf:$dir" --src "5 6 7 8" --tgt "2 9 10" --top 2
qkvflow diff "hf:$dir" --against "hf:$dir" | tail -3
qkvflow diff "hf:$dir" --against "hf:$dir-perturbed" | tail -8 || true   # exit 1: they diverge
