"""The library's shape (docs/internals.md, "Zones"): few modules at the top, functions that fit a screen,
imports that point one way with no cycle (function-level imports count), and an `import fused_concept`
that loads torch only: never Triton, transformers, spaCy, peft, gensim or matplotlib."""
import ast
import glob
import os
import subprocess
import sys

import fused_concept

PACKAGE = os.path.dirname(os.path.abspath(fused_concept.__file__))
ROOT = os.path.dirname(PACKAGE)
KERNELS = os.path.join(ROOT, "kernels")
APPLICATION = "fused_concept.training"
# zones, innermost first: a module may import its own zone and the zones before it
ZONES = ("fused_concept.kernels", "fused_concept.core", "fused_concept.backends", "fused_concept.head",
         "fused_concept.parallel", "fused_concept.loss", "fused_concept.fused_head", "fused_concept.integrations")


def _library_sources():
    found = {}
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    for path in glob.glob(os.path.join(KERNELS, "*.py")):
        name = os.path.basename(path)[:-3]
        found["fused_concept.kernels" + ("" if name == "__init__" else "." + name)] = path
    return {name: path for name, path in found.items() if not name.startswith(APPLICATION)}


def _imports(name, path, modules):
    """The fused_concept modules `name` imports anywhere in its body: `from x import y` counts as
    importing the submodule x.y when there is one, else x."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            subs = {f"{target}.{alias.name}" for alias in node.names} & set(modules)
            found.update(subs if len(subs) == len(node.names) else subs | {target})
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph():
    modules = _library_sources()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _zone(name):
    return next((i for i, z in enumerate(ZONES) if name == z or name.startswith(z + ".")), None)


def test_at_most_twelve_modules_at_the_top():
    top = [p for p in os.listdir(PACKAGE) if p.endswith(".py")]
    assert len(top) <= 12, top


def test_every_function_fits_80_lines():
    """Library, kernels and the training application alike, docstrings and decorators included."""
    long = []
    application = glob.glob(os.path.join(PACKAGE, "training", "**", "*.py"), recursive=True)
    for path in list(_library_sources().values()) + application:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.name} ({node.end_lineno - start + 1} lines)")
    assert not long, long


def test_library_imports_have_no_cycle():
    graph = _graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(state) > 30  # the walk saw the package


def test_layers_point_one_way_and_the_library_never_imports_the_application():
    graph = _graph()
    entry = {"fused_concept", "fused_concept.__main__"}  # the public front and the command-line entry
    backwards = [(name, dep) for name, deps in graph.items() for dep in deps
                 if name not in entry and _zone(name) is not None and _zone(dep) is not None
                 and _zone(dep) > _zone(name)]
    assert not backwards, backwards
    # backends share only products.py: neither imports the other
    assert "fused_concept.backends.torch_chunked" not in graph["fused_concept.backends.triton_path"]
    assert "fused_concept.backends.triton_path" not in graph["fused_concept.backends.torch_chunked"]
    # the application is imported nowhere in the library (the front's lazy attribute is a string)
    for name, path in _library_sources().items():
        if name != "fused_concept.__main__":
            assert APPLICATION not in {m for m in _imports(name, path, {APPLICATION}) if m}, name
    assert any(m == ZONES[1] or m.startswith(ZONES[1] + ".") for m in graph["fused_concept.loss"])  # the walk works


def test_import_loads_torch_only():
    heavy = ["triton", "transformers", "spacy", "peft", "gensim", "matplotlib", "fused_concept.training",
             "fused_concept.integrations", "torch.distributed.tensor"]
    code = ("import sys, fused_concept; print(','.join(m for m in %r if m in sys.modules))" % heavy)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         check=True).stdout.strip()
    assert out == "", f"import fused_concept loaded: {out}"
