"""Node-by-node comparison with a Hugging Face model: where do two implementations part?

:func:`diff` runs qkvflow's graph (every activation kept) and the
transformers model of a local folder (a forward hook on every module it
aligns) on the same token ids, and compares each qkvflow node with the
module that computes the same thing: every projection and norm, aligned by
the family's name map (the parameters a node owns are the module's), and
the logits. Rows come in qkvflow's execution order, so the first row over
the tolerance is where the two first disagree. Needs torch and
transformers (only here).
"""

import dataclasses
from pathlib import Path

import numpy as np

from ..ir.errors import InputError, ModelLoadError, QkvflowError

__all__ = ["Row", "DiffReport", "diff", "alignment"]


@dataclasses.dataclass
class Row:
    node: str  # qkvflow node path
    module: str  # the other implementation's module (or "logits")
    max_abs: float
    rel: float  # max_abs / the largest magnitude of the other side
    source: str  # where qkvflow's node was made (file:line)

    def agrees(self, tolerance: float) -> bool:
        return self.rel <= tolerance


@dataclasses.dataclass
class DiffReport:
    rows: list
    tolerance: float
    against: str

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if not r.agrees(self.tolerance)), None)

    def __str__(self) -> str:
        return self.text()

    def text(self) -> str:
        width = max([len(r.node) for r in self.rows] + [12])
        other = max([len(r.module) for r in self.rows] + [12])
        lines = [f"{'qkvflow node'.ljust(width)}  {'aligned with'.ljust(other)}  {'max abs':>9}  {'rel':>9}",
                 f"{'-' * width}  {'-' * other}  {'-' * 9}  {'-' * 9}"]
        first = self.first_divergence
        for r in self.rows:
            mark = "  <- first divergence" if r is first else ""
            lines.append(f"{r.node.ljust(width)}  {r.module.ljust(other)}  {r.max_abs:9.2e}  {r.rel:9.2e}{mark}")
        if first is None:
            lines.append(f"\nall {len(self.rows)} aligned nodes agree with {self.against} "
                         f"(relative error <= {self.tolerance:g})")
        else:
            lines.append(f"\nfirst divergent node: {first.node} ({first.source}) against {first.module}: "
                         f"max abs {first.max_abs:.3e}, relative {first.rel:.3e} > {self.tolerance:g}")
        return "\n".join(lines)


def alignment(graph, family) -> dict:
    """qkvflow node -> (module name, part): the module computing what the node computes.
    ``part`` (index, parts) takes that part of the module's last axis (GPT-2's c_attn)."""
    from ..models.config import Config
    cfg = Config(**{k: v for k, v in graph.graph["config"].items() if k in Config.__dataclass_fields__})
    out = {}
    for path, source in family.names(cfg).items():
        node, _, name = path.rpartition(".")
        if name != "weight" or node not in graph or graph.nodes[node]["op"] not in ("linear", "norm"):
            continue
        module = family.strip + source.key.rpartition(".")[0]
        out[node] = (module, source.part)
    return out


def _torch_model(folder: str):
    try:
        import torch
        import transformers
    except ImportError:
        raise QkvflowError("qkvflow diff needs torch and transformers: pip install torch==2.13.0 "
                           "transformers (torch's CPU wheel)") from None
    from .hf import read_folder
    config, _ = read_folder(folder)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise ModelLoadError(f"{folder}: config.json names no transformers architecture qkvflow can load "
                             f"(architectures = {config.get('architectures')!r})")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # its config warnings are not qkvflow's one line
    try:
        model = cls.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; one line for each
        raise ModelLoadError(f"{folder}: transformers could not load it: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return torch, model.double().eval()


def _hf_inputs(torch, graph, feeds: dict) -> dict:
    pads = {graph.nodes[n]["attrs"]["name"]: graph.nodes[n]["attrs"].get("pad_id") for n in graph.graph["inputs"]}

    start = graph.graph.get("config", {}).get("bos_id")

    def mask(name):
        pad = pads.get(name)
        ids = np.asarray(feeds[name])
        keep = (ids != pad) if pad is not None else np.ones_like(ids, dtype=bool)
        if name == "tgt_ids" and pad == start:
            keep[..., 0] = True  # a start token that is the pad id is no padding
        return torch.from_numpy(keep).long()

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
    if "src_ids" in feeds:
        return {"input_ids": t["src_ids"], "attention_mask": mask("src_ids"),
                "decoder_input_ids": t["tgt_ids"], "decoder_attention_mask": mask("tgt_ids")}
    out = {"input_ids": t["ids"], "attention_mask": mask("ids")}
    if "type_ids" in feeds:
        out["token_type_ids"] = t["type_ids"]
    return out


def default_inputs(graph, seed: int = 0) -> dict:
    """Token ids for every input: batch 2, lengths 7 and 5, ids clear of the first three
    (special tokens), the second row padded at the end where the model has a pad id."""
    rng = np.random.default_rng(seed)
    feeds = {}
    vocab = graph.graph["dims"].get("vocab") or 8
    for length, node in zip((7, 5), graph.graph["inputs"]):
        attrs = graph.nodes[node]["attrs"]
        if "default" in attrs:
            continue
        ids = rng.integers(min(3, vocab - 1), vocab, size=(2, length))
        pad = attrs.get("pad_id")
        if pad is not None:
            ids[ids == pad] = min(3, vocab - 1)
            ids[1, length - 2:] = pad
        feeds[attrs["name"]] = ids
    return feeds


def diff(model, params: dict | None = None, against: str | None = None, *, inputs: dict | None = None,
         tolerance: float = 1e-6, other=None) -> DiffReport:
    """Compare qkvflow's ``model`` (a MODEL spec such as ``"hf:PATH"``, a Model or a graph)
    with weights ``params`` (default: the model's own, as ``hf:PATH`` models have) against
    the transformers model in folder ``against`` (``hf:PATH`` or PATH), or ``other``: a
    transformers model already in memory. ``inputs``: token ids by input name (default:
    :func:`default_inputs`). Runs both in float64; ``print(report)`` shows the table,
    e.g. ``print(qf.diff("hf:my-bart", against="hf:my-bart-edited"))``.
    """
    from ..run.execute import forward
    from ..tracing.context import Model
    from .hf import _family, read_folder

    if against is None:
        raise InputError("diff needs against=: the transformers model's folder, hf:PATH")
    if isinstance(model, str):
        from .. import load_model
        model = load_model(model)
    if params is None:
        params = getattr(model, "params", None)
        if params is None:
            raise InputError("diff needs the qkvflow model's weights: give params, or an hf:PATH model")
    folder = against[3:] if against.startswith("hf:") else against
    graph = model
    if isinstance(model, Model):
        from .. import trace
        graph = trace(model)
    config, tensors = read_folder(folder)
    kind, family = _family(config, folder)
    _same_model(graph, family.config(config, {family.canonical(k) for k in tensors}, folder), kind, folder)
    if other is None:
        torch, other = _torch_model(folder)
    else:
        import torch
        other = other.double().eval()
    feeds = inputs if inputs is not None else default_inputs(graph)
    ours = forward(graph, params, capture=True, **feeds)
    modules = dict(other.named_modules())
    aligned = {node: (_module_name(m, family, modules), part) for node, (m, part) in alignment(graph, family).items()}
    missing = sorted({m for m, _ in aligned.values()} - set(modules))
    if missing:
        raise InputError(f"{folder}: the transformers model has no module {missing[0]}; is it the same family "
                         "and size as the qkvflow model?")
    seen: dict = {}
    hooks = [modules[m].register_forward_hook(
        lambda mod, args, out, m=m: seen.setdefault(m, (out[0] if isinstance(out, tuple) else out).detach()))
        for m in {m for m, _ in aligned.values()}]
    try:
        with torch.no_grad():
            theirs = other(**_hf_inputs(torch, graph, feeds))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    acts = ours["activations"]
    for node in graph.nodes:
        if node not in aligned:
            continue
        module, part = aligned[node]
        if module not in seen:
            continue
        value = seen[module].numpy()
        if part is not None:
            index, parts = part
            step = value.shape[-1] // parts
            value = value[..., index * step:(index + 1) * step]
        rows.append(_row(node, module, acts[node], value, graph.nodes[node].get("source", "")))
    first_out = graph.graph["outputs"][0]
    name = graph.nodes[first_out]["attrs"]["name"]
    if getattr(theirs, "logits", None) is not None:
        rows.append(_row(first_out, "logits", ours[name], theirs.logits.numpy(),
                         graph.nodes[first_out].get("source", "")))
    return DiffReport(rows, tolerance, f"hf:{Path(folder)}")


_SHAPE_KEYS = ("family", "encoder_layers", "decoder_layers", "d_model", "heads", "d_ff", "vocab")


def _same_model(graph, theirs: dict, kind: str, folder: str) -> None:
    """Refuse to compare models of other families or sizes: one line saying which."""
    ours = graph.graph.get("config", {})
    for key in _SHAPE_KEYS:
        if key in theirs and ours.get(key) != theirs[key]:
            raise InputError(f"--against {folder} is a {kind} model with {key} = {theirs[key]}, but MODEL has "
                             f"{key} = {ours.get(key)}; diff compares one model in two implementations")


def _module_name(name: str, family, modules: dict) -> str:
    """The module as the loaded model names it: a bare base model (BertModel, GPT2Model)
    has no ``bert.`` / ``transformer.`` before its modules."""
    for candidate in (name, name.removeprefix(family.strip) if family.strip else name,
                      name.removeprefix(family.base) if family.base else name):
        if candidate in modules:
            return candidate
    return name


def _row(node: str, module: str, mine: np.ndarray, theirs: np.ndarray, source: str) -> Row:
    if mine.shape != theirs.shape:
        return Row(node, f"{module} (shape {tuple(theirs.shape)} != {tuple(mine.shape)})", float("inf"),
                   float("inf"), source)
    err = float(np.max(np.abs(mine - theirs))) if mine.size else 0.0
    scale = float(np.max(np.abs(theirs))) if theirs.size else 0.0
    return Row(node, module, err, err / max(scale, 1e-300), source)
