"""Config files (TOML, YAML, JSON) and `--set KEY=VALUE` as flag defaults, checked as strictly as the flags.

Precedence: built-in default < --config file < --set < a flag typed on the command line. A resumed run puts
the checkpoint's settings between the built-in defaults and the file (see `saved_settings` in parse_args).
A file's keys are flag names; tables may group them (`[optim] lr = 0.02`) but a key stays unique.
"""
import argparse
import json
import sys

import tomli_w
import yaml

from core import schema_cfg, schema_print, schema_toml
from core.registry import suggest
from core.schemas import Mapping, detect, read_config
from utils import UserError, write_atomic

# Flags that steer the parsing itself, or name this process, and so never come from or go to a file.
META = {"help", "config", "set", "print_config", "local_rank"}
# Resolved, but left out of a saved config so that re-running it starts a new run.
NOT_SAVED = META | {"logdir", "resume", "run_id"}
# Names people bring from other trainers, mapped to ours for the "did you mean" hint.
SYNONYMS = {"learning_rate": "lr", "base_lr": "lr", "batch_size": "batchsize", "num_workers": "workers",
            "num_classes": "numclasses", "n_classes": "numclasses", "max_epochs": "epochs", "depth": "layers",
            "backbone": "layers", "model": "model_type", "arch": "model_type", "data_root": "dataset_path",
            "data_path": "dataset_path", "output_dir": "logdir", "work_dir": "logdir", "log_dir": "logdir",
            "wd": "weight_decay", "crop": "crop_size", "os": "output_stride"}


SCHEMAS = {"002": schema_toml, "001": schema_cfg}


def make_parser(description, entry="train"):
    """An entry script's parser, with the config flags. No abbreviations: one could silently shadow a file key.

    `entry` (train, test or infer) says which keys of a whole-pipeline schema file (core/schemas.py) it takes.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.entry = entry
    add_config_args(parser)
    return parser


def json_table(text):
    """A flag whose value is a table: JSON on the command line, a table in a config file."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; expected e.g. '{{\"width\": 32}}'")
    return value


json_table.table = True  # config files give these flags a table, not text


def add_config_args(parser):
    g = parser.add_argument_group("config")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="TOML, YAML or JSON file whose keys are flag names; flags on the command line win")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override keys as in a config file, e.g. --set lr=0.02 scale_range=[0.5,2]")
    g.add_argument("--print_config", nargs="?", const="flags", default=None, choices=["flags", "002"],
                   help="print the resolved configuration as TOML and exit: as flag names (the default), or in seed "
                        "002's schema (train.py)")


def flag_actions(parser):
    """{name: action} by dest and by every long option spelling, so a file may use a flag's alias too."""
    actions = {}
    for a in parser._actions:
        if a.option_strings and a.dest not in META:
            for name in [a.dest] + [o[2:].replace("-", "_") for o in a.option_strings if o.startswith("--")]:
                actions.setdefault(name, a)
    return actions


def parse_args(parser, argv=None, saved_settings=None, task_defaults=None, cfg=None):
    """argparse with config-file and --set defaults; explicit flags always win.

    Two hooks may add layers of defaults, each given the args parsed so far: `task_defaults(args)` returns the
    chosen task's defaults (they replace the built-in ones), and `saved_settings(args)` a resumed checkpoint's
    settings (they replace both). Files, --set and the command line win over all of them.
    `cfg` is a config given as a dict (ailab.ailab_train); it takes the place of --config.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--set", nargs="+", default=[])
    known, _ = pre.parse_known_args(argv)
    actions = flag_actions(parser)
    values = {}
    if cfg is not None and known.config:
        raise UserError(f"--config {known.config}: this run's configuration is the cfg dict it was started with; "
                        f"expected no --config (flags and --set still apply)")
    source = known.config or ("the cfg dict" if cfg is not None else None)
    file_values = file_flags(source, actions, getattr(parser, "entry", "train"), cfg) if source else {}
    from_file = {}
    for key, (value, where) in file_values.items():
        values[key] = from_file[key] = convert(actions[key], value, f"'{where}' in {source}")
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
    # Where each setting that a file gave (and the command line did not change) came from, for error messages.
    _sources.clear()
    _sources.update({k: f"'{where}' in {source}" for k, (_, where) in file_values.items()
                     if values.get(k) is from_file[k] and getattr(args, k, None) == from_file[k]})
    return args


_sources = {}  # flag -> "'dist.world_size' in configs/train.yaml", from the last parse_args


def given_as(args, flag):
    """'--world_size 3' or, when a config file set it, "'dist.world_size' in configs/train.yaml (--world_size 3)"."""
    text = f"--{flag} {getattr(args, flag)}"
    return f"{_sources[flag]} ({text})" if flag in _sources else text


def file_flags(path, actions, entry, table=None):
    """{flag: (value, where)} of a config file (or of `table`, a cfg dict named `path`) in any of the schemas
    (core/schemas.py)."""
    table = read_config(path) if table is None else table
    mapping = Mapping(path, actions, entry)
    schema = "001" if path.endswith(".py") else detect(table, actions, {k: v.MARKERS for k, v in SCHEMAS.items()})
    if schema == "flags":
        flatten(table, mapping)
    else:
        SCHEMAS[schema].translate(table, mapping)
    return mapping.flags


def flatten(table, mapping, prefix=""):
    """The suite's own schema: keys are flag names; a key that is not a flag must be a table of flags."""
    for key, value in table.items():
        where = prefix + str(key)
        name = str(key).replace("-", "_")
        if mapping.flag_key(name, value, where):  # a table may share a flag's name ([task] task = ...)
            continue
        if name == "criterion" and isinstance(value, list):
            # [[criterion]] tables (type = NAME, weight = W) spell the --loss list the way other trainers do
            schema_toml.read_criterion(mapping, lambda _: (value, where))
        elif isinstance(value, dict):
            flatten(value, mapping, where + ".")
        else:
            raise UserError(unknown_key(name, mapping.actions, mapping.path, where))


def unknown_key(key, actions, source, where=None):
    if key in META:
        return f"'{key}' cannot be set in {source}; give it on the command line"
    hint = suggest(key, actions, SYNONYMS) or "see --help for the flag names"
    for name, schema in SCHEMAS.items():  # a key of a document's schema, used in a file of flag names
        paths = [p for p in schema.KEYS if p.split(".")[-1] == key]
        close = suggest(where or key, [p for p in schema.KEYS if "*" not in p])
        if paths or close:
            hint += (f" ('{key}' is seed {name}'s '{paths[0]}', read as such in a file of that schema)" if paths else
                     f" (or, in seed {name}'s schema, {close.removeprefix('did you mean ')})")
            break
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
    if getattr(action.type, "table", False):
        if not isinstance(value, dict):
            raise UserError(f"{name}: {value!r} is not a table; expected e.g. {{width = 32}}")
        return value
    if isinstance(value, (bool, list, dict)):
        raise UserError(f"{name}: {value!r} is not a single {getattr(action.type, '__name__', 'string')}")
    try:
        out = action.type(str(value)) if action.type else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{name}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from e
    if action.choices is not None and out not in action.choices:
        raise UserError(f"{name}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def resolved_tables(args, parser):
    """{--help group: {flag: value}} of the resolved flags; unset (None) flags and the groups of the tasks this run
    does not do (a group tagged with `.task`) are left out."""
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
    return tables


def to_toml(args, parser):
    """The resolved flags as TOML, one table per --help group."""
    return tomli_w.dumps(resolved_tables(args, parser))


def render(args, parser, form):
    """--print_config: the resolved flags as flag names, or in seed 002's schema (training's flags only)."""
    if form == "002":
        if getattr(parser, "entry", "train") != "train":
            raise UserError("--print_config 002: seed 002's schema describes training; expected --print_config here")
        flags = {k: v for table in resolved_tables(args, parser).values() for k, v in table.items()}
        return tomli_w.dumps(schema_print.from_flags(flags))
    return to_toml(args, parser)


def write_config(config_text, path):
    """Save a resolved configuration (from to_toml) as a file that train.py --config can read back."""
    write_atomic(path, f"# resolved configuration; re-run with: python train.py --config {path}\n" + config_text)
