"""A bad command line is one error line that suggests what was meant, before anything runs.

Hydra already refuses keys that are not in the config; this adds the nearest valid names
("did you mean adapter.r?"), including the names of Axolotl configs
(`lora_r`, `learning_rate`, ...).
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lorafit.errors import LorafitError
from lorafit.from_axolotl import SCALARS
from lorafit.runs.locate import locate

# Axolotl's names, and where they live here: the converter's table (lorafit.from_axolotl),
# plus the names typed on a command line that it reads otherwise.
ALIASES = {
    **SCALARS,
    "lr": "optimizer.lr",
    "batch_size": "data.batch_size",
    "save_interval": "callbacks.model_checkpoint.every_n_train_steps",
}
# Hydra's own keys of an object built from config.
INSTANTIATE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
SWEEP_SYNTAX = re.compile(r",|\b(range|choice|interval|glob|tag)\(")


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items_ex(resolve=False):
        full = f"{prefix}{key}"
        keys += _leaf_keys(value, full + ".") if isinstance(value, DictConfig) else [full]
    return keys


def suggestions(unknown: str, valid: Sequence[str]) -> list[str]:
    """The valid keys closest to `unknown`: aliases, then similar full names and leaf names."""
    leaf = unknown.rsplit(".", 1)[-1]
    found = [ALIASES[leaf]] if leaf in ALIASES else []
    found += difflib.get_close_matches(unknown, valid, n=3, cutoff=0.75)
    by_leaf: dict[str, list[str]] = {}
    for key in valid:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for close in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75):
        found += by_leaf[close]
    return list(dict.fromkeys(found))[:3]


def _group_option_error(error: Exception) -> str | None:
    """`adapter=qloraa`: the group, the option asked for and the options that exist."""
    text = str(error)
    match = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if match is None:
        return None
    group, option = match.groups()
    listed = text.split(f"Available options in '{group}':", 1)[-1].split("Config search path")[0]
    options = listed.split()
    near = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
    hint = f"; did you mean {group}={near[0]}?" if near else ""
    return f"{group}={option}: no such option{hint} (options: {', '.join(options)})"


def _unknown_key_message(unknown: str, overrides: Sequence[str], config_name: str) -> str:
    others = [o for o in overrides if not o.lstrip("+~").startswith(unknown + "=")]
    valid = _leaf_keys(compose(config_name, overrides=others))
    near = suggestions(unknown, valid)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"unknown config key {unknown!r}{hint}"


def _constructor_takes(node: DictConfig, name: str) -> tuple[bool, list[str]]:
    """Whether the `_target_` of `node` accepts the argument `name`, and the ones it names."""
    try:
        parameters = inspect.signature(get_object(node["_target_"])).parameters
    except (ImportError, ValueError, TypeError):
        return True, []  # cannot tell: let instantiation decide
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True, []
    return name in parameters, list(parameters)


def _added_key_error(
    added: Sequence[str],
    composed: DictConfig,
    groups: Sequence[str],
    valid: list[str],
) -> str | None:
    # `+key=value` adds a key to the config. Under an object built from config (`_target_`)
    # it becomes a constructor argument, which must exist; anywhere else nothing reads it, and
    # accepting it would be a silent no-op.
    for override in added:
        key = override.lstrip("+").split("=", 1)[0]
        if key in groups:
            continue
        parent, _, name = key.rpartition(".")
        if name in INSTANTIATE_KEYS:
            continue  # a new object (e.g. +callbacks.mine._target_=...): its arguments are checked
        node = OmegaConf.select(composed, parent) if parent else None
        if isinstance(node, DictConfig) and "_target_" in node:
            takes, names = _constructor_takes(node, name)
            if takes:
                continue
            near = [k for k in suggestions(key, valid) if k.startswith(parent + ".")]
            near += [f"{parent}.{n}" for n in difflib.get_close_matches(name, names, n=3)]
            near = list(dict.fromkeys(near))[:3]
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            return f"+{key}: {node['_target_']} takes no argument {name!r}{hint}"
        near = suggestions(key, valid)
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        return f"+{key} adds a config key that nothing reads{hint}"
    return None


def config_error(
    overrides: Sequence[str],
    config_dir: Path,
    config_name: str = "train",
) -> str | None:
    """One line saying what is wrong with the command line's overrides, or None.

    Unknown keys get the closest valid ones, unknown group options the options that exist,
    and `+key=...` for a key nothing reads is refused rather than
    silently ignored. Any other composition error is Hydra's message on one line.
    """
    if any(SWEEP_SYNTAX.search(o.split("=", 1)[-1]) for o in overrides if "=" in o):
        return None  # sweeps are expanded by Hydra itself, which still refuses unknown keys
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            composed = compose(config_name, overrides=list(overrides))
        except HydraException as error:
            match = re.search(r"Could not override '([^']+)'", str(error))
            if match is not None:
                return _unknown_key_message(match.group(1), overrides, config_name)
            reason = " ".join(str(error).split("\nSee ")[0].split())
            return _group_option_error(error) or f"bad override ({' '.join(overrides)}): {reason}"
        added = [o for o in overrides if o.startswith("+") and not o.startswith("++")]
        if added:
            groups = [p.name for p in config_dir.iterdir() if p.is_dir()]
            kept = [o for o in overrides if o not in added]
            valid = _leaf_keys(compose(config_name, overrides=kept))
            message = _added_key_error(added, composed, groups, valid)
            if message:
                return message
    # Imported here, as it loads torch: `--help` and the other Hydra modes never get this far.
    from lorafit.config_checks import check_values

    try:
        check_values(composed)  # values alone, before Hydra creates a run folder
        if "ckpt" in composed:
            locate(composed.ckpt, "ckpt")  # the tools' output folder is inside the run it names
    except LorafitError as error:
        return str(error)
    return None


def exit_on_config_errors(
    config_dir: Path,
    argv: Sequence[str] | None = None,
    config_name: str = "train",
) -> None:
    """For entry points: stop with one line and status 2 before Hydra starts the run."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("-") for a in arguments):
        return  # --help, --cfg, -m ...: Hydra's own modes
    overrides = [a for a in arguments if "=" in a and not a.lstrip("+~").startswith("hydra.")]
    message = config_error(overrides, config_dir, config_name)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
