"""The shape of the code: the top level holds only the entry points and utils.py, imports flow one way (no cycles,
imports inside functions included), and no entry point or engine module branches on the task's name."""
import ast
import glob
import os

from conftest import ROOT

PACKAGES = ("ailab", "core", "data", "engine", "evaluation", "models", "tasks")
# Lower layers never import higher ones; a package may import its own modules and any lower layer.
LAYERS = {"utils": 0, "core": 1, "data": 2, "models": 2, "engine": 2, "evaluation": 3, "tasks": 4, "ailab": 5}


def modules():
    """{dotted module name: path} of the project's own code (not tests, tools or benchmarks)."""
    found = {}
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")):
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        if rel.split(".")[0] in PACKAGES or "." not in rel:
            found[rel.removesuffix(".__init__")] = path
    return found


def imports(path, known):
    """The project modules that `path` imports anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from pkg import module` imports that module; `from module import name` the module
                target = f"{node.module}.{a.name}"
                out.add(target if target in known else node.module)
    return {m for m in out if m in known}


def test_the_top_level_holds_only_the_entry_points_and_utils():
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    assert top == ["infer.py", "main.py", "test.py", "train.py", "utils.py"]  # main.py: seed 002's --task step


def test_there_are_no_import_cycles():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle.extend(stack[stack.index(n):] + [n])
                return True
            if n not in state and visit(n, stack + [n]):
                return True
        state[m] = "done"
        return False

    for m in sorted(graph):
        if m not in state and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def test_imports_flow_down_the_layers():
    known = modules()
    upward = []
    for m, path in known.items():
        layer = LAYERS.get(m.split(".")[0])
        if layer is None:  # an entry point may import anything
            continue
        for n in imports(path, known):
            if LAYERS.get(n.split(".")[0], 99) > layer:
                upward.append(f"{m} imports {n}")
    assert not upward, upward


def test_nothing_shared_branches_on_the_task_name():
    shared = ["train.py", "test.py", "infer.py"] + glob.glob(os.path.join(ROOT, "engine", "*.py")) + \
        glob.glob(os.path.join(ROOT, "evaluation", "*.py"))
    for path in shared:
        text = open(os.path.join(ROOT, path)).read()
        for needle in ('== "classification"', '== "segmentation"', "task ==", ".task =="):
            assert needle not in text, f"{path} branches on the task: {needle}"
