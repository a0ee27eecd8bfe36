"""Name -> builder lookup, used for models (and later datasets and losses).

A registry is a plain dict with a decorator in front of it, so a stack trace through it stays readable.
"""
import difflib

from utils import UserError


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._builders = {}

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

    def get(self, name):
        if name not in self._builders:
            close = difflib.get_close_matches(name, self._builders, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UserError(f"unknown {self.kind} '{name}'{hint} known: {', '.join(self.names())}")
        return self._builders[name]

    def names(self):
        return sorted(self._builders)

    def __contains__(self, name):
        return name in self._builders
