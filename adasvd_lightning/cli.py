"""The ``adasvd`` command line.

Subcommands:
  fit         train from a recipe (LightningCLI): compression callbacks, recovery fine-tuning
  validate    run a recipe's validation loop (e.g. compress at setup, then measure perplexity)
  test        run a recipe's test loop
  compress    compress a model folder (or the embedded reference model) and save the result
  evaluate    perplexity of a model folder on a text file
  quickstart  reference model → svd, svd-llm and adasvd-duo at 40% and 60% → perplexity table
  export      Lightning checkpoint (.ckpt or ZeRO folder) of a compressed run → compressed (or dense) model folder
              or a compressed model folder → its dense equivalent (--model DIR --dense)
  reference   build (once) and print the path of the embedded reference model

Start-up stays light: this module and everything ``adasvd --help`` or an argument error touches import
only the standard library (and rich for output); torch, transformers, Lightning and DeepSpeed are
imported by the subcommand that needs them, after its arguments parsed. Ctrl-C anywhere — start-up,
the reference build, compression, a Lightning run — ends with ``adasvd: interrupted`` and exit code 130.

Bad input (missing path, ratio outside (0, 1), unknown method or recipe key, a folder that is not a
causal LM, an existing output folder) exits with code 2 and one line on stderr, before any work is done.
``fit`` / ``validate`` / ``test`` take LightningCLI arguments (``--config``, ``--print_config``, dotted
overrides) plus ``--json`` and ``--quiet``; see `adasvd_lightning.lightning_cli`.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .core.errors import InvalidInputError

if TYPE_CHECKING:
    from .core.config import CompressionConfig

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1) (fraction of parameters removed), got {text}")
    return value


def _saving(text: str) -> float:
    from .core.merging import check_min_flop_saving

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    try:
        return check_min_flop_saving(value)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adasvd", description="SVD low-rank compression of causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
        if device:
            p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        p.add_argument("--quiet", action="store_true", help="no progress display or tables")

    # fit / validate / test are handed to LightningCLI before argparse runs (see `main`); these
    # entries only list them in ``adasvd --help``.
    for name, text in (("fit", "train from a recipe: adasvd fit --config recipes/X.yaml [--print_config]"),
                       ("validate", "validation loop of a recipe (compress at setup → perplexity)"),
                       ("test", "test loop of a recipe")):
        sub.add_parser(name, help=text, add_help=False)

    p = sub.add_parser("compress", help="compress a model folder")
    p.add_argument("--recipe", default=None,
                   help="recipe (same format as `adasvd fit --config`): model, SVDCompression, calibration data; flags win")
    p.add_argument("--model", default=None, help="model folder, or 'reference' (default) for the embedded model")
    p.add_argument("--method", default=None,
                   help="preset: svd, asvd, svd-llm (default), svd-llm-w, svd-llm-v2, adasvd, duo-svd, adasvd-duo")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a strategy or knob of the preset, e.g. refinement=adacomp (repeatable)")
    p.add_argument("--ratio", type=_ratio, default=None, help="fraction of each target matrix's parameters removed")
    p.add_argument("--calibration", default=None, help="calibration text file (default: embedded training split)")
    p.add_argument("--samples", type=_positive_int, default=None, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per calibration window (default 256)")
    p.add_argument("--seed", type=int, default=None, help="seed of the calibration window sampling (default 0)")
    p.add_argument("--include", nargs="+", default=None, help="regex patterns of target module names")
    p.add_argument("--exclude", nargs="+", default=None, help="regex patterns of module names to leave dense")
    p.add_argument("--execution-device", default=None,
                   help="keep the model where it is loaded (--device) and move one decoder block at a time "
                        "to this device for compression (e.g. --device cpu --execution-device cuda)")
    p.add_argument("--merge-unprofitable", type=_saving, nargs="?", const=0.15, default=None, metavar="MIN_SAVING",
                   help="merge factorized layers that save less than MIN_SAVING (default 0.15) of their "
                        "multiply-adds back to dense: they would not run faster (reported; adds weights)")
    p.add_argument("--svd-driver", default=None, choices=["auto", "gram", "svd"],
                   help="truncated SVD: auto (default: Gram eigh where accurate), gram, or svd (LAPACK)")
    p.add_argument("--decomposition-threads", type=_positive_int, default=None,
                   help="CPU threads of each eigh/SVD/Cholesky (default 1: more threads are slower on "
                        "shared cores; raise it on a dedicated node with large hidden sizes)")
    p.add_argument("--statistics-dtype", default=None, choices=["float64", "float32"],
                   help="precision of the calibration Gram products: float32 (default; the sums stay "
                        "float64) or float64 (the reference, ~1.3-2x slower statistics)")
    p.add_argument("--probe-table", default=None, metavar="FILE",
                   help="keep the module-KL probes in FILE as they are measured; run again with the same FILE "
                        "after an interruption to probe only what is missing")
    p.add_argument("--activation-dir", default=None, metavar="DIR",
                   help="keep the calibration activations in files under DIR instead of memory (for large "
                        "calibration sets; same results; the files vanish with the run)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    common(p)

    p = sub.add_parser("evaluate", help="perplexity of a model folder on a text file")
    p.add_argument("--model", default="reference", help="model folder, or 'reference' (default)")
    p.add_argument("--data", default=None, help="text file (default: embedded test split)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="window length (default 256)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="windows per forward pass (default 8; lower it if memory runs short)")
    p.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate only the first N windows")
    common(p)

    p = sub.add_parser("quickstart", help="reference model → svd, svd-llm, adasvd-duo at 40%% and 60%% → perplexity")
    p.add_argument("--ratios", type=_ratio, nargs="+", default=[0.4, 0.6], metavar="RATIO",
                   help="fractions of each target matrix's parameters removed (default: 0.4 0.6)")
    p.add_argument("--methods", nargs="+", default=["svd", "svd-llm", "adasvd-duo"], metavar="METHOD",
                   help="presets to compare (default: svd svd-llm adasvd-duo; all: svd, asvd, svd-llm, "
                        "svd-llm-w, svd-llm-v2, adasvd, duo-svd, adasvd-duo)")
    p.add_argument("--samples", type=_positive_int, default=64,
                   help="calibration windows drawn from the embedded training split (default 64)")
    p.add_argument("--seq-len", type=_positive_int, default=256,
                   help="tokens per calibration window (default 256)")
    p.add_argument("--model", default="reference", help="model folder (default: the embedded reference model)")
    p.add_argument("--max-windows", type=_positive_int, default=None,
                   help="evaluate only the first N windows of the test split (default: all)")
    common(p)

    p = sub.add_parser("export", help="checkpoint of a compressed run → model folder, or compressed folder → dense")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="Lightning .ckpt file (single process or DDP) or DeepSpeed ZeRO checkpoint directory")
    source.add_argument("--model", help="compressed model folder (with --dense: write its dense equivalent)")
    p.add_argument("--base-model", default=None,
                   help="original model folder (architecture + tokenizer); optional when the checkpoint "
                        "was written with SVDCompression, which stores the config")
    p.add_argument("--model-attr", default=None,
                   help="LightningModule attribute holding the model (default: the one SVDCompression recorded, else 'model')")
    p.add_argument("--dense", action="store_true", help="multiply the factors back into dense matrices")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    common(p)

    p = sub.add_parser("reference", help="build (once) and print the embedded reference model's folder",
                       description="Train the embedded reference model if it is not cached yet (≈ 2400 steps, "
                                   "resumable: an interrupted build continues from its last checkpoint), then "
                                   "print its folder. It is always trained on the CPU, so its weights are the "
                                   "same on every machine; hence no --device.")
    common(p, device=False)
    return parser


def _parse_options(items: list[str]) -> dict:
    """KEY=VALUE pairs; values are read as YAML scalars (numbers, booleans, lists) with a safe loader."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--method-option expects KEY=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:  # also YAML tags such as !!python/object, which safe_load refuses
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise InvalidInputError(f"--method-option {key.strip()}: cannot read {value!r} ({problem})") from None
        options[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return options


def strict_json(payload: dict) -> str:
    """``payload`` as strict JSON: a NaN or infinite number (a diverged perplexity, say) becomes null
    and its path is listed under ``"nonfinite"``, since bare ``NaN`` / ``Infinity`` are not JSON."""
    flagged: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, (str, int, type(None))) and hasattr(value, "__float__"):
            value = float(value)  # numpy / torch scalars, plain floats
            if not math.isfinite(value):
                flagged.append(path)
                return None
        return value

    data = clean(payload, "")
    if flagged:
        data["nonfinite"] = flagged
    return json.dumps(data, allow_nan=False)


def _emit(args: argparse.Namespace, payload: dict) -> None:
    if args.json:
        print(strict_json(payload))


def _pick(flag: Any, section: dict, key: str, default: Any) -> Any:
    """An explicitly given flag, else the recipe's value, else the default."""
    if flag is not None:
        return flag
    return section.get(key, default)


def _recipe_calibration(settings: dict, args: argparse.Namespace) -> Callable[[Any], list]:
    """Batches from the recipe's data module (flags override its text, samples, length and seed)."""

    def draw(model_path) -> list:
        from .training.datasets_data import CausalLMDataModule

        data = CausalLMDataModule(
            str(model_path), train_files=[_pick(args.calibration, settings, "text", None) or "embedded:train"],
            seq_len=_pick(args.seq_len, settings, "seq_len", 256), batch_size=settings["batch_size"],
            calibration_samples=_pick(args.samples, settings, "samples", 64),
            seed=_pick(args.seed, settings, "seed", 0),
        )
        return [batch["input_ids"] for batch in data.calibration_dataloader()]

    return draw


def compression_config(args: argparse.Namespace, recipe: dict) -> CompressionConfig:
    """The `CompressionConfig` of ``adasvd compress``: flags win over the recipe's one-shot settings."""
    from .core.config import CompressionConfig

    ratio = _pick(args.ratio, recipe, "ratio", None)
    if ratio is None:
        raise InvalidInputError("--ratio is required (or a recipe with an SVDCompression callback)")
    options = {**recipe.get("method_options", {}), **_parse_options(args.method_option)}
    return CompressionConfig(
        method=_pick(args.method, recipe, "method", "svd-llm"), ratio=ratio,
        include=_pick(args.include, recipe, "include", None), exclude=_pick(args.exclude, recipe, "exclude", []),
        propagation=recipe.get("propagation"), method_options=options,
        execution_device=_pick(args.execution_device, recipe, "execution_device", None),
        svd_driver=_pick(args.svd_driver, recipe, "svd_driver", "auto"),
        statistics_dtype=_pick(args.statistics_dtype, recipe, "statistics_dtype", "float32"),
        decomposition_threads=_pick(args.decomposition_threads, recipe, "decomposition_threads", 1),
        probe_table=_pick(args.probe_table, recipe, "probe_table", None),
        activation_dir=_pick(args.activation_dir, recipe, "activation_dir", None),
    )


def _lazy_model(value: str | None, quiet: bool) -> Callable[[], Any]:
    """The model folder, resolved when the workflow asks (after its cheap checks): ``reference`` may train."""

    def resolve():
        from .training.reference import resolve_model

        return resolve_model(value, show_progress=not quiet)

    return resolve


def _cmd_compress(args: argparse.Namespace) -> None:
    from .display import compression_progress, console, report_table
    from .workflows import CalibrationSpec, compress_folder

    recipe: dict = {}
    if args.recipe:
        from .lightning_cli import one_shot_settings, parse_recipe

        recipe = one_shot_settings(parse_recipe(args.recipe))
    config = compression_config(args, recipe)
    if recipe:
        from .core.corpus import resolve_text_path

        resolve_text_path(_pick(args.calibration, recipe, "text", None), "train")  # fail before loading
        calibration = _recipe_calibration(recipe, args)
    else:
        calibration = CalibrationSpec(args.calibration, samples=args.samples or 64, seq_len=args.seq_len or 256,
                                      seed=args.seed if args.seed is not None else 0)
    model = _lazy_model(_pick(args.model, recipe, "model", "reference"), args.quiet)
    with compression_progress(not args.quiet) as progress:
        report = compress_folder(
            model, config, calibration, args.out, overwrite=args.overwrite, device=args.device, progress=progress,
            merge_min_saving=_pick(args.merge_unprofitable, recipe, "merge_unprofitable", None),
            seq_len=_pick(args.seq_len, recipe, "seq_len", 256) if recipe else None,
        )
    if not args.quiet:
        console.print(report_table(report))
        console.print(f"saved to {args.out}")
    _emit(args, {**report.to_dict(), "out": args.out})


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .display import console
    from .workflows import evaluate_folder

    result = evaluate_folder(
        _lazy_model(args.model, args.quiet), args.data, seq_len=args.seq_len, batch_size=args.batch_size,
        max_windows=args.max_windows, device=args.device, show_progress=not args.quiet,
    )
    if not args.quiet:
        console.print(
            f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
            f"({result['windows']} windows of {result['seq_len']}, {result['nonfinite_windows']} non-finite); "
            f"{result['parameters']:,} parameters"
        )
    _emit(args, result)


def _cmd_quickstart(args: argparse.Namespace) -> None:
    import tempfile

    from rich.table import Table

    from .core.config import CompressionConfig
    from .core.methods import get_method
    from .display import compression_progress, console
    from .training.reference import resolve_model
    from .workflows import CalibrationSpec, compress_folder, evaluate_folder

    for method in args.methods:
        get_method(method)
    show = not args.quiet
    path = resolve_model(args.model, show_progress=show)
    runs = [(ratio, method) for ratio in args.ratios for method in args.methods]

    def say(message: str) -> None:  # where the long run is, between the per-phase bars
        if show:
            console.print(f"quickstart {message}")

    say(f"0/{len(runs)}: dense {path.name}: evaluate")
    rows = [{"method": "dense", "ratio": 0.0,
             **evaluate_folder(path, device=args.device, max_windows=args.max_windows, show_progress=show)}]
    calibration = CalibrationSpec(None, samples=args.samples, seq_len=args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        for done, (ratio, method) in enumerate(runs, 1):
            say(f"{done}/{len(runs)}: {method} at {ratio:.0%}: compress, then evaluate")
            out = f"{tmp}/{method}-{ratio}"
            with compression_progress(show) as progress:
                report = compress_folder(path, CompressionConfig(method=method, ratio=ratio), calibration, out,
                                         device=args.device, progress=progress)
            result = evaluate_folder(out, device=args.device, max_windows=args.max_windows, show_progress=show)
            rows.append({"method": method, "ratio": ratio, "achieved_ratio": report.achieved_ratio,
                         "compress_seconds": report.seconds, **result})
    if not args.quiet:
        table = Table(title=f"{path.name}: perplexity on the embedded test split")
        for column in ("method", "ratio", "achieved", "perplexity", "Δ vs dense", "parameters"):
            table.add_column(column, justify="right")
        dense = rows[0]["perplexity"]
        for row in rows:
            table.add_row(
                row["method"], f"{row['ratio']:.0%}", f"{row.get('achieved_ratio', 0.0):.2%}",
                f"{row['perplexity']:.2f}", f"{row['perplexity'] / dense - 1:+.1%}", f"{row['parameters']:,}",
            )
        console.print(table)
    _emit(args, {"model": str(path), "rows": rows})


def _cmd_export(args: argparse.Namespace) -> None:
    from .display import console

    if args.model is not None:
        from .core.dense import export_dense

        if not args.dense:
            raise InvalidInputError("--model is already a model folder; pass --dense to write its dense equivalent")
        path = export_dense(args.model, args.out, overwrite=args.overwrite)
    else:
        from .training.export import export_checkpoint

        path = export_checkpoint(args.checkpoint, args.out, args.base_model, model_attr=args.model_attr,
                                 dense=args.dense, overwrite=args.overwrite)
    if not args.quiet:
        console.print(f"exported {'dense' if args.dense else 'compressed'} model to {path}")
    _emit(args, {"out": str(path), "dense": args.dense})


def _cmd_reference(args: argparse.Namespace) -> None:
    from .training.reference import resolve_model

    path = resolve_model("reference", show_progress=not args.quiet)
    if not args.json:
        print(path)
    _emit(args, {"path": str(path)})


_COMMANDS = {
    "compress": _cmd_compress,
    "evaluate": _cmd_evaluate,
    "quickstart": _cmd_quickstart,
    "export": _cmd_export,
    "reference": _cmd_reference,
}


def _run_lightning(argv: list[str]) -> None:
    """``adasvd fit|validate|test …``: a LightningCLI run, then a summary (tables, ``--json``)."""
    from .display import quiet_libraries
    from .lightning_cli import run_cli

    quiet_libraries()  # again: importing Lightning has just reset its loggers to INFO
    json_out, quiet = "--json" in argv, "--quiet" in argv
    args = [a for a in argv if a not in ("--json", "--quiet")]
    if quiet and args[0] in ("validate", "test"):
        args += ["--verbose", "false"]  # Lightning's own results table
    cli = run_cli(args, quiet=quiet)
    try:
        if cli.trainer.is_global_zero:
            _print_summary(args[0], cli, json_out=json_out, quiet=quiet)
    finally:
        from .core.distributed import shutdown

        shutdown()  # multi-process runs: every rank leaves the process group together


def _print_summary(command: str, cli, *, json_out: bool, quiet: bool) -> None:
    from .display import console, report_table
    from .lightning_cli import run_summary

    summary = run_summary(command, cli)
    if not quiet:
        for report in summary["reports"]:
            console.print(report_table(report))
        if summary["checkpoint"]:
            console.print(f"checkpoint: {summary['checkpoint']}")
    if json_out:
        payload = {**summary, "reports": [r.to_dict() for r in summary["reports"]]}
        print(strict_json(payload))


class _Interrupted:
    """Remembers a Ctrl-C even where a library turns it into something else.

    Lightning catches `KeyboardInterrupt` inside ``trainer.fit`` and exits with status 1; transformers
    re-raises it from a lazy import as `ModuleNotFoundError`. The handler marks the interrupt before
    raising, so `main` can still report it as one.
    """

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def _interrupted() -> int:
    print("adasvd: interrupted", file=sys.stderr, flush=True)
    _forget_unhandled_interrupt()
    return 130


def _forget_unhandled_interrupt() -> None:
    """Keep exit status 130 when the Ctrl-C landed inside C++ code that runs Python (pybind11 during
    ``import torch``): CPython then flags the interrupt as unhandled, although it was handled here, and
    ends the process by SIGINT instead of with our status. Running any code through the same C entry
    point clears that flag."""
    try:
        import ctypes

        ctypes.pythonapi.PyRun_SimpleString(b"pass")
    except Exception:  # not CPython: nothing to clear
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """The ``adasvd`` entry point: exit status 0, 2 (bad input), 130 (interrupted)."""
    _Interrupted.seen = False
    try:
        previous = signal.signal(signal.SIGINT, _Interrupted.handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        previous = None
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BaseException as exc:
        # Libraries turn a Ctrl-C into other exits: Lightning into exit(1), transformers' lazy
        # imports into ModuleNotFoundError. The handler saw it either way.
        if isinstance(exc, KeyboardInterrupt) or _Interrupted.seen:
            return _interrupted()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str]) -> int:
    if argv and argv[0] in ("fit", "validate", "test"):
        command, run = argv[0], lambda: _run_lightning(argv)
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: _COMMANDS[args.command](args)
    from .display import quiet_libraries
    from .threads import configure_threads

    quiet_libraries()
    configure_threads()  # before torch is imported: sized to the CPUs this process may use
    try:
        run()
    except InvalidInputError as exc:
        print(f"adasvd {command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
        if lightning is None or not isinstance(exc, lightning.MisconfigurationException):
            raise
        # Lightning rejects the trainer arguments (e.g. an accelerator this machine does not have).
        print(f"adasvd {command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
