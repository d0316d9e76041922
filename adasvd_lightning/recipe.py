"""One-shot compression recipes: a YAML file describing a `compress` run.

Format (every key optional; command-line flags given explicitly win over the recipe)::

    compress:
      model: reference          # or a model folder
      method: adasvd-duo
      ratio: 0.4
      method_options: {}        # strategy / knob overrides, e.g. {refinement: adacomp}
      include: null             # regex patterns of target module names
      exclude: []
    calibration:
      text: null                # text file; null = embedded training split
      samples: 64
      seq_len: 256
      seed: 0

Loaded with `yaml.safe_load`; unknown sections or keys are rejected with a did-you-mean hint before any
work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from .core.errors import InvalidInputError

__all__ = ["RECIPE_SCHEMA", "load_recipe"]

#: section → key → accepted Python types (None allowed where listed).
RECIPE_SCHEMA: dict[str, dict[str, tuple]] = {
    "compress": {
        "model": (str,),
        "method": (str,),
        "ratio": (float, int),
        "method_options": (dict,),
        "include": (list, type(None)),
        "exclude": (list,),
    },
    "calibration": {
        "text": (str, type(None)),
        "samples": (int,),
        "seq_len": (int,),
        "seed": (int,),
    },
}


def _unknown(kind: str, name: str, choices) -> InvalidInputError:
    close = difflib.get_close_matches(name, list(choices), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InvalidInputError(f"unknown {kind} {name!r}{hint}; expected one of {', '.join(choices)}")


def load_recipe(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and validate a recipe; returns {section: {key: value}} with only the keys it sets."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    recipe: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in RECIPE_SCHEMA:
            raise _unknown("recipe section", str(section), RECIPE_SCHEMA)
        if not isinstance(values, dict):
            raise InvalidInputError(f"{path}: section {section!r} must be a mapping")
        schema = RECIPE_SCHEMA[section]
        for key, value in values.items():
            if key not in schema:
                raise _unknown(f"key in section {section!r}:", str(key), schema)
            types = schema[key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = "/".join("null" if t is type(None) else t.__name__ for t in types)
                raise InvalidInputError(f"{path}: {section}.{key} must be {names}, got {value!r}")
        recipe[section] = dict(values)
    return recipe
