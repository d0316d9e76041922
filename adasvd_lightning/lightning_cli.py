"""``adasvd fit | validate | test --config recipe.yaml``: recipe runs on LightningCLI.

A recipe is a LightningCLI config with four sections:

* ``model`` — `PretrainedCausalLMModule` arguments (``model_path``: a model folder or ``reference``,
  ``dtype``, optimiser settings);
* ``data`` — `CausalLMDataModule` arguments (text files, ``seq_len``, ``batch_size``,
  ``calibration_samples``); its tokenizer is linked to ``model.model_path``;
* ``trainer`` — Lightning ``Trainer`` arguments, with the compression and recovery steps as callbacks
  (`SVDCompression`, `TrainableParameters`) and the strategy (e.g. `CPUDeepSpeedStrategy` or
  ``deepspeed_stage_3``);
* optionally ``optimizer`` / ``lr_scheduler`` / ``seed_everything`` (standard LightningCLI).

``--print_config`` prints the resolved recipe; dotted overrides (``--trainer.max_steps 100``,
``--model.model_path /models/llama``) work as in any LightningCLI program.

Everything that can be checked without loading a model is checked first (`validate_before_run`): model
and data paths, callback arguments (ratio, schedule, method options), a schedule the trainer never
reaches, the strategy name or DeepSpeed stage. A failure raises `InvalidInputError`, which the ``adasvd``
entry point turns into exit code 2 and one line — before any folder is created.

The same recipe drives the one-shot ``adasvd compress --recipe`` (`one_shot_settings` reads its
model, calibration data and `SVDCompression` arguments), so there is one recipe format for both.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import contextlib
import io

# DeepSpeed announces on *stdout*, when first imported (Lightning's strategy classes import it), that
# it fell back to the CPU accelerator. Swallow that notice so `--print_config` output, `--json` lines
# and one-line errors stay clean; the strategy still reports the devices it uses.
with contextlib.redirect_stdout(io.StringIO()):
    try:
        import deepspeed  # noqa: F401
    except Exception:  # pragma: no cover - DeepSpeed is a dependency, but never fail the CLI on it
        pass

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402

from .callbacks import SVDCompression, TrainableParameters
from .callbacks.compression import DEFAULT_RATIO
from .core.corpus import resolve_text_path
from .core.errors import InvalidInputError
from .training.datasets_data import CausalLMDataModule
from .training.pretrained import PretrainedCausalLMModule

__all__ = ["AdasvdCLI", "LIGHTNING_COMMANDS", "friendly_parse_error", "one_shot_settings", "parse_recipe", "run_cli",
           "run_summary", "validate_before_run"]

LIGHTNING_COMMANDS = ("fit", "validate", "test")
_DEEPSPEED_STAGES = (0, 1, 2, 3)


def _class_name(item: Any) -> str:
    return str(_get(item, "class_path") or "").rsplit(".", 1)[-1]


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Read a key from a jsonargparse Namespace or a dict alike."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _as_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    return dict(vars(obj)) if hasattr(obj, "__dict__") else dict(obj)


def _callbacks(trainer_cfg: Any) -> list[tuple[str, dict]]:
    """(class name, init args) of each configured callback."""
    items = _get(trainer_cfg, "callbacks") or []
    if not isinstance(items, (list, tuple)):
        items = [items]
    return [(_class_name(item), _as_dict(_get(item, "init_args"))) for item in items]


def _check_model_path(value: Any) -> None:
    """The model folder exists and holds a causal LM (``reference`` is built on first use)."""
    from .core.serialization import check_model_folder

    if value is not None and str(value) != "reference":
        try:
            check_model_folder(str(value))
        except InvalidInputError as exc:
            raise InvalidInputError(f"model.model_path: {exc}") from None


def _check_strategy(strategy: Any) -> None:
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        known = set(StrategyRegistry.available_strategies()) | {"auto", "ddp", "ddp_spawn", "deepspeed", "fsdp"}
        if strategy not in known:
            close = difflib.get_close_matches(strategy, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            stages = ", ".join(sorted(k for k in known if k.startswith("deepspeed_stage")))
            raise InvalidInputError(f"trainer.strategy: unknown strategy {strategy!r}{hint}; DeepSpeed: {stages}")
        return
    if "DeepSpeed" in _class_name(strategy):
        stage = _get(_get(strategy, "init_args"), "stage", 2)
        if stage not in _DEEPSPEED_STAGES:
            raise InvalidInputError(
                f"trainer.strategy: DeepSpeed ZeRO stage {stage!r} does not exist; use one of {_DEEPSPEED_STAGES}"
            )


def validate_before_run(config: Any) -> None:
    """Check a parsed recipe (one subcommand's namespace) without loading anything heavy."""
    model, data, trainer = _get(config, "model"), _get(config, "data"), _get(config, "trainer")
    _check_model_path(_get(model, "model_path"))
    for key, split in (("train_files", "train"), ("val_files", "test"), ("test_files", "test")):
        for file in _get(data, key) or []:
            try:
                resolve_text_path(file, split)
            except InvalidInputError as exc:
                raise InvalidInputError(f"data.{key}: {exc}") from None
    _check_strategy(_get(trainer, "strategy"))
    max_steps, max_epochs = _get(trainer, "max_steps", -1), _get(trainer, "max_epochs")
    for name, args in _callbacks(trainer):
        if name == "SVDCompression":
            try:
                callback = SVDCompression(**args)  # construction validates every argument, cheaply
            except TypeError as exc:
                raise InvalidInputError(f"SVDCompression: {exc}") from None
            callback.check_schedule_reached(max_steps=max_steps, max_epochs=max_epochs)
        elif name == "TrainableParameters":
            TrainableParameters(**args)


class StepRunProgressBar(RichProgressBar):
    """Lightning's rich bar, without the epoch total a step-limited run does not have.

    With ``max_steps`` and no ``max_epochs`` Lightning sets ``max_epochs=-1`` and the bar reads
    "Epoch 6/-2"; here it reads "Epoch 6" (the bar itself counts the batches).
    """

    def _get_train_description(self, current_epoch: int) -> str:
        text = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        return text.replace(f"/{max_epochs - 1}", "", 1) if max_epochs is not None and max_epochs < 0 else text


class AdasvdCLI(LightningCLI):
    """LightningCLI over `PretrainedCausalLMModule` + `CausalLMDataModule` with recipe checks.

    ``parse_only=True`` stops after parsing and validation (used by ``compress --recipe``).
    """

    def __init__(self, args: list[str] | None = None, *, run: bool = True, parse_only: bool = False,
                 quiet: bool = False) -> None:
        self.parse_only = parse_only
        self.quiet = quiet
        # The resolved recipe is saved next to the logs of a training run; evaluation runs write nothing.
        training = bool(args) and args[0] == "fit"
        super().__init__(
            PretrainedCausalLMModule,
            CausalLMDataModule,
            args=args,
            run=run,
            save_config_callback=SaveConfigCallback if training else None,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data must be tokenized with the model's own tokenizer.
        parser.link_arguments("model.model_path", "data.tokenizer")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        validate_before_run(config)
        if self.quiet:
            config.trainer.enable_progress_bar = False
            config.trainer.enable_model_summary = False

    def instantiate_trainer(self, **kwargs: Any):
        # The default progress bar, unless the recipe brings its own or turns it off.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if ("callbacks" not in kwargs and config.get("enable_progress_bar", True) is not False
                and not any(isinstance(c, ProgressBar) for c in callbacks)):
            kwargs["callbacks"] = [*callbacks, StepRunProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        if self.parse_only:
            return
        super().instantiate_classes()
        if self.quiet:
            for callback in self.trainer.callbacks:
                if isinstance(callback, SVDCompression):
                    callback.show_progress = False


def _parser_keys(parser: Any) -> list[str]:
    """Every dotted key a (sub)command parser accepts."""
    if parser is None:
        return []
    subcommands = getattr(parser, "_subcommands_action", None)
    parsers = list(subcommands._name_parser_map.values()) if subcommands is not None else [parser]
    keys = set()
    for sub in parsers:
        for action in getattr(sub, "_actions", []):
            dest = getattr(action, "dest", "")
            if dest and dest not in ("help", "config", "print_config"):
                keys.add(dest)
    return sorted(keys)


def _class_parameters(class_path: str) -> list[str]:
    import importlib
    import inspect

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        names: list[str] = []
        for klass in cls.__mro__:  # **kwargs forwarded to a base class: collect its parameters too
            if "__init__" not in vars(klass):
                continue
            params = inspect.signature(klass.__init__).parameters
            names += [p for p in params if p not in ("self", "args", "kwargs")]
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                break
        return names
    except Exception:
        return []


def _did_you_mean(key: str, candidates: list[str]) -> str:
    prefix, _, tail = key.rpartition(".")
    same_group = [c for c in candidates if c.rpartition(".")[0] == prefix]
    pool = {c.rpartition(".")[2]: c for c in same_group} if same_group else {c: c for c in candidates}
    close = difflib.get_close_matches(tail if same_group else key, list(pool), n=1, cutoff=0.6)
    if not close and not same_group:
        sections = sorted({c.split(".")[0] for c in candidates})
        close = difflib.get_close_matches(key.split(".")[0], sections, n=1, cutoff=0.6)
        return f" (did you mean {close[0]!r}?)" if close else ""
    return f" (did you mean {pool[close[0]]!r}?)" if close else ""


def _type_message(key: str, detail: str) -> str:
    match = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", detail.splitlines()[0] if detail else "")
    if match:
        return f"{key}: expected {match.group(1)}, got {match.group(2).strip()!r}"
    union = re.search(r"Union subtypes.*?Subtypes: \[(.*?)\].*?Given value: ([^\n]*)", detail, re.S)
    if union:  # an optional argument (e.g. `ratio: float | None`): name the types it accepts
        types = [("None" if t == "NoneType" else t) for t in re.findall(r"<class '(\w+)'>", union.group(1))]
        return f"{key}: expected {' or '.join(types)}, got {union.group(2).strip()!r}"
    return f"{key}: {detail.strip().splitlines()[0] if detail.strip() else detail}"


def friendly_parse_error(message: str, parser: Any = None) -> str:
    """One actionable line from a jsonargparse error, with a did-you-mean for unknown keys."""
    text = str(message)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if text.startswith("Problems parsing config"):  # YAML syntax: say where
        where = next((re.sub(r'in "<unicode string>", ', "", line) for line in lines if line.startswith("in ")), "")
        problem = next((line for line in lines[1:] if not line.startswith("in ")), lines[0].split(":", 1)[-1])
        return f"the recipe is not valid YAML: {problem.strip()} ({where})" if where else f"the recipe is not valid YAML: {problem.strip()}"
    outer = re.match(r'Parser key "([\w.]+)":', text)
    nested = re.search(r"Problem with given class_path '([\w.]+)':\s*\n(.*)", text, re.S)
    if nested:  # an error inside a class given by class_path (a callback, the strategy, …)
        class_path, rest = nested.group(1), nested.group(2).strip().splitlines()
        owner = f"{outer.group(1)} {class_path.rsplit('.', 1)[-1]}" if outer else class_path
        first = rest[0].strip() if rest else ""
        unknown = re.match(r"Option '([\w.]+)' is not accepted", first)
        if unknown:
            key = unknown.group(1)
            return f"{owner}: unknown argument {key!r}{_did_you_mean(key, _class_parameters(class_path))}"
        missing = re.match(r"module '([\w.]+)' has no attribute '(\w+)'", first)
        if missing:
            import importlib

            names = [n for n in dir(importlib.import_module(missing.group(1))) if not n.startswith("_")]
            close = difflib.get_close_matches(missing.group(2), names, n=1)
            hint = f" (did you mean {missing.group(1)}.{close[0]}?)" if close else ""
            return f"{outer.group(1) if outer else 'class_path'}: no class {class_path!r}{hint}"
        inner = re.match(r'Parser key "([\w.]+)":', first)
        if inner and len(rest) > 1:
            return _type_message(f"{owner}.{inner.group(1)}", "\n".join(rest[1:]))
        return f"{owner}: {first}"
    unrecognized = re.search(r"[Uu]nrecognized arguments: --([\w.-]+)", text)
    if unrecognized:  # a mistyped dotted flag: `--trainer.max_stepz 5`
        key = unrecognized.group(1)
        hint = _did_you_mean(key, _parser_keys(parser))
        return f"unknown option --{key}" + (hint.replace("(did you mean '", "(did you mean '--") if hint else "")
    for pattern in (r"Group '(\w+)' does not accept option '([\w.]+)'",
                    r"Subcommand '\w+' does not accept option '()([\w.]+)'",
                    r"Option '()([\w.]+)' is not accepted"):
        match = re.search(pattern, text)
        if match:
            key = ".".join(part for part in match.groups() if part)
            return f"unknown key {key!r}{_did_you_mean(key, _parser_keys(parser))}"
    if outer and len(lines) > 1:
        return _type_message(outer.group(1), "\n".join(lines[1:]))
    return lines[0] if lines else text


def check_recipe_file(path: str | Path) -> Path:
    """The recipe exists and is a YAML mapping of sections (checked before LightningCLI parses it)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise InvalidInputError(f"{path} is not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None
    if not isinstance(data, dict) or not data:
        raise InvalidInputError(f"{path}: a recipe is a mapping of sections (model, data, trainer), got "
                                f"{'an empty file' if data is None else type(data).__name__}")
    return path


def parse_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Parse and validate a recipe without running it; returns the config namespace."""
    path = check_recipe_file(path)
    cli = run_cli(["--config", str(path), *(overrides or [])], run=False, parse_only=True)
    return cli.config


def run_cli(args: list[str], *, run: bool = True, parse_only: bool = False, quiet: bool = False) -> AdasvdCLI:
    """Build the CLI; parse errors and validation failures become `InvalidInputError`."""
    import warnings

    from jsonargparse import ArgumentError

    for flag, value in zip(args, args[1:]):
        if flag == "--config":
            check_recipe_file(value)
    # `adasvd` passes its own argv on purpose; Lightning warns when args and sys.argv both exist.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
    cli = AdasvdCLI.__new__(AdasvdCLI)  # kept so a parse error can consult the parser's keys
    try:
        cli.__init__(args, run=run, parse_only=parse_only, quiet=quiet)
    except ArgumentError as exc:
        raise InvalidInputError(friendly_parse_error(str(exc), getattr(cli, "parser", None))) from None
    return cli


def one_shot_settings(config: Any) -> dict:
    """Model, compression and calibration settings of a recipe, for ``adasvd compress --recipe``.

    Taken from ``model.model_path``, the first `SVDCompression` callback (which must compress at setup
    or at fit end: a one-shot run has no training steps) and the data section (first training file,
    ``calibration_samples``, ``seq_len``, ``seed``, ``batch_size``: the calibration sample is drawn
    exactly as the data module draws it).
    """
    compressions = [args for name, args in _callbacks(_get(config, "trainer")) if name == "SVDCompression"]
    if not compressions:
        raise InvalidInputError("the recipe has no SVDCompression callback under trainer.callbacks")
    args = compressions[0]
    if args.get("at", "setup") not in ("setup", "fit_end"):
        raise InvalidInputError(
            f"compress --recipe runs one stage; this recipe compresses at {args['at']!r} during training "
            "(run it with `adasvd fit --config`)"
        )
    data = _get(config, "data")
    files = _get(data, "train_files") or [None]
    return {
        "model": _get(_get(config, "model"), "model_path", "reference"),
        "method": args.get("method", "svd-llm"),
        "ratio": args.get("ratio") or DEFAULT_RATIO,
        "method_options": dict(args.get("method_options") or {}),
        "include": args.get("include"),
        "exclude": list(args.get("exclude") or []),
        "propagation": args.get("propagation"),
        "execution_device": args.get("execution_device"),
        "svd_driver": args.get("svd_driver", "auto"),
        "statistics_dtype": args.get("statistics_dtype", "float32"),
        "decomposition_threads": args.get("decomposition_threads", 1),
        "probe_table": args.get("probe_table"),
        "activation_dir": args.get("activation_dir"),
        "merge_unprofitable": args.get("merge_unprofitable"),
        "text": str(files[0]) if files[0] is not None else None,
        "samples": _get(data, "calibration_samples", 64),
        "seq_len": _get(data, "seq_len", 256),
        "seed": _get(data, "seed", 0),
        "batch_size": _get(data, "batch_size", 8),
    }


def run_summary(command: str, cli: AdasvdCLI) -> dict:
    """What a finished run produced: metrics, compression reports, parameters and the last checkpoint."""
    import math

    from .core.params import count_parameters

    trainer = cli.trainer
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        number = float(value)
        metrics[key] = number if math.isfinite(number) else str(number)
    reports = [r for cb in trainer.callbacks if isinstance(cb, SVDCompression) for r in cb.reports]
    checkpoint = None
    if command == "fit" and trainer.checkpoint_callback is not None:
        checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path or None
    return {
        "command": command,
        "metrics": metrics,
        "parameters": count_parameters(cli.model),
        "global_step": trainer.global_step,
        "checkpoint": checkpoint,
        "reports": reports,
    }
