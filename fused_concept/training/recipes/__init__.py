"""Recipes: named sets of training settings, as TOML files in this folder (``paper.toml``: the paper's).

A recipe file has a ``[settings]`` table whose keys are `TrainConfig` fields and an ``[about]`` table
(``name``, ``scale``: what the recipe trains on, in words), and optionally a ``[sweep]`` table (``lam``, ``seeds``:
the sweep command's defaults under that recipe; ``medium.toml``: the CPU medium setting). ``--recipe NAME`` (a file here) or ``--recipe
PATH.toml`` (any file) starts a run from its settings instead of the CPU default job's; options given
explicitly still win. ``default`` is the job `TrainConfig`'s own defaults describe (no file).
Every run lists its departures from the paper's recipe (`departures`) and records them in metrics.json.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Dict, List

FOLDER = os.path.dirname(os.path.abspath(__file__))
DEFAULT = "default"


class RecipeError(ValueError):
    """A recipe that cannot be used: names the recipe and the problem (`--recipe NAME: ...`)."""

    def __init__(self, name: str, reason: str):
        self.option, self.value = "--recipe", name
        super().__init__(f"--recipe {name}: {reason}")


def names() -> List[str]:
    """The recipes shipped with the package, ``default`` first."""
    return [DEFAULT] + sorted(f[:-5] for f in os.listdir(FOLDER) if f.endswith(".toml"))


def path_of(name: str) -> str:
    """The file of recipe `name`: a file in this folder, or `name` itself when it ends in .toml."""
    path = name if name.endswith(".toml") else os.path.join(FOLDER, f"{name}.toml")
    if not os.path.isfile(path):
        raise RecipeError(name, "no such recipe file" if name.endswith(".toml")
                          else "unknown recipe; choose one of " + ", ".join(names()) + " or give a .toml file")
    return path


def read(name: str) -> Dict:
    """The parsed recipe file (``{"about": {...}, "settings": {...}}``); ``default`` has no settings."""
    if name == DEFAULT:
        return {"about": {"name": DEFAULT, "scale": ""}, "settings": {}}
    path = path_of(name)
    try:
        with open(path, "rb") as handle:
            recipe = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(name, f"{path} is not valid TOML ({exc})") from None
    if not isinstance(recipe.get("settings"), dict):
        raise RecipeError(name, f"{path} has no [settings] table")
    recipe.setdefault("about", {})
    return recipe


def settings(config_class, name: str) -> Dict:
    """The settings of recipe `name`, each checked to be a field of `config_class` (TrainConfig)."""
    values = read(name)["settings"]
    known = {item.name for item in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(name, "unknown setting(s) " + ", ".join(unknown) + " (not TrainConfig fields)")
    return values


def sweep_defaults(name: str) -> Dict:
    """The recipe's ``[sweep]`` table as the sweep command's defaults: ``lam`` (a list of numbers) and
    ``seeds`` (a list of integers, given to the command as ``--seeds`` text); {} when it has none."""
    table = read(name).get("sweep", {})
    unknown = sorted(set(table) - {"lam", "seeds"})
    if unknown:
        raise RecipeError(name, "unknown [sweep] key(s) " + ", ".join(unknown) + " (lam, seeds)")
    out = {}
    if "lam" in table:
        if not isinstance(table["lam"], list) or not all(isinstance(v, (int, float)) for v in table["lam"]):
            raise RecipeError(name, "[sweep] lam must be a list of numbers")
        out["lam"] = [float(v) for v in table["lam"]]
    if "seeds" in table:
        if not isinstance(table["seeds"], list) or not all(isinstance(v, int) for v in table["seeds"]):
            raise RecipeError(name, "[sweep] seeds must be a list of integers")
        out["seeds"] = ",".join(str(v) for v in table["seeds"])
    return out


def apply(config_class, name: str, **overrides):
    """A `config_class` (TrainConfig) with every setting of recipe `name`, then ``overrides``."""
    return config_class(**{**settings(config_class, name), **overrides})


_PAPER = read("paper")
PAPER_SETTINGS: Dict = dict(_PAPER["settings"])  # the paper's settings, as recorded in every metrics.json
PAPER_SCALE: str = _PAPER["about"]["scale"]


def paper_config(config_class, **overrides):
    """A `config_class` (TrainConfig) with every paper setting, then ``overrides``."""
    return apply(config_class, "paper", **overrides)


def departures(config, recipe: Dict = PAPER_SETTINGS) -> list:
    """``"name=value (paper value)"`` for each setting of `recipe` (the paper's) the config does not follow."""
    return [f"{key}={getattr(config, key)!r} (paper {value!r})" for key, value in recipe.items()
            if getattr(config, key) != value]
