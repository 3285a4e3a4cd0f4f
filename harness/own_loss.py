"""Benchmark a loss from your own code, without editing this repository.

    python -m harness.run --loss mypkg.losses:FancyLoss --loss-space fancy.toml --study cub

`MODULE:CLASS` is imported (MODULE must be importable: installed, or on PYTHONPATH), and the
class is registered as a loss (losses/registry.py `register_external_loss`): it becomes a row of
the benchmark matrix, so `--study cub` (or `fancy_loss_cub`) is the cell of that loss on CUB
with exactly the MLRC configuration of every other loss there. The optional space file:

    name = "fancy"                    # registry name and study-name alias (default: the class
                                      # name in snake_case, FancyLoss -> fancy_loss)
    [defaults]                        # parameter values (default: __init__'s own defaults)
    margin = 0.1
    [space]                           # searched parameters, as in [search.space]
    "loss.margin" = {low = 0.0, high = 1.0}
    "loss.scale" = {low = 1.0, high = 100.0, log = true}

Every __init__ parameter with a number, bool or string default can be set with --set loss.NAME;
the space names only parameters that __init__ accepts.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

SPACE_FILE_KEYS = ("name", "defaults", "space")
SIZE_ARGUMENTS = ("num_classes", "embedding_size")  # the harness passes these itself


def register_own_loss(target: str, space_file: str | None = None) -> str:
    """Import `MODULE:CLASS`, register it as a loss, return its registry name."""
    from losses.registry import register_external_loss

    cls = import_loss_class(target)
    table = _read_space_file(space_file) if space_file else {}
    name = table.get("name") or snake_case(cls.__name__)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"{space_file}: name = {name!r}: expected lower_snake_case")
    space = _space(table.get("space", {}), space_file)
    defaults = _defaults(cls, table.get("defaults", {}), space, space_file or "--loss")
    try:
        register_external_loss(name, cls, defaults, space, reference=f"{target} (your own code)")
    except ValueError as e:
        raise ConfigError(f"--loss {target}: {e}") from None
    return name


def import_loss_class(target: str) -> type:
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"--loss {target!r}: expected MODULE:CLASS, e.g. "
                          f"--loss mypkg.losses:FancyLoss")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--loss {target}: cannot import {module_name!r} ({e}); install it "
                          f"or add its folder to PYTHONPATH") from None
    except Exception as e:  # the user's module failed while importing: show what it raised
        raise ConfigError(f"--loss {target}: importing {module_name!r} raised "
                          f"{type(e).__name__}: {e}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"--loss {target}: module {module_name!r} has no {class_name!r}")
    import torch

    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ConfigError(f"--loss {target}: {class_name} is not a torch.nn.Module subclass; "
                          f"a loss is a module called as loss(embeddings, labels), e.g. a "
                          f"pytorch_metric_learning loss")
    if not _takes_embeddings_and_labels(cls):
        raise ConfigError(f"--loss {target}: {class_name}.forward must accept "
                          f"(embeddings, labels), as pytorch_metric_learning losses do")
    return cls


def snake_case(text: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", text).lower()


def _takes_embeddings_and_labels(cls: type) -> bool:
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # minus self
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                 p.POSITIONAL_OR_KEYWORD)]) >= 2


def _read_space_file(path: str) -> dict[str, Any]:
    from harness.config import read_toml

    table = read_toml(Path(path))
    unknown = set(table) - set(SPACE_FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; expected name, [defaults], "
                          f"[space]")
    for key in ("defaults", "space"):
        if not isinstance(table.get(key, {}), dict):
            raise ConfigError(f"{path}: {key} must be a table [{key}]")
    return table


def _space(table: dict[str, Any], where: str | None) -> dict:
    """[space] as the registry's SearchParams, keyed by parameter name (without "loss.")."""
    from harness.search import _as_search_param

    space = {}
    for key, value in table.items():
        if not key.startswith("loss."):
            raise ConfigError(f"{where}: [space] key {key!r}: expected \"loss.<parameter>\" "
                              f"(other keys go in a study's [search.space])")
        space[key.removeprefix("loss.")] = _as_search_param(key, value)
    return space


def _defaults(cls: type, given: dict[str, Any], space: dict, where: str) -> dict[str, Any]:
    """Every settable parameter with its default: __init__'s plain defaults, then [defaults].
    A searched float whose default is an int becomes a float (the type --set values check)."""
    params = inspect.signature(cls).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {k: p for k, p in params.items() if k not in SIZE_ARGUMENTS and
             p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted((set(given) | set(space)) - set(named))
    if unknown and not open_ended:
        raise ConfigError(f"{where}: {cls.__name__}.__init__ has no parameter(s) "
                          f"{', '.join(unknown)}; its parameters: "
                          f"{', '.join(named) or '(none)'}")
    defaults = {k: p.default for k, p in named.items()
                if isinstance(p.default, (bool, int, float, str))}
    defaults.update(given)
    missing = sorted(set(space) - set(defaults))
    if missing:
        raise ConfigError(f"{where}: searched parameter(s) {', '.join(missing)} of "
                          f"{cls.__name__} have no default value; give one under [defaults]")
    for key, param in space.items():
        if param.kind == "float" and isinstance(defaults[key], int) \
                and not isinstance(defaults[key], bool):
            defaults[key] = float(defaults[key])
    required = [k for k, p in named.items() if p.default is p.empty and k not in defaults]
    if required:
        raise ConfigError(f"{where}: {cls.__name__}.__init__ requires {', '.join(required)}; "
                          f"give values under [defaults]")
    return defaults
