"""Name -> builder lookup, used for models (and later datasets and losses).

A registry is a plain dict with a decorator in front of it, so a stack trace through it stays readable.
"""
import difflib
import importlib
import importlib.util
import inspect
import os
import sys

from utils import UserError


def suggest(name, candidates, synonyms=None):
    """' did you mean ...?' for a mistyped name: a known synonym, the same name without underscores, or close ones."""
    candidates = list(candidates)
    squash = name.replace("_", "").lower()
    close = ([synonyms[name]] if synonyms and synonyms.get(name) in candidates else
             [c for c in candidates if c.replace("_", "").lower() == squash] or
             difflib.get_close_matches(name, candidates, n=3, cutoff=0.6))
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._builders = {}
        self._from_kwargs = set()

    def register(self, name, *aliases):
        """Decorator: make the decorated function or class available under `name` (and its aliases)."""
        def add(builder):
            for key in (name, *aliases):
                if key in self._builders:
                    raise UserError(f"{self.kind} name '{key}' is registered twice "
                                    f"({self._builders[key].__module__} and {builder.__module__})")
                self._builders[key] = builder
            return builder
        return add

    def register_module(self, name=None):
        """Class decorator in seed 001's style: `@MODELS.register_module()` registers the class under its own name
        (or `name`); it is built with the keyword arguments a config gives it (see `build`)."""
        def add(cls):
            key = name or cls.__name__
            self.register(key)(cls)
            self._from_kwargs.add(key)
            return cls
        return add

    def takes_kwargs(self, name):
        """Whether `name` was registered with register_module (built from keyword arguments, not from the flags)."""
        return name in self._from_kwargs

    def build(self, name, kwargs, where):
        """The component `name` built with `kwargs`; `where` names the flag or key that gave them."""
        cls = self.get(name)
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as e:
            raise UserError(f"{where}: {self.kind} {name} does not take {kwargs!r} ({e}); expected the keyword "
                            f"arguments of {name}.__init__") from None
        return cls(**kwargs)

    def get(self, name):
        if name not in self._builders:
            hint = suggest(name, self._builders)
            raise UserError(f"unknown {self.kind} '{name}'; {hint + ' ' if hint else ''}known: {', '.join(self.names())}")
        return self._builders[name]

    def names(self):
        return sorted(self._builders)

    def __contains__(self, name):
        return name in self._builders


def check_no_kwargs(kwargs, where, what, allowed=()):
    """A built-in component is configured by flags; keyword arguments are for registered classes only."""
    extra = sorted(set(kwargs or {}) - set(allowed))
    if extra:
        raise UserError(f"{where}: {what} is built in and configured by flags, so {', '.join(extra)} is not read; "
                        f"expected no such arguments, or a class registered with register_module()")


_imported = {}  # the plugins imported so far, in order: absolute path of a .py file, or a module name


def imported_plugins():
    """The plugins this process has imported, as specs that import_plugins() accepts from any folder."""
    return list(_imported)


def import_plugins(specs):
    """Import each --plugin (a .py file or a module name) once, so that its decorators register their names."""
    for spec in specs or []:
        key = os.path.abspath(spec) if spec.endswith(".py") else spec
        if key in _imported:
            continue
        try:
            if spec.endswith(".py"):
                if not os.path.isfile(spec):
                    raise UserError(f"--plugin {spec}: no such file; expected a .py file or an importable module name")
                name = "ailab_plugin_" + os.path.splitext(os.path.basename(spec))[0]
                module_spec = importlib.util.spec_from_file_location(name, spec)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except UserError:
            raise
        except Exception as e:  # whatever the plugin raised, the user needs its name and the reason
            raise UserError(f"--plugin {spec} failed to import: {type(e).__name__}: {e}") from e
        _imported[key] = None


def add_plugin_arg(group):
    group.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="import a .py file or module that registers models, datasets or losses (repeatable)")
