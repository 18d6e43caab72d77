"""The ``qkvflow`` command line.

Exit codes: 0 clean, 1 findings of severity error, 2 the invocation or the
input could not be used (one line on stderr, never a traceback), 3 a bug in
qkvflow (one line too). Stages are imported only by the subcommands that need them.
"""

import argparse
import gc
import sys
from pathlib import Path

from .ir.errors import ModelLoadError, QkvflowError

__all__ = ["main"]

DEMO_SRC = "I love China <eos>"
DEMO_TGT = "<bos> 我 爱 中国"


def _words_of(spec: str) -> list | None:
    """The words of a model's token ids, where qkvflow knows them (the shipped translator)."""
    if spec == "toy-en-zh":
        from .models.toy_translation import VOCAB
        return list(VOCAB)
    return None


def _vocab(words: list | None) -> dict | None:
    """word -> token id, for reading words as ids."""
    return {w: i for i, w in enumerate(words)} if words else None


def _model(spec: str, args, *, with_params: bool = False):
    """The graph of MODEL: traced from a preset, TOML file, factory or Hugging Face
    folder (``hf:PATH``), or read from a graph file written by ``qkvflow trace
    --format json``. ``with_params``: (graph, the model's own weights or None)."""
    if spec.endswith(".json"):
        from .ir.graph import read_graph
        g = read_graph(spec)
        return (g, None) if with_params else g
    from . import load_model, trace
    model = load_model(spec)
    g = trace(model, allow_large=args.allow_large)
    return (g, model.params) if with_params else g


def _runnable(spec: str, args):
    """(graph, the model's own weights or None) of a model about to run: one with
    error findings is refused, its findings shown, unless --no-check."""
    g, weights = _model(spec, args, with_params=True)
    if not args.no_check:
        from .passes.checks import check
        _refuse_errors(spec, check(g))
    return g, weights


def _refuse_errors(spec: str, found: list, remedy: str = "fix them, or pass --no-check to run it anyway") -> None:
    """A model with error findings is not run: its findings on stderr, then one error line."""
    errors = sum(d.severity == "error" for d in found)
    if errors:
        from .passes.formats import format_diagnostics
        print(format_diagnostics(found, "text"), file=sys.stderr)
        raise ModelLoadError(f"model {spec!r} has {errors} error finding(s) (above), so its numbers would "
                             f"mean nothing; {remedy}")


def _emit(text: str | bytes, out: str | None) -> None:
    if out:
        from .atomic import write_atomic
        write_atomic(out, text)
    elif isinstance(text, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(text)
    else:
        sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")


def cmd_presets(args) -> int:
    from .models.config import PRESETS
    width = max(len(n) for n in PRESETS)
    for name, cfg in PRESETS.items():
        print(f"{name.ljust(width)}  {cfg.description}")
    return 0


def cmd_trace(args) -> int:
    g = _model(args.model, args)
    if args.format == "json":
        from .ir.graph import to_json
        _emit(to_json(g), args.output)
    elif args.format == "graphml":
        from .ir.graph import to_graphml
        _emit(to_graphml(g), args.output)
    else:
        from .ir.graph import tabular
        _emit(tabular(g), args.output)
    return 0


def cmd_check(args) -> int:
    from .passes.checks import check, has_errors
    from .passes.formats import format_diagnostics
    found = []
    for spec in args.models:
        found.extend(check(_model(spec, args), strict=args.strict))
    _emit(format_diagnostics(found, args.format, checked=len(args.models)), args.output)
    if args.output:
        errors = sum(d.severity == "error" for d in found)
        print(f"wrote {args.output}: {errors} error(s), {len(found) - errors} warning(s)")
    return 1 if has_errors(found) else 0


def cmd_explain(args) -> int:
    from .views.explain import explain
    _emit(explain(_model(args.model, args), lang=args.lang, fmt=args.format), args.output)
    if args.output:
        print(f"wrote {args.output}")
    return 0


def cmd_render(args) -> int:
    from .views.render import render
    render(_model(args.model, args), args.output, level=args.level, fmt=args.format)
    print(f"wrote {args.output}")
    return 0


def _ids(text: str, what: str, vocab: dict | None):
    import numpy as np

    from .ir.errors import InputError
    tokens = text.replace(",", " ").split()
    if not tokens:
        raise InputError(f"{what} is empty; give token ids like \"5 6 7\"")
    ids = []
    for tok in tokens:
        if vocab is not None and tok in vocab:
            ids.append(vocab[tok])
        elif tok.isdecimal() and tok.isascii() and len(tok) <= 18:
            ids.append(int(tok))
        elif vocab is not None:
            raise InputError(f"{what}: {tok!r} is neither a word of the model's vocabulary ({len(vocab)} words) "
                             "nor a token id")
        else:
            raise InputError(f"{what}: {tok!r} is not a token id (expected non-negative integers like \"5 6 7\")")
    return np.array([ids], dtype=np.int64)


def _feeds(g, args, vocab=None) -> dict:
    """Token ids for the model's inputs: --ids for a model with one input, --src
    and --tgt for its first and second (an encoder–decoder's src_ids, tgt_ids)."""
    from .ir.errors import InputError
    from .ir.graph import required_inputs
    names = required_inputs(g)  # an input with a default may be left out
    flags = ["--ids"] if len(names) == 1 else ["--src", "--tgt"]
    given = {f: getattr(args, f[2:], None) for f in ("--ids", "--src", "--tgt")}
    if len(names) > 2 or any(given[f] is None for f in flags) or any(
            given[f] is not None for f in given if f not in flags):
        wanted = " and ".join(f"{f} (its input {n})" for f, n in zip(flags, names)) if len(names) <= 2 else \
            "the Python API (qkvflow.forward)"
        raise InputError(f"model {g.graph.get('model')!r} takes {len(names)} input(s), "
                         f"{', '.join(names) or 'none'}: give {wanted}")
    return {name: _ids(given[flag], flag, vocab) for flag, name in zip(flags, names)}


def _weights(g, args, weights) -> tuple[dict, str]:
    """The run's parameters (--params, the model's own, or seeded random) and a line saying which."""
    from .run.params import init_params, load_params
    if args.params:
        return load_params(args.params), f"weights: {args.params}"
    if weights is not None:
        return weights, (f"weights: imported with {args.model}" if args.model.startswith("hf:")
                         else f"weights: {args.model}'s own, trained, shipped with qkvflow")
    return init_params(g, seed=args.seed), f"weights: seeded random (seed {args.seed}; --params FILE for real ones)"


def _run(g, args, vocab=None, words=None, weights=None) -> tuple[str, dict, dict]:
    import numpy as np

    from .run.execute import forward
    feeds = _feeds(g, args, vocab)
    params, said = _weights(g, args, weights)
    attention = getattr(args, "attention", None)
    out = forward(g, params, dtype=args.dtype, capture=bool(getattr(args, "save_activations", None) or attention),
                  **feeds)
    lines = [said]
    if attention:
        _heatmaps(g, out["activations"], feeds, attention, words, args)
        lines.append(f"wrote {attention} (attention weights of batch row 0, "
                     f"{'head ' + str(args.head) if args.head is not None else 'averaged over the heads'})")
    for node in g.graph["outputs"]:
        name, names = g.nodes[node]["attrs"]["name"], g.nodes[node]["shape"]
        lines.append(f"{name}: shape {out[name].shape} ({', '.join(names)}), dtype {out[name].dtype}")
    first = g.graph["outputs"][0]
    name, names = g.nodes[first]["attrs"]["name"], g.nodes[first]["shape"]
    logits = out[name]
    if names[-1] != "vocab" or logits.ndim < 3:  # top ids only mean something over a vocabulary
        for node in g.graph["outputs"]:
            value = out[g.nodes[node]["attrs"]["name"]]
            lines.append(f"  {g.nodes[node]['attrs']['name']}: mean {value.mean():.4f}, "
                         f"min {value.min():.4f}, max {value.max():.4f}")
        return "\n".join(lines), params, out
    top = min(args.top, logits.shape[-1])
    lines.append(f"top {top} token ids per {names[-2]} position (batch row 0), as id (logit):")
    for t in range(logits.shape[1]):
        row = logits[0, t]
        best = np.argsort(-row, kind="stable")[:top]
        shown = ", ".join(
            f"{int(i)}{'=' + words[int(i)] if words and int(i) < len(words) else ''} ({row[i]:.3f})"
            for i in best
        )
        lines.append(f"  {names[-2]}[{t}]: {shown}")
    return "\n".join(lines), params, out


def _tokens(g, feeds: dict, words: list | None) -> dict:
    """Sequence dim -> the labels of batch row 0's positions (words where known, else ids)."""
    tokens = {}
    for node in g.graph["inputs"]:
        name, names = g.nodes[node]["attrs"]["name"], g.nodes[node]["shape"]
        if name in feeds and names and names[-1] in g.graph.get("sequences", {}):
            ids = [int(t) for t in feeds[name][0]]
            tokens[names[-1]] = [words[t] if words and t < len(words) else str(t) for t in ids]
    return tokens


def _heatmaps(g, activations: dict, feeds: dict, path: str, words: list | None, args) -> None:
    from .views.heatmaps import attention_maps, plot_attention
    maps = attention_maps(g, activations, head=args.head)
    plot_attention(maps, path, tokens=_tokens(g, feeds, words), title=f"{g.graph.get('model', '')}: attention weights")


def _stats(node: str, value) -> dict:
    """Summary of one activation; masked scores (-inf) are counted, not averaged."""
    import numpy as np
    finite = value[np.isfinite(value)]
    row = {"path": node, "shape": str(value.shape)}
    if finite.size:
        row.update(mean=f"{finite.mean():.4g}", std=f"{finite.std():.4g}", min=f"{finite.min():.4g}",
                   max=f"{finite.max():.4g}")
    if finite.size < value.size:
        row["shape"] += f", {value.size - finite.size} not finite (masked)"
    return row


def cmd_report(args) -> int:
    import numpy as np

    from .passes.checks import check, has_errors
    from .views.explain import explain
    from .views.render import render
    from .views.report import html_report, node_details
    import json
    g, weights = _model(args.model, args, with_params=True)
    found = check(g)
    diagrams = {level: render(g, level=level, fmt="svg") for level in ("layer", "block", "op")
                if level != "op" or g.number_of_nodes() <= args.op_limit}
    provenance = {lang: json.loads(explain(g, lang=lang, fmt="json"))["rows"] for lang in ("en", "zh")}
    heatmaps, stats, note, sizes = None, None, "", {}
    if args.src or args.ids:
        if not args.no_check:
            _refuse_errors(args.model, found, "report it without --src/--ids, or pass --no-check")
        from .run.execute import forward
        from .ir.errors import RenderError
        from .views.heatmaps import attention_maps, draw_attention
        words = _words_of(args.model)
        feeds = _feeds(g, args, _vocab(words))
        params, note = _weights(g, args, weights)
        acts = forward(g, params, dtype=args.dtype, capture=True, **feeds)["activations"]
        sizes = {d: n for node in g.graph["inputs"] if g.nodes[node]["attrs"]["name"] in feeds
                 for d, n in zip(g.nodes[node]["shape"], feeds[g.nodes[node]["attrs"]["name"]].shape)}
        try:
            heatmaps = draw_attention(attention_maps(g, acts), "svg", tokens=_tokens(g, feeds, words),
                                      title="attention weights, batch row 0, averaged over the heads").decode("utf-8")
        except RenderError as err:  # no matplotlib: the report without its heatmaps, saying why
            note += f"; no heatmaps: {err}"
            print(f"note: no heatmaps in the report: {err}")
        stats = [_stats(n, v) for n, v in acts.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size]
    page = html_report(title=f"qkvflow report: {g.graph.get('model') or args.model}", diagrams=diagrams,
                       details=node_details(g, sizes), provenance=provenance,
                       findings=[d.as_dict() for d in found], heatmaps=heatmaps, stats=stats, run_note=note)
    _emit(page, args.output)
    print(f"wrote {args.output}")
    return 1 if has_errors(found) else 0


def cmd_run(args) -> int:
    g, weights = _runnable(args.model, args)
    words = _words_of(args.model)
    vocab = _vocab(words)
    text, _, out = _run(g, args, vocab=vocab, words=words, weights=weights)
    print(text)
    if args.save_activations:
        from .ir.errors import ParamError
        from .run.params import save_params
        try:
            save_params({k: v for k, v in out["activations"].items() if v.dtype.kind == "f"},
                        args.save_activations)
        except ParamError as err:
            raise ParamError(str(err).replace("parameters", "activations")) from None
        print(f"wrote {args.save_activations}")
    return 0


def cmd_generate(args) -> int:
    from .run.generate import generate
    g, weights = _runnable(args.model, args)
    from .ir.graph import required_inputs
    names = required_inputs(g)
    flag = "--src" if len(names) == 2 else "--ids"
    text = args.src if flag == "--src" else args.ids
    if text is None or (flag == "--src" and args.ids is not None) or (flag == "--ids" and args.src is not None):
        from .ir.errors import InputError
        raise InputError(f"model {g.graph.get('model')!r} generates from {flag} (its input {names[0]})")
    params, said = _weights(g, args, weights)
    words = _words_of(args.model)
    ids = _ids(text, flag, _vocab(words))
    out = generate(g, params, ids, max_new_tokens=args.max_new_tokens, beams=args.beam,
                   length_penalty=args.length_penalty, sample=args.sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, dtype=args.dtype)
    how = f"beam search ({args.beam} beams)" if args.beam > 1 else "sampling" if args.sample else "greedy"
    how += ", incremental (KV cache)" if out.cached else ""
    print(said)
    if out.note:
        print(f"note: {out.note}")
    print(f"{how}, {out.steps} step(s): " + " ".join(str(int(t)) for t in out.ids[0]))
    if words:
        print("  " + " ".join(words[int(t)] if int(t) < len(words) else str(int(t)) for t in out.ids[0]))
    return 0


def cmd_import(args) -> int:
    from .atomic import OutputError, staged_folder, write_atomic
    from .interop.hf import import_hf
    from .run.params import save_params
    if not args.output.strip():
        raise OutputError("-o is empty; give the folder to write model.toml and params.safetensors into")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{str(out)!r} is a file; -o takes a folder for model.toml and params.safetensors")
    for name in ("model.toml", "params.safetensors"):
        if (out / name).is_dir():
            raise OutputError(f"{str(out / name)!r} is a folder; cannot write the file {name} there")
    imported = import_hf(args.path)
    cfg = imported.config
    with staged_folder(out) as stage:  # both files or neither
        write_atomic(stage / "model.toml", _toml(cfg.as_dict()))
        save_params(imported.params, stage / "params.safetensors")
    size = sum(v.nbytes for v in imported.params.values())
    print(f"imported {cfg.family} model {cfg.name!r} from {args.path}: {len(imported.params)} tensors, "
          f"{size / 2**20:.1f} MB")
    if imported.unused:
        print(f"left unused (the family says they are not weights qkvflow runs): {', '.join(imported.unused)}")
    print(f"wrote {out / 'model.toml'} and {out / 'params.safetensors'}\n"
          f"run it: qkvflow run {out / 'model.toml'} --params {out / 'params.safetensors'} ...")
    return 0


def _toml(values: dict) -> str:
    import json
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {json.dumps(str(value), ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def cmd_diff(args) -> int:
    from .interop.diff import diff
    from .run.params import load_params
    g, weights = _model(args.model, args, with_params=True)
    params = load_params(args.params) if args.params else weights
    if params is None:
        from .ir.errors import ParamError
        raise ParamError(f"model {args.model!r} has no weights: give --params FILE, or an hf:PATH model")
    inputs = _feeds(g, args) if (args.ids or args.src or args.tgt) else None
    report = diff(g, params, args.against, inputs=inputs, tolerance=args.tolerance)
    _emit(report.text(), args.output)
    return 0 if report.first_divergence is None else 1


def _demo_vocab(size: int) -> list[str]:
    words = ["<pad>", "<bos>", "<eos>", "I", "love", "China", "我", "爱", "中国"]
    return words + [f"w{i}" for i in range(len(words), size)]


def _demo_files(g, args, stage: Path, vocab: dict, vocab_words: list, weights) -> tuple[list[str], bool]:
    """Write the demo's files into ``stage``, printing each stage's result: (their names,
    whether the check found errors)."""
    from .atomic import write_atomic
    from .ir.graph import to_json
    from .passes.checks import check
    from .passes.formats import format_diagnostics
    from .run.params import save_params
    from .views.explain import explain
    from .views.render import render
    write_atomic(stage / "graph.json", to_json(g))
    found = check(g)
    report = format_diagnostics(found, "text")
    write_atomic(stage / "check.txt", report + "\n")
    write_atomic(stage / "check.sarif", format_diagnostics(found, "sarif"))
    print("\n== check\n" + report)
    table = explain(g, lang=args.lang)
    write_atomic(stage / "explain.txt", explain(g) + "\n")
    write_atomic(stage / "explain.zh.txt", explain(g, lang="zh") + "\n")
    print("\n== explain\n" + table)
    written = []
    for name, level in (("dataflow.dot", "layer"), ("dataflow.mmd", "layer"), ("dataflow-op.dot", "op")):
        render(g, stage / name, level=level)
        written.append(name)
    for name, level in (("dataflow.svg", "layer"), ("dataflow-op.svg", "op")):
        try:
            render(g, stage / name, level=level)
            written.append(name)
        except QkvflowError as err:
            print(f"note: {name} skipped: {err}")
    print("\n== render\n" + ", ".join(written))
    text, params, _ = _run(g, args, vocab=vocab, words=vocab_words, weights=weights)
    size = sum(v.nbytes for v in params.values())
    files = ["graph.json", "check.txt", "check.sarif", "explain.txt", "explain.zh.txt"] + written
    if size <= 64 * 2**20:
        save_params(params, stage / "params.safetensors")
        files.append("params.safetensors")
    else:
        print(f"note: params.safetensors skipped ({size / 2**20:.0f} MB of seeded random weights)")
    given = f"{args.src!r} -> {args.tgt!r}" if args.ids is None else repr(args.ids)
    note = "trained weights" if weights is not None and not args.params else \
        f"seeded random weights, seed {args.seed}: the numbers show the dataflow runs, not a trained translation"
    print(f"\n== run: {given} ({note})\n" + text)
    if args.model == "toy-en-zh" and weights is not None and not args.params:
        from .demo import story
        told = story(" ".join(args.src.split()[:-1]) if args.src.endswith("<eos>") else args.src, args.lang)
        write_atomic(stage / "translate.txt", told + "\n")
        files.append("translate.txt")
        print("\n== translate: the decoder writes one word at a time\n" + told)
    return files, any(d.severity == "error" for d in found)


def cmd_demo(args) -> int:
    from .atomic import staged_folder
    g, weights = _runnable(args.model, args)
    vocab_words = _words_of(args.model) or _demo_vocab(g.graph["dims"].get("vocab") or 0)
    vocab = _vocab(vocab_words)
    from .ir.graph import required_inputs
    if len(required_inputs(g)) == 2:
        args.src, args.tgt = args.src or DEMO_SRC, args.tgt or DEMO_TGT
    else:
        args.ids = args.ids or f"{DEMO_TGT}"
    _feeds(g, args, vocab)  # unusable inputs stop the demo before it writes anything
    out = Path(args.out)
    print(f"qkvflow demo: model {args.model!r}, {g.number_of_nodes()} nodes, "
          f"{g.number_of_edges()} edges -> {out}/")
    with staged_folder(out) as stage:  # every file appears in out, or none does
        files, errors = _demo_files(g, args, stage, vocab, vocab_words, weights)
    print(f"\nwrote {', '.join(files)} to {out}/")
    return 1 if errors else 0


def _positive(text: str) -> int:
    if not (text.isdecimal() and text.isascii() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got {text!r}")
    return int(text)


MODEL_FORMS = (
    "MODEL is one of: a preset name (qkvflow presets); a TOML file (preset = \"tiny\" plus keys to "
    "change); package.module:factory or path/file.py:factory (a function returning a qkvflow Model "
    "or Config); hf:PATH, a local Hugging Face folder (config.json + safetensors); a graph file "
    "written by 'qkvflow trace MODEL --format json'."
)
MODEL_HELP = "a preset, TOML file, module:factory, hf:PATH or graph .json (the forms above)"
EXIT_CODES = "exit codes: 0 done, no error findings; 1 error findings (or diverging models, for diff); " \
             "2 the invocation or an input could not be used, or a model with error findings refused a " \
             "run (one line on stderr); 3 a bug in qkvflow (one line too)."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkvflow", description=(
        "Trace, check, explain, draw and run the Q/K/V dataflow of Transformer attention. " + MODEL_FORMS),
        epilog=EXIT_CODES)
    from . import __version__
    p.add_argument("--version", action="version", version=f"qkvflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str = "", takes_model: bool = True):
        q = sub.add_parser(name, help=summary, epilog=EXIT_CODES,
                           description=" ".join(x for x in (summary[0].upper() + summary[1:] + ".", description,
                                                             MODEL_FORMS if takes_model else "") if x))
        if takes_model:
            q.add_argument("--allow-large", action="store_true",
                           help="trace a model of more than 100,000 nodes (about 2,000 layers)")
        return q

    command("presets", "list the built-in models", takes_model=False).set_defaults(fn=cmd_presets)

    t = command("trace", "print the traced graph", "One line per node (path, op, inputs, named shape), "
                "or the whole graph as JSON or GraphML.")
    t.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    t.add_argument("--format", choices=("table", "json", "graphml"), default="table", help="default: table")
    t.add_argument("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    t.set_defaults(fn=cmd_trace)

    c = command("check", "check shapes, provenance and information flow",
                "Prints every finding with its code (QKV...), node and source line.")
    c.add_argument("models", nargs="+", metavar="MODEL", help="one or more; " + MODEL_HELP)
    c.add_argument("--format", choices=("text", "json", "sarif", "github"), default="text",
                   help="text (default), json, SARIF 2.1.0, or GitHub workflow annotations")
    c.add_argument("--strict", action="store_true", help="treat warnings as errors")
    c.add_argument("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    c.set_defaults(fn=cmd_check)

    e = command("explain", "the Q/K/V provenance table, from the graph",
                "One row per kind of attention: where its queries, keys and values come from, and its mask.")
    e.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    e.add_argument("--lang", choices=("en", "zh"), default="en", help="language of the table (default: en)")
    e.add_argument("--format", choices=("text", "md", "json"), default="text", help="default: text")
    e.add_argument("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    e.set_defaults(fn=cmd_explain)

    r = command("render", "draw the dataflow (svg, png, pdf, dot, mmd, json)",
                "The format is the output file's extension unless --format says it (then they must agree).")
    r.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    r.add_argument("-o", "--output", required=True, metavar="FILE", help="the diagram file to write")
    r.add_argument("--level", choices=("layer", "block", "op"), default="layer",
                   help="layer: each stream's layer once, with its count (default); block: one box per "
                        "block of every layer; op: every operation")
    r.add_argument("--format", choices=("svg", "png", "pdf", "dot", "mmd", "json"), default=None,
                   help="default: from FILE's extension")
    r.set_defaults(fn=cmd_render)

    def run_args(q):
        q.add_argument("--src", metavar="IDS", help='source token ids of an encoder-decoder, e.g. "5 6 7" '
                                                    "(or words, for toy-en-zh)")
        q.add_argument("--tgt", metavar="IDS", help='target token ids of an encoder-decoder, e.g. "1 8" '
                                                    "(or words, for toy-en-zh)")
        q.add_argument("--ids", metavar="IDS", help="token ids of a model with one input (decoder-only, encoder-only)")
        q.add_argument("--params", metavar="FILE", help="weights, .safetensors or .npz (default: the model's own "
                                                        "if it has them, else seeded random)")
        q.add_argument("--seed", type=_seed, default=0, help="of the seeded random weights (default 0)")
        q.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="default: float64")
        q.add_argument("--no-check", action="store_true",
                       help="run even a model with error findings (its numbers may mean nothing)")

    u = command("run", "run the NumPy reference model on token ids",
                "Prints which weights ran (seeded random unless --params or the model's own), the shape "
                "of each output, and per position the top ids with their logits.")
    u.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    run_args(u)
    u.add_argument("--top", type=_positive, default=3, help="how many ids to show per position (default 3)")
    u.add_argument("--save-activations", metavar="FILE",
                   help="write every node's activation by node path (.safetensors or .npz)")
    u.add_argument("--attention", metavar="FILE", help="draw every attention's weights as heatmaps, a row per "
                   "kind and a column per layer (.png or .svg; needs matplotlib)")
    u.add_argument("--head", type=_seed, default=None, metavar="N",
                   help="with --attention: head N's weights (default: averaged over the heads)")
    u.set_defaults(fn=cmd_run)

    n = command("generate", "write tokens one at a time: greedy, beam search or sampling",
                "Decodes from --src (an encoder-decoder) or the prompt --ids (a decoder-only model), "
                "incrementally with a KV cache derived from the graph.")
    n.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    n.add_argument("--src", metavar="IDS",
                   help='source token ids of an encoder-decoder, e.g. "5 6 7" (or words, for toy-en-zh)')
    n.add_argument("--ids", metavar="IDS", help="the prompt of a decoder-only model")
    n.add_argument("--params", metavar="FILE",
                   help="weights, .safetensors or .npz (default: the model's own, else seeded random)")
    n.add_argument("--max-new-tokens", type=_seed, default=None, metavar="N",
                   help="at most this many new tokens (default 32, or what the model's positions leave room for)")
    n.add_argument("--beam", type=_positive, default=1, metavar="N",
                   help="beam search with N beams (default 1: greedy)")
    n.add_argument("--length-penalty", type=_finite_float, default=1.0, metavar="X",
                   help="beam score / length ** X (default 1)")
    n.add_argument("--sample", action="store_true", help="sample instead of the most likely token")
    n.add_argument("--temperature", type=_temperature, default=1.0, metavar="T",
                   help="with --sample: divides the logits (> 0, default 1)")
    n.add_argument("--top-k", type=_seed, default=0, metavar="K",
                   help="with --sample: among the K most likely (default 0: all)")
    n.add_argument("--top-p", type=_tolerance, default=1.0, metavar="P",
                   help="with --sample: in the smallest set reaching probability P (default 1)")
    n.add_argument("--seed", type=_seed, default=0, help="of the sampling and of seeded random weights (default 0)")
    n.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="default: float64")
    n.add_argument("--no-check", action="store_true",
                   help="generate even with a model that has error findings")
    n.set_defaults(fn=cmd_generate)

    o = command("report", "one self-contained HTML report: diagrams, provenance, findings, a run",
                "Diagrams at layer, block and op level (zoom, pan, click a node for its path, op, shape, source "
                "and parameters), the Q/K/V table in English and Chinese, the findings with their source "
                "lines; with token ids, the attention heatmaps and every node's activation statistics.")
    o.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    o.add_argument("-o", "--output", required=True, metavar="FILE", help="the .html file to write")
    run_args(o)
    o.add_argument("--op-limit", type=_positive, default=1500, metavar="N",
                   help="draw the op-level diagram only for graphs of at most N nodes (default 1500)")
    o.set_defaults(fn=cmd_report)

    i = command("import", "import a local Hugging Face folder (config.json + safetensors)",
                "Writes model.toml and params.safetensors into the output folder, both or neither.",
                takes_model=False)
    i.add_argument("path", metavar="PATH", help="the folder: BART, Marian, T5, GPT-2, Llama or BERT")
    i.add_argument("-o", "--output", required=True, metavar="FOLDER",
                   help="folder for model.toml and params.safetensors")
    i.set_defaults(fn=cmd_import)

    f = command("diff", "compare every node with a Hugging Face model's modules (needs torch, transformers)",
                "Prints the max abs and relative error of every aligned node and names the first that "
                "diverges; exit 1 when the models diverge.")
    f.add_argument("model", metavar="MODEL", help="qkvflow's side: hf:PATH, or a preset/TOML with --params")
    f.add_argument("--against", required=True, metavar="hf:PATH", help="the transformers side")
    f.add_argument("--src", metavar="IDS", help="source token ids (default: seeded random ids, a padded batch of 2)")
    f.add_argument("--tgt", metavar="IDS", help="target token ids")
    f.add_argument("--ids", metavar="IDS", help="token ids of a model with one input")
    f.add_argument("--params", metavar="FILE", help="qkvflow's weights (.safetensors/.npz) when MODEL has none")
    f.add_argument("--tolerance", type=_tolerance, default=1e-6, metavar="X",
                   help="largest relative error that agrees (default 1e-6)")
    f.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    f.set_defaults(fn=cmd_diff)

    d = command("demo", "trace, check, explain, render and run a built-in model",
                "Writes graph.json, check.txt/.sarif, explain.txt, diagrams, params and the run into "
                "the output folder, all or nothing.")
    d.add_argument("--model", default="toy-en-zh", metavar="MODEL",
                   help="default: the shipped English -> Chinese translator; any MODEL form")
    d.add_argument("--lang", choices=("en", "zh"), default="en", help="the language of explain and the story")
    d.add_argument("--out", default="qkvflow-demo", metavar="FOLDER", help="default: qkvflow-demo")
    run_args(d)
    d.add_argument("--top", type=_positive, default=3, help="how many ids to show per position (default 3)")
    d.set_defaults(fn=cmd_demo)
    return p


def _finite_float(text: str) -> float:
    import math
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    import math
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number")
    return value


def _temperature(text: str) -> float:
    value = _tolerance(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not a positive number (for the most likely token, leave out --sample)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    command = parser._subparsers._group_actions[0].choices[args.command]  # errors with its own usage
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "head", None) is not None and not getattr(args, "attention", None):
        command.error("--head picks the head of the --attention heatmaps; give --attention FILE too")
    # What the imports made lives as long as the process: the collector need not
    # scan it on each full collection (a trace allocates enough to trigger several).
    gc.freeze()
    try:
        return args.fn(args)
    except QkvflowError as err:
        from .ir.text import printable
        print(f"qkvflow: error: {printable(str(err))}", file=sys.stderr)  # one line, whatever a name holds
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("qkvflow: interrupted", file=sys.stderr)
        return 2
    except Exception as err:  # a bug in qkvflow: still one line, and its own exit code
        from .ir.text import printable
        print(f"qkvflow: internal error: {type(err).__name__}: {printable(str(err))} (a bug in qkvflow; please "
              "report it with the command that caused it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
