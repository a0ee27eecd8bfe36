"""Config files (TOML, YAML, JSON) and `--set KEY=VALUE` as flag defaults, checked as strictly as the flags.

Precedence: built-in default < --config file < --set < a flag typed on the command line. A resumed run puts
the checkpoint's settings between the built-in defaults and the file (see `saved_settings` in parse_args).
A file's keys are flag names; tables may group them (`[optim] lr = 0.02`) but a key stays unique.
"""
import argparse
import json
import os
import sys
import tomllib

import tomli_w
import yaml

from core.registry import suggest
from utils import UserError, write_atomic

# Flags that steer the parsing itself, or name this process, and so never come from or go to a file.
META = {"help", "config", "set", "print_config", "local_rank"}
# Resolved, but left out of a saved config so that re-running it starts a new run.
NOT_SAVED = META | {"logdir", "resume"}
# Names people bring from other trainers, mapped to ours for the "did you mean" hint.
SYNONYMS = {"learning_rate": "lr", "base_lr": "lr", "batch_size": "batchsize", "num_workers": "workers",
            "num_classes": "numclasses", "n_classes": "numclasses", "max_epochs": "epochs", "depth": "layers",
            "backbone": "layers", "model": "model_type", "arch": "model_type", "data_root": "dataset_path",
            "data_path": "dataset_path", "output_dir": "logdir", "work_dir": "logdir", "log_dir": "logdir",
            "wd": "weight_decay", "crop": "crop_size", "os": "output_stride"}


def make_parser(description):
    """An entry script's parser, with the config flags. No abbreviations: one could silently shadow a file key."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add_config_args(parser)
    return parser


def add_config_args(parser):
    g = parser.add_argument_group("config")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="TOML, YAML or JSON file whose keys are flag names; flags on the command line win")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override keys as in a config file, e.g. --set lr=0.02 scale_range=[0.5,2]")
    g.add_argument("--print_config", action="store_true", help="print the resolved configuration as TOML and exit")


def flag_actions(parser):
    """{name: action} by dest and by every long option spelling, so a file may use a flag's alias too."""
    actions = {}
    for a in parser._actions:
        if a.option_strings and a.dest not in META:
            for name in [a.dest] + [o[2:].replace("-", "_") for o in a.option_strings if o.startswith("--")]:
                actions.setdefault(name, a)
    return actions


def parse_args(parser, argv=None, saved_settings=None, task_defaults=None):
    """argparse with config-file and --set defaults; explicit flags always win.

    Two hooks may add layers of defaults, each given the args parsed so far: `task_defaults(args)` returns the
    chosen task's defaults (they replace the built-in ones), and `saved_settings(args)` a resumed checkpoint's
    settings (they replace both). Files, --set and the command line win over all of them.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--set", nargs="+", default=[])
    known, _ = pre.parse_known_args(argv)
    actions = flag_actions(parser)
    values = {}
    if known.config:
        for key, (value, where) in flatten(read_config(known.config), actions, known.config).items():
            values[key] = convert(actions[key], value, f"'{where}' in {known.config}")
    for item in known.set:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set lr=0.02")
        if key not in actions:
            raise UserError(unknown_key(key, actions, "--set"))
        key = actions[key].dest
        values[key] = convert(actions[key], text, f"'{key}' in --set", from_text=True)
    for key in values:
        actions[key].required = False  # a file may supply what the command line must otherwise give
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    dests = {a.dest for a in parser._actions}
    saved = saved_settings(args) if saved_settings else None
    saved = {k: v for k, v in (saved or {}).items() if k in dests and k not in NOT_SAVED}
    if saved:  # a resumed run: its task and settings are the checkpoint's unless given again
        parser.set_defaults(**saved)
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    layer = task_defaults(args) if task_defaults else None
    if layer:
        parser.set_defaults(**layer)
        parser.set_defaults(**saved)
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def read_config(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist; expected a .toml, .yaml/.yml or .json file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            with open(path, "rb") as f:
                table = tomllib.load(f)
        elif ext in (".yaml", ".yml"):
            with open(path) as f:
                table = yaml.safe_load(f)
        elif ext == ".json":
            with open(path) as f:
                table = json.load(f)
        else:
            raise UserError(f"config file {path}: unknown extension '{ext}'; expected .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} could not be parsed: {' '.join(str(e).split())}") from e
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise UserError(f"config file {path}: expected a table of flag names at the top, found {type(table).__name__}")
    return table


def flatten(table, actions, path, prefix=""):
    """{flag: (value, where)} from nested tables; a key that is not a flag must be a table of flags."""
    out = {}
    for key, value in table.items():
        where = prefix + str(key)
        name = str(key).replace("-", "_")
        if name in actions and not isinstance(value, dict):  # a table may share a flag's name ([task] task = ...)
            found = {actions[name].dest: (value, where)}  # an alias counts as its flag
        elif name == "criterion" and "loss" in actions and isinstance(value, list):
            # [[criterion]] tables (type = NAME, weight = W) spell the --loss list the way other trainers do
            found = {"loss": (loss_specs_from_tables(value, f"'{where}' in {path}"), where)}
        elif isinstance(value, dict):
            found = flatten(value, actions, path, where + ".")
        else:
            raise UserError(unknown_key(name, actions, path, where))
        for name, item in found.items():
            if name in out:
                raise UserError(f"key '{name}' appears twice in {path} (as '{out[name][1]}' and '{item[1]}'); "
                                f"expected each flag once")
            out[name] = item
    return out


def unknown_key(key, actions, source, where=None):
    if key in META:
        return f"'{key}' cannot be set in {source}; give it on the command line"
    hint = suggest(key, actions, SYNONYMS) or "see --help for the flag names"
    return f"unknown key '{where or key}' in {source}; {hint}"


def convert(action, value, name, from_text=False):
    """A file or --set value, converted and checked as argparse would treat the same flag."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if from_text:
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
                value.strip().lower(), value)
        if not isinstance(value, bool):
            raise UserError(f"{name}: {value!r} is not a boolean; expected true or false")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    if many:
        if from_text:
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            value = [value] if isinstance(action, argparse._AppendAction) else value
        if not isinstance(value, list):
            raise UserError(f"{name}: {value!r} is not a list; expected a list such as [1, 2]")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise UserError(f"{name}: {value!r} has {len(value)} values; expected {action.nargs}")
        if action.nargs == "+" and not value:
            raise UserError(f"{name}: the list is empty; expected at least one value")
        return [convert_one(action, v, name) for v in value]
    if value is None:
        return None
    return convert_one(action, value, name)


def convert_one(action, value, name):
    if isinstance(value, (bool, list, dict)):
        raise UserError(f"{name}: {value!r} is not a single {getattr(action.type, '__name__', 'string')}")
    try:
        out = action.type(str(value)) if action.type else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{name}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from e
    if action.choices is not None and out not in action.choices:
        raise UserError(f"{name}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def loss_specs_from_tables(tables, where):
    """A config file's `[[criterion]]` list, [{"type": "dice", "weight": 0.5}, ...], as --loss specs ["dice:0.5"].

    `where` names the key and file for error messages, e.g. "'criterion' in my_run.toml".
    """
    expected = "expected [[criterion]] tables with type = NAME and optionally weight = NUMBER"
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{where}: {tables!r} is not a list of tables; {expected}")
    specs = []
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict) or set(table) - {"type", "weight"}:
            raise UserError(f"{where}, entry {i}: {table!r} has other keys than type and weight; {expected}")
        name, weight = table.get("type"), table.get("weight", 1.0)
        if not isinstance(name, str) or not name or ":" in name:
            raise UserError(f"{where}, entry {i}: type {name!r} is not a loss name; {expected}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"{where}, entry {i}: weight {weight!r} is not a number; {expected}")
        specs.append(f"{name}:{float(weight)!r}")
    return specs


def to_toml(args, parser):
    """The resolved flags as TOML, one table per --help group; unset (None) flags and the groups of the tasks this
    run does not do (a group tagged with `.task`) are left out."""
    tables = {}
    for group in parser._action_groups:
        if getattr(group, "task", None) not in (None, getattr(args, "task", None)):
            continue  # another task's own flags: they do nothing in this run
        table = {}
        for action in group._group_actions:
            value = getattr(args, action.dest, None)
            if action.option_strings and action.dest not in NOT_SAVED and value is not None:
                table[action.dest] = list(value) if isinstance(value, tuple) else value
        if table:
            tables[group.title] = table
    return tomli_w.dumps(tables)


def write_config(config_text, path):
    """Save a resolved configuration (from to_toml) as a file that train.py --config can read back."""
    write_atomic(path, f"# resolved configuration; re-run with: python train.py --config {path}\n" + config_text)
