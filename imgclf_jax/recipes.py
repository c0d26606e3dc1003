"""The recipes: a shipped one by name (imgclf_jax/configs/NAME.py), or a user's file by path, each a
`get_config()` starting from `config_lib.base_config()`; and the `--config` flag's default."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import ml_collections

from imgclf_jax.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def recipe_names() -> list[str]:
    """The shipped recipes' names (`--config NAME`)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.name.startswith("_"))


def find_config_file(name_or_path: str) -> str:
    """The recipe file for `--config`: a shipped recipe by name ('cats_vs_dogs'), or a file by path (anything
    with a '/' or ending in '.py'). A name is only ever looked up among the shipped recipes, so a stray file
    of that name in the current folder never runs in its place."""
    if os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith(".py"):
        if Path(name_or_path).is_file():
            return str(Path(name_or_path))
        raise UserError(f"config file {name_or_path} does not exist (the shipped recipes, by name: "
                        f"{', '.join(recipe_names())})")
    if name_or_path in recipe_names():
        return str(CONFIGS_DIR / f"{name_or_path}.py")
    raise UserError(f"no recipe named '{name_or_path}': choose one of {', '.join(recipe_names())}, or give "
                    "the path of your own recipe file (e.g. ./my_recipe.py)")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs a recipe's `get_config()` (`find_config_file`); lets one start from another (e.g. 'default')."""
    resolved = find_config_file(path)
    spec = importlib.util.spec_from_file_location(f"imgclf_config_{Path(resolved).stem}", resolved)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def default_config_argv(argv: Sequence[str]) -> list[str]:
    """Resolves `--config` to a file; when none is given, adds the 'demo' recipe with no data flags, else
    'default'."""
    argv = list(argv)
    names = [a.split("=", 1)[0] for a in argv[1:]]
    if "--config" in names:
        i = names.index("--config") + 1
        if "=" in argv[i]:
            flag, value = argv[i].split("=", 1)
            argv[i] = f"{flag}={find_config_file(value)}"
        elif i + 1 < len(argv):
            argv[i + 1] = find_config_file(argv[i + 1])
        return argv
    has_data = any(n in ("--data_dir", "--dataset") for n in names)
    default = CONFIGS_DIR / ("default.py" if has_data else "demo.py")
    return argv[:1] + [f"--config={default}"] + argv[1:]
