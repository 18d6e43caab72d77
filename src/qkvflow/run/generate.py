"""Generation: the decoder writes one token at a time.

:func:`generate` decodes greedily, by beam search (length penalty, early
stop on EOS, a batch of sources with padding) or by sampling with a seed
(temperature, top-k, top-p), for encoder–decoder models (from ``src_ids``,
the target starting with the model's start token ``bos_id``) and
decoder-only models (continuing ``ids``).

Each step needs the logits of the last position. What does not depend on
the target (found by :func:`qkvflow.ir.graph.independent_of`: the encoder
and every cross-attention's K and V) is computed once per source and given
to the executor as known values; the rest of the graph runs on the prefix,
with the executor's runtime checks on (each new shape signature verified
once). Beam search follows the algorithm of Hugging Face ``generate``
(top 2*beams candidates per step, finished hypotheses scored by
``score / length ** length_penalty``), so its token ids can be compared.
"""

import dataclasses
import math
import sys

import networkx as nx
import numpy as np

from ..ir.errors import InputError
from ..ir.graph import independent_of, position_limit, required_inputs
from .execute import Executor
from .incremental import IncrementalRunner, NotIncremental, seq_dim_of, take_rows

__all__ = ["Generation", "generate"]


@dataclasses.dataclass
class Generation:
    """Token ids (batch, length): an encoder–decoder's targets from the start token, a
    decoder-only model's prompt and continuation; ``scores``: the beams' final scores
    (beam search) or the sum of the chosen tokens' log-probabilities; ``cached``:
    whether the steps ran incrementally (else ``note`` says why they did not)."""

    ids: np.ndarray
    scores: np.ndarray
    steps: int
    cached: bool = False
    note: str = ""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    shifted = x - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class _Stepper:
    """Last-position logits of prefixes: the target-independent nodes computed once per
    source, given to the executor as known values at every step."""

    cached = False
    note = ""

    def __init__(self, executor: Executor, fixed_feeds: dict, seq_input: str) -> None:
        self.executor, self.fixed_feeds, self.seq_input = executor, fixed_feeds, seq_input
        g = executor.graph
        self.output = g.nodes[g.graph["outputs"][0]]["attrs"]["name"]
        self.known: dict = {}
        if fixed_feeds:  # an encoder–decoder's source: what does not depend on the target, once
            fixed = independent_of(g, [seq_input])
            first = next(iter(fixed_feeds.values()))
            start = np.zeros((first.shape[0], 1), dtype=np.int64)
            acts = executor.run({**fixed_feeds, seq_input: start}, capture=True, only=fixed)["activations"]
            for node in fixed:
                if g.nodes[node]["op"] == "input" or node not in acts:
                    continue
                self.known[node] = acts[node]

    def _rows(self, rows: np.ndarray) -> tuple[dict, dict]:
        """The fixed feeds and known values of each row's source."""
        key = rows.tobytes()
        if getattr(self, "_rows_key", None) != key:
            self._rows_key = key
            self._fixed = {name: value[rows] for name, value in self.fixed_feeds.items()}
            g = self.executor.graph
            self._known = {n: take_rows(v, g.nodes[n]["shape"], rows, g.graph["dims"]) for n, v in self.known.items()}
        return self._fixed, self._known

    def reorder(self, parents: np.ndarray) -> None:
        """Row i of the next step continues row parents[i] of this one (beam search)."""

    def logits(self, prefix: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(N, V) logits of the last position of each prefix row; ``rows`` maps each row
        to its source (its batch row of the fixed feeds)."""
        fixed, known = self._rows(rows)
        return self.executor.run({**fixed, self.seq_input: prefix}, initial=known)[self.output][:, -1, :]


class _CachedStepper(_Stepper):
    """The same logits, each step computing only the new position (see :mod:`.incremental`)."""

    cached = True

    def __init__(self, executor, fixed_feeds, seq_input) -> None:
        super().__init__(executor, fixed_feeds, seq_input)
        self.runner = IncrementalRunner(executor, seq_dim_of(executor.graph, seq_input), set(self.known))
        self.parents = None

    def reorder(self, parents: np.ndarray) -> None:
        self.parents = parents

    def logits(self, prefix: np.ndarray, rows: np.ndarray) -> np.ndarray:
        fixed, known = self._rows(rows)
        n_past = self.runner.length
        if n_past and n_past == prefix.shape[1] - 1:
            if self.parents is not None:
                self.runner.reorder(self.parents)
            out = self.runner.run({**fixed, self.seq_input: prefix[:, -1:]}, known, n_past)
        else:
            out = self.runner.run({**fixed, self.seq_input: prefix}, known, 0)
        self.parents = None
        return out[self.output][:, -1, :]


def _stepper(executor, fixed_feeds, seq_input, cache: bool):
    if cache:
        try:
            return _CachedStepper(executor, fixed_feeds, seq_input)
        except NotIncremental as err:
            stepper = _Stepper(executor, fixed_feeds, seq_input)
            stepper.note = f"full recompute at every step: {err}"
            return stepper
    return _Stepper(executor, fixed_feeds, seq_input)


def _progress(enabled: bool):
    def show(step: int, total: int, done: bool = False) -> None:
        if enabled:
            sys.stderr.write(f"\rgenerating: step {step}/{total}" + ("\n" if done else ""))
            sys.stderr.flush()
    return show


def generate(graph: nx.MultiDiGraph, params: dict, *inputs, max_new_tokens: int | None = None, beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             dtype: str = "float64", check: bool = True, cache: bool = True, progress: bool | None = None,
             **named) -> Generation:
    """Generate token ids with ``graph`` and ``params``.

    An encoder–decoder takes ``src_ids`` (batch, src) (padded with its pad id);
    a decoder-only model takes ``ids`` (batch, seq), the prompt (rows of one
    length). Stops at ``max_new_tokens`` new tokens (default: 32, or as many as
    the model's max_positions leaves room for) or when every row has
    written the model's ``eos_id``; finished rows are filled with the pad id
    (the end token when the model has none). ``cache``: each step computes the
    new position only, from a cache derived from the graph (see
    :mod:`qkvflow.run.incremental`); a model it cannot derive it for runs by full
    recompute, ``note`` saying why. ``progress``: a step counter on stderr
    (default: when stderr is a terminal and more than 64 steps may run).
    """
    g = graph
    names = required_inputs(g)
    cfg = g.graph.get("config", {})
    given = names[:1]  # an encoder–decoder's source, or a decoder-only model's prompt; the rest is written
    feeds = dict(zip(given, inputs))
    feeds.update(named)
    if set(feeds) != set(given) or len(inputs) > len(given):
        raise InputError(f"generate takes one input, {given[0] if given else 'token ids'} (the model's inputs are "
                         f"{', '.join(names) or 'none'}); got {len(inputs)} by position and "
                         f"{', '.join(named) or 'none'} by name")
    asked = max_new_tokens is not None
    max_new_tokens = 32 if max_new_tokens is None else max_new_tokens
    _check_options(max_new_tokens, beams, top_k, seed, temperature, top_p, length_penalty, early_stopping, sample)
    if not sample and (top_k or top_p != 1.0 or temperature != 1.0):
        raise InputError("generate: temperature, top_k and top_p shape sampling; give sample=True to sample")
    eos, pad = cfg.get("eos_id"), cfg.get("pad_id")
    fill = pad if pad is not None and pad >= 0 else eos if eos is not None else 0
    for name, value in feeds.items():
        arr = np.asarray(value)
        if arr.ndim != 2 or arr.dtype.kind not in "iu":
            raise InputError(f"generate: {name} must be (batch, length) integer token ids, got "
                             f"{arr.ndim} axes of {arr.dtype}")
    if len(names) not in (1, 2):
        raise InputError(f"generate needs a model with one or two token inputs, not {', '.join(names) or 'none'}")
    seq_name = names[-1]  # an encoder–decoder's target (its source given), or the one input
    kind = g.graph.get("sequences", {}).get(seq_dim_of(g, seq_name))
    if kind != "causal":
        raise InputError(f"model {g.graph.get('model')!r}: its {seq_name} sequence is {kind or 'not declared'}, "
                         "not causal; only a causal sequence can be written one token at a time")
    fixed = {names[0]: np.asarray(feeds[names[0]])} if len(names) == 2 else {}
    if fixed:
        prompt = np.full((fixed[names[0]].shape[0], 1), cfg.get("bos_id", 1), dtype=np.int64)
    else:
        prompt = np.asarray(feeds[seq_name]).astype(np.int64)
    limit = position_limit(g)
    note = ""
    if limit and prompt.shape[1] + max_new_tokens > limit:
        if prompt.shape[1] >= limit:
            raise InputError(f"generate: the prompt has {prompt.shape[1]} tokens, the model's max_positions is "
                             f"{limit}: no room for a new token")
        if asked:
            note = f"max_new_tokens cut to {limit - prompt.shape[1]}: the model has max_positions = {limit}"
        max_new_tokens = limit - prompt.shape[1]
    if max_new_tokens == 0:
        return Generation(prompt, np.zeros(prompt.shape[0]), 0, False, note)
    executor = Executor(g, params, dtype=dtype, check=check)
    stepper = _stepper(executor, fixed, seq_name, cache)
    show = _progress(sys.stderr.isatty() and max_new_tokens > 64 if progress is None else progress)
    if beams > 1:
        out = _beam_search(stepper, prompt, max_new_tokens, beams, length_penalty, early_stopping, eos, fill, show)
    else:
        out = _greedy_or_sample(stepper, prompt, max_new_tokens, eos, fill, sample, temperature, top_k, top_p,
                                seed, show)
    out.cached, out.note = stepper.cached, "; ".join(n for n in (note, stepper.note) if n)
    return out


def _check_options(max_new_tokens, beams, top_k, seed, temperature, top_p, length_penalty, early_stopping,
                   sample) -> None:
    """Each option of the right type and range, else one line naming it."""
    for name, value in (("max_new_tokens", max_new_tokens), ("beams", beams), ("top_k", top_k), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"generate: {name} must be a non-negative integer, got {value!r}"[:200])
    if beams < 1:
        raise InputError("generate: beams must be 1 (greedy or sampling) or more (beam search), got 0")
    for name, value, ok, want in (("temperature", temperature, lambda v: v > 0, "a positive number"),
                                  ("top_p", top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                                  ("length_penalty", length_penalty, math.isfinite, "a finite number")):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or \
                not math.isfinite(value) or not ok(value):
            raise InputError(f"generate: {name} must be {want}, got {value!r}"[:200])
    if early_stopping not in (True, False, "never"):
        raise InputError(f"generate: early_stopping must be True, False or 'never', got {early_stopping!r}"[:200])
    if beams > 1 and sample:
        raise InputError("generate: beam search with sampling is not supported; choose beams or sample")


def _greedy_or_sample(stepper, prompt, max_new, eos, fill, sample, temperature, top_k, top_p, seed, show):
    rng = np.random.default_rng(seed)
    ids, rows = prompt.astype(np.int64), np.arange(prompt.shape[0])
    scores = np.zeros(prompt.shape[0])
    running = np.ones(prompt.shape[0], dtype=bool)
    steps = 0
    for steps in range(1, max_new + 1):
        logp = _log_softmax(stepper.logits(ids, rows))
        if sample:
            token = _sample(logp / temperature, top_k, top_p, rng)
        else:
            token = np.argmax(logp, axis=-1)
        scores += np.where(running, logp[np.arange(len(token)), token], 0.0)
        token = np.where(running, token, fill)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        if eos is not None:
            running &= token != eos
        show(steps, max_new)
        if not running.any():
            break
    show(steps, max_new, done=True)
    return Generation(ids, scores, steps)


def _sample(logits: np.ndarray, top_k: int, top_p: float, rng) -> np.ndarray:
    """One token per row from softmax(logits), keeping the top_k most likely (0: all) and the
    smallest set whose probability reaches top_p."""
    logits = logits.copy()
    if top_k:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        drop = np.cumsum(sorted_p, axis=-1) - sorted_p >= top_p  # keep up to and including the one reaching top_p
        sorted_p[drop] = 0.0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest k along the last axis, descending; ties to the lower index (as torch.topk on CPU)."""
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, order, axis=-1), order


def _gather(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """x (batch, beams, ...) at beam indices (batch, k)."""
    return x[np.arange(x.shape[0])[:, None], index]


def _beam_search(stepper, prompt, max_new, beams, length_penalty, early_stopping, eos, fill, show):
    batch, start_len = prompt.shape
    max_len = start_len + max_new
    keep = 2 * beams if eos is not None else beams
    running = np.full((batch, beams, max_len), fill, dtype=np.int64)
    running[:, :, :start_len] = prompt[:, None, :]
    finished_seq = running.copy()
    run_scores = np.zeros((batch, beams))
    run_scores[:, 1:] = -1e9
    fin_scores = np.full((batch, beams), -1e9)
    finished = np.zeros((batch, beams), dtype=bool)
    open_ = np.ones((batch, 1), dtype=bool)  # an early-stop heuristic still unsatisfied
    top_mask = np.arange(keep) < beams
    rows = np.repeat(np.arange(batch), beams)
    cur, steps = start_len, 0
    while cur < max_len:
        steps += 1
        logp = _log_softmax(stepper.logits(running[:, :, :cur].reshape(batch * beams, cur), rows))
        vocab = logp.shape[-1]
        total = (logp.reshape(batch, beams, vocab) + run_scores[:, :, None]).reshape(batch, beams * vocab)
        top_scores, top_index = _topk(total, keep)
        beam_of, token = top_index // vocab, top_index % vocab
        cand = _gather(running, beam_of)
        cand[:, :, cur] = token
        hits = (token == eos) if eos is not None else np.zeros_like(token, dtype=bool)
        hits = hits | (cur + 1 >= max_len)
        # the best candidates that did not finish run on
        alive = top_scores + hits * -1e9
        _, nxt = _topk(alive, beams)
        running, run_scores = _gather(cand, nxt), _gather(alive, nxt)
        parents = _gather(beam_of, nxt) + np.arange(batch)[:, None] * beams  # the row each continues
        stepper.reorder(parents.reshape(-1))
        # the candidates among the top `beams` that finished join the finished hypotheses
        done_now = hits & top_mask[None, :]
        scored = top_scores / ((cur + 1 - start_len) ** length_penalty)
        scored = scored + (np.all(finished, axis=-1, keepdims=True) & (early_stopping is True)) * -1e9
        scored = scored + (~open_) * -1e9 + (~done_now) * -1e9
        merged_scores = np.concatenate([fin_scores, scored], axis=1)
        _, best = _topk(merged_scores, beams)
        finished_seq = _gather(np.concatenate([finished_seq, cand], axis=1), best)
        fin_scores = _gather(merged_scores, best)
        finished = _gather(np.concatenate([finished, done_now], axis=1), best)
        cur += 1
        length = (max_len if early_stopping == "never" and length_penalty > 0 else cur) - start_len
        best_running = run_scores[:, :1] / (length ** length_penalty)
        worst_finished = np.where(finished, fin_scores.min(axis=1, keepdims=True), -1e9)
        open_ = open_ & np.any(best_running > worst_finished, axis=-1, keepdims=True)
        show(steps, max_new)
        if not (open_.any() and not (finished.all() and early_stopping is True) and not hits.all()):
            break
    show(steps, max_new, done=True)
    ids = finished_seq[:, 0, :]
    written = ids[:, start_len:]
    # crop to the longest hypothesis: its last written token is the end token (or the length limit)
    lengths = [_length(row, eos) for row in written]
    return Generation(ids[:, :start_len + max(lengths, default=0)], fin_scores[:, 0], steps)


def _length(row: np.ndarray, eos) -> int:
    """Tokens written up to and including the first end token (all of them without one)."""
    if eos is not None:
        hit = np.flatnonzero(row == eos)
        if hit.size:
            return int(hit[0]) + 1
    return len(row)
