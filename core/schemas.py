"""Config files in the formats of the documents the suite was built from, read as flag values.

Three schemas, told apart by their keys (see `detect`):
- flags: the suite's own; keys are flag names and tables only group them (core/config.py).
- 002: the DDP TOML schema (output_dir, task = run name, [ddp], [model], [model.config], [[criterion]],
  [transform], [dataset], [dataset.split], [dataloader], [train.*], [test], [predict], [private], [output]);
  core/schema_toml.py.
- 001: a `cfg` dict (seed, work_dir, dist, model, data, loss, optimizer, hooks, ...), from config.py or the same
  structure in YAML/TOML/JSON such as seed 000's configs/train.yaml; core/schema_cfg.py.
A schema file may also hold flag names anywhere, and they mean what they mean on the command line.
Each translator fills a Mapping: {flag: (value, where)} with `where` the key's dotted path, for error messages.
"""
import ast
import json
import os
import tomllib

import yaml

from core.registry import suggest
from utils import UserError

TASKS = ("classification", "segmentation")


class Mapping:
    """The flags one file sets, each once; `entry` is the script reading it (train, test or infer)."""

    def __init__(self, path, actions, entry):
        self.path, self.actions, self.entry, self.flags = path, actions, entry, {}

    def set(self, flag, value, where):
        """Set a flag; a flag this script does not have is another script's (a schema file serves all three)."""
        if flag not in self.actions:
            return
        flag = self.actions[flag].dest
        if flag in self.flags:
            raise UserError(f"key '{flag}' appears twice in {self.path} (as '{self.flags[flag][1]}' and '{where}'); "
                            f"expected each flag once")
        self.flags[flag] = (value, where)

    def takes_table(self, key):
        action = self.actions.get(str(key))
        return bool(action and getattr(action.type, "table", False))

    def fail(self, where, message):
        raise UserError(f"'{where}' in {self.path}: {message}")

    def flag_key(self, key, value, where):
        """A flag name used inside a schema file."""
        name = str(key).replace("-", "_")
        if name in self.actions and (not isinstance(value, dict) or self.takes_table(name)):
            self.set(name, value, where)
            return True
        return False


def walk(table, mapping=None, prefix=""):
    """(dotted path, value) of every leaf; a list of tables ([[criterion]]) and the table of a flag that takes one
    (--model_kwargs) are leaves."""
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not (mapping and mapping.takes_table(key)):
            yield from walk(value, mapping, path + ".")
        else:
            yield path, value


def detect(table, actions, schema_paths):
    """'002', '001' or 'flags': the schema whose own keys (those that are not flag names) the table uses."""
    found = {}
    for name, paths in schema_paths.items():
        hits = [p for p, _ in walk(table) if known_path(p, paths) and p.split(".")[-1] not in actions]
        if hits:
            found[name] = hits[0]
    if len(found) > 1:
        (a, key_a), (b, key_b) = sorted(found.items())
        raise UserError(f"the keys mix seed {a}'s schema ('{key_a}') and seed {b}'s ('{key_b}'); expected one "
                        f"schema per file (flag names may appear in either)")
    return next(iter(found), "flags")


def known_path(path, paths):
    """Whether a dotted path is one of a schema's keys (a '*' entry takes any key below it)."""
    parts = path.split(".")
    return any(path == p or (p.endswith(".*") and parts[:len(p.split(".")) - 1] == p.split(".")[:-1])
               for p in paths)


def unknown(mapping, where, schema, paths):
    """An unknown key: one line with the closest key of the schema or the closest flag name."""
    leaf = where.split(".")[-1]
    close = suggest(where, paths) or suggest(leaf, mapping.actions)
    raise UserError(f"unknown key '{where}' in {mapping.path} (read as seed {schema}'s schema); "
                    + (close or "expected a key of that schema or a flag name (see --help)"))


def one(mapping, value, where):
    """[0.5] -> 0.5: seed 002 writes single transform arguments as one-element lists."""
    if isinstance(value, list):
        if len(value) != 1:
            mapping.fail(where, f"{value!r} has {len(value)} values; expected one, e.g. [{value[0] if value else 0.5}]")
        return value[0]
    return value


def pick(mapping, value, where, choices, what):
    """A string value from `choices` ({spelling: meaning}), case-insensitive."""
    key = str(value).lower()
    if not isinstance(value, str) or key not in choices:
        mapping.fail(where, f"{value!r} is not a known {what}; expected one of {', '.join(choices)}")
    return choices[key]


def check_task_name(mapping, value, where, what):
    if value not in TASKS:
        mapping.fail(where, f"{value!r} is not a {what}; expected one of {', '.join(TASKS)}")
    return value


def relative_file(mapping, value, where):
    """A file named in a config, relative to the config's folder."""
    path = value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(mapping.path)), value)
    if not os.path.isfile(path):
        mapping.fail(where, f"{value} does not exist (looked at {path}); expected a file next to the config or a "
                            f"path from it")
    return path


def read_config(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist; expected a .toml, .yaml/.yml, .json or .py file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        return read_python_config(path)
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
            raise UserError(f"config file {path}: unknown extension '{ext}'; expected .toml, .yaml, .yml, .json or .py")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} could not be parsed: {' '.join(str(e).split())}") from e
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise UserError(f"config file {path}: expected a table of flag names at the top, found {type(table).__name__}")
    return table


def loss_specs_from_tables(tables, where):
    """A config file's `[[criterion]]` list, [{"type": "dice", "weight": 0.5}, ...], as --loss specs ["dice:0.5"].

    `where` names the key and file for error messages, e.g. "'criterion' in my_run.toml".
    """
    expected = "expected [[criterion]] tables with type = NAME and optionally weight = NUMBER and config = {...}"
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{where}: {tables!r} is not a list of tables; {expected}")
    specs = []
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict) or set(table) - {"type", "weight"}:
            raise UserError(f"{where}, entry {i}: {table!r} has other keys than type, weight and config; {expected}")
        name, weight = table.get("type"), table.get("weight", 1.0)
        if not isinstance(name, str) or not name or ":" in name:
            raise UserError(f"{where}, entry {i}: type {name!r} is not a loss name; {expected}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"{where}, entry {i}: weight {weight!r} is not a number; {expected}")
        specs.append(f"{name}:{float(weight)!r}")
    return specs


# ----------------------------------------------------------------------------------------------
# A Python config (seed 001): read, not run
# ----------------------------------------------------------------------------------------------

_NUMBER_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Pow: lambda a, b: a ** b,
               ast.Mod: lambda a, b: a % b}


def read_python_config(path):
    """The `cfg` dict of a config.py, evaluated without running the file.

    Assignments of literals, dict(...)/list(...)/tuple(...), names assigned above and arithmetic on numbers are
    read; anything else (an import, a function call, an attribute) is refused with its line, so a config can
    neither run code nor depend on what happens to be installed.
    """
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
    except (SyntaxError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} could not be parsed: {' '.join(str(e).split())}") from e
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None):
            raise UserError(f"config file {path}, line {node.lineno}: a {type(node).__name__} statement; expected "
                            f"only assignments such as cfg = dict(...) (the file is read, not run)")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        value = literal(node.value, names, path)
        for target in targets:
            if not isinstance(target, ast.Name):
                raise UserError(f"config file {path}, line {node.lineno}: expected a plain name to assign to")
            names[target.id] = value
    if not isinstance(names.get("cfg"), dict):
        raise UserError(f"config file {path} assigns no cfg dict; expected cfg = dict(...) as in seed 001")
    return names["cfg"]


def literal(node, names, path):
    def bad(what):
        raise UserError(f"config file {path}, line {node.lineno}: {what} cannot be read; expected literals, "
                        f"dict(...), list(...), tuple(...), names assigned above and arithmetic on numbers")

    def sub(n):
        return literal(n, names, path)

    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [sub(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            bad("a ** expansion")
        return {sub(k): sub(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        if node.id not in names:
            bad(f"the name {node.id!r} (not assigned above)")
        return names[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("dict", "list", "tuple"):
        if node.func.id == "dict":
            if node.args or any(k.arg is None for k in node.keywords):
                bad("dict() with positional or ** arguments")
            return {k.arg: sub(k.value) for k in node.keywords}
        if node.keywords or len(node.args) > 1:
            bad(f"{node.func.id}() with more than one argument")
        return list(sub(node.args[0])) if node.args else []
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = sub(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _NUMBER_OPS:
        a, b = sub(node.left), sub(node.right)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            return _NUMBER_OPS[type(node.op)](a, b)
    bad(f"a {type(node).__name__} expression")
