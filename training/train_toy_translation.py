"""Train the toy English -> Chinese translator and ship its weights.

Usage (from the repository root, torch installed in .venv):

    .venv/bin/python training/train_toy_translation.py

Trains a ``torch.nn.Transformer(batch_first=True)`` plus the embeddings
qkvflow's config :data:`qkvflow.models.toy_translation.CONFIG` describes
(one token table shared by encoder and decoder, times sqrt(d_model), plus
the interleaved sinusoids of ``qkvflow.run.kernels.sinusoidal_table``; the
output is ``hidden @ table.T``), on the training split only. It then
converts the weights with ``qkvflow.from_torch_state_dict``, checks that
qkvflow's forward pass gives torch's logits, measures held-out exact match
with qkvflow's own forward (``qkvflow.demo.translate``) and writes
``src/qkvflow/models/data/toy-en-zh.safetensors`` (float32) with
``qkvflow.save_params`` -- only if held-out exact match >= 95%.

Seeded; deterministic as far as torch allows on CPU (fixed thread count,
deterministic algorithms).
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import qkvflow as qf
from qkvflow.demo import translate
from qkvflow.models import toy_translation as toy
from qkvflow.run.kernels import sinusoidal_table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "qkvflow" / "models" / toy.WEIGHTS
MIN_HELDOUT_EXACT = 0.95
MAX_BYTES = 2 * 1024 * 1024


class Translator(nn.Module):
    """nn.Transformer with qkvflow's embeddings, positions and tied output, as CONFIG says."""

    def __init__(self, cfg, dropout: float):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        nn.init.normal_(self.embed.weight, 0.0, cfg.d_model ** -0.5)
        self.transformer = nn.Transformer(
            d_model=cfg.d_model, nhead=cfg.heads, num_encoder_layers=cfg.encoder_layers,
            num_decoder_layers=cfg.decoder_layers, dim_feedforward=cfg.d_ff, dropout=dropout,
            activation=cfg.activation, layer_norm_eps=cfg.norm_eps, batch_first=True,
            norm_first=cfg.norm == "pre")
        table = sinusoidal_table(cfg.max_positions, cfg.d_model, cfg.positions, np.float32)
        self.register_buffer("positions", torch.from_numpy(table), persistent=False)
        self.scale = math.sqrt(cfg.d_model)

    def embed_ids(self, ids):
        return self.embed(ids) * self.scale + self.positions[:ids.shape[1]]

    def forward(self, src, tgt):
        pad = self.cfg.pad_id
        length = tgt.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)  # True: not allowed
        hidden = self.transformer(self.embed_ids(src), self.embed_ids(tgt), tgt_mask=causal,
                                  src_key_padding_mask=src == pad, tgt_key_padding_mask=tgt == pad,
                                  memory_key_padding_mask=src == pad)
        return hidden @ self.embed.weight.T  # tied output projection


def batches(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source ids (words, <eos>), decoder input (<bos>, words) and decoder target (words, <eos>), right-padded."""
    cfg = toy.CONFIG
    src = toy.encode_source([en for en, _ in pairs])
    zh = [toy.encode(z) for _, z in pairs]
    width = max(len(z) for z in zh) + 1
    tgt_in = np.full((len(pairs), width), cfg.pad_id, dtype=np.int64)
    tgt_out = np.full((len(pairs), width), cfg.pad_id, dtype=np.int64)
    for i, z in enumerate(zh):
        tgt_in[i, :len(z) + 1] = [cfg.bos_id] + z
        tgt_out[i, :len(z) + 1] = z + [cfg.eos_id]
    return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)


def exact_match(graph, params, pairs, dtype="float32") -> tuple[float, list]:
    got = translate([en for en, _ in pairs], graph=graph, params=params, dtype=dtype)
    wrong = [(en, zh, g) for (en, zh), g in zip(pairs, got) if g != zh]
    return 1.0 - len(wrong) / len(pairs), wrong


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = toy.CONFIG
    train, heldout = toy.train_pairs(), toy.heldout_pairs()
    assert not {en for en, _ in train} & {en for en, _ in heldout}
    print(f"corpus: {len(train) + len(heldout)} sentence pairs, {len(train)} train, {len(heldout)} held out; "
          f"vocabulary {cfg.vocab}")

    src, tgt_in, tgt_out = batches(train)
    model = Translator(cfg, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg.name}: {cfg.encoder_layers}+{cfg.decoder_layers} layers, d_model {cfg.d_model}, "
          f"{cfg.heads} heads, d_ff {cfg.d_ff}, {n_params} parameters")
    steps_per_epoch = math.ceil(len(train) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = min(200, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    loss_fn = nn.CrossEntropyLoss(ignore_index=cfg.pad_id, label_smoothing=args.label_smoothing)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total_loss, tokens = 0.0, 0
        for i in range(0, len(train), args.batch):
            idx = order[i:i + args.batch]
            s, ti, to = src[idx], tgt_in[idx], tgt_out[idx]
            width_s = int((s != cfg.pad_id).sum(1).max())
            width_t = int((to != cfg.pad_id).sum(1).max())
            s, ti, to = s[:, :width_s], ti[:, :width_t], to[:, :width_t]
            logits = model(s, ti)
            loss = loss_fn(logits.reshape(-1, cfg.vocab), to.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            n = int((to != cfg.pad_id).sum())
            total_loss += loss.item() * n
            tokens += n
        if epoch == 1 or epoch % 5 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  train loss {total_loss / tokens:.2e}  ({time.perf_counter() - start:.0f} s)")
    train_time = time.perf_counter() - start

    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)  # padded positions computed, as qkvflow does
    with torch.no_grad():  # the loss on the whole training split without dropout
        logits = model(src, tgt_in)
        final_loss = float(nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), tgt_out.reshape(-1),
                                                       ignore_index=cfg.pad_id))
        hs, hi, ho = batches(heldout)
        heldout_loss = float(nn.functional.cross_entropy(model(hs, hi).reshape(-1, cfg.vocab), ho.reshape(-1),
                                                         ignore_index=cfg.pad_id))
    print(f"trained in {train_time:.1f} s; cross-entropy per token without dropout: train {final_loss:.2e}, "
          f"held out {heldout_loss:.2e}")

    params = qf.from_torch_state_dict(model.transformer.state_dict(), cfg,
                                      embeddings={"encoder.embed.weight": model.embed.weight})
    params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    graph = qf.trace(qf.load_model(cfg))

    # The conversion is exact: qkvflow's forward gives torch's logits on a padded batch.
    probe = heldout[:16]
    ps, pi, _ = batches(probe)
    with torch.no_grad():
        want = model(ps, pi).double().numpy()
    got = qf.forward(graph, params, ps.numpy(), pi.numpy())["logits"]
    keep = (pi.numpy() != cfg.pad_id)
    diff = float(np.abs(got - want)[keep].max())
    print(f"qkvflow vs torch logits (float64 run of float32 weights): max abs diff {diff:.2e}")
    if diff > 1e-3:
        print("error: qkvflow's forward pass does not reproduce the torch model", file=sys.stderr)
        return 1

    acc_train, _ = exact_match(graph, params, train[::10])
    acc, wrong = exact_match(graph, params, heldout)
    print(f"exact match (qkvflow.demo.translate): train sample {acc_train:.2%} of {len(train[::10])}, "
          f"held out {acc:.2%} of {len(heldout)}")
    for en, zh, g in wrong[:10]:
        print(f"  wrong: {en!r} -> {g!r}, expected {zh!r}")
    for en in ("I love China", "you like tea"):
        print(f"  {en} -> {translate([en], graph=graph, params=params)[0]}")
    if acc < MIN_HELDOUT_EXACT:
        print(f"error: held-out exact match {acc:.2%} < {MIN_HELDOUT_EXACT:.0%}; weights not written",
              file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    qf.save_params(dict(sorted(params.items())), args.out)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({len(params)} tensors, {size / 1024:.0f} KiB)")
    if size >= MAX_BYTES:
        print(f"error: {args.out} is {size} bytes, over the 2 MB budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
