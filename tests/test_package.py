"""The package as users meet it: import spellings, docstrings, declared dependencies, docs links."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import types

import pytest

import pagjax

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# --------------------------------------------------------------------------- import spellings

# Each spelling runs in a fresh interpreter: in this test process `pagjax.grad_align` has
# long been imported, which would hide a bug that depends on import order.
_CHECK = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    import numpy as np
    import pagjax.alignment

    assert callable(fn)
    assert fn is pagjax.grad_align is sys.modules["pagjax.grad_align"]
    apply = lambda w, v: v.reshape(v.shape[0], -1) @ w
    w = jnp.linspace(-1.0, 1.0, 16 * 3).reshape(16, 3)
    x = jnp.linspace(0.0, 1.0, 2 * 16).reshape(2, 4, 4, 1)
    y = jnp.array([0, 2], jnp.int32)
    score = jnp.cos(7.0 * x)
    got = fn(apply, w, x, y, score=score)
    want = pagjax.alignment.grad_align(apply, w, x, y, score=score)
    assert isinstance(got, pagjax.AlignmentResult)
    np.testing.assert_array_equal(got.per_example["cosine"], want.per_example["cosine"])
    # the other spelling, afterwards, gives the same object
    from pagjax import grad_align as other
    import pagjax.grad_align
    assert other is fn is pagjax.grad_align
    print("ok")
""")

SPELLINGS = {
    "import pagjax.grad_align": "import pagjax.grad_align\nfn = pagjax.grad_align\n",
    "from pagjax import grad_align": "from pagjax import grad_align\nfn = grad_align\nimport pagjax\n",
}


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_each_import_spelling_calls_grad_align_in_a_fresh_interpreter(spelling):
    code = 'import sys\nassert "pagjax" not in sys.modules\n' + SPELLINGS[spelling] + _CHECK
    proc = _run_fresh(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_grad_align_module_exposes_the_function_and_its_signature():
    import pagjax.alignment
    import pagjax.grad_align as module

    assert isinstance(module, types.ModuleType) and callable(module)
    assert module.grad_align is pagjax.alignment.grad_align
    assert module.AlignmentResult is pagjax.alignment.AlignmentResult
    assert inspect.signature(module) == inspect.signature(pagjax.alignment.grad_align)
    assert module.__doc__ == pagjax.alignment.grad_align.__doc__


# --------------------------------------------------------------------------- docstrings

# Exported functions owned by the training-engine rewrite (pagjax/training.py) and the
# objectives work (pagjax/objectives.py); their Args/Returns sections land with that work.
PENDING_DOCSTRINGS: set[str] = set()


def _exported_functions():
    return [name for name in pagjax.__all__
            if inspect.isfunction(getattr(pagjax, name)) or isinstance(getattr(pagjax, name), types.ModuleType)]


def test_every_exported_name_exists_and_the_functions_are_found():
    for name in pagjax.__all__:
        assert hasattr(pagjax, name), name
    assert {"grad_align", "train", "build_model", "input_gradients"} <= set(_exported_functions())
    assert PENDING_DOCSTRINGS <= set(_exported_functions())


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason="docstring owned by work in progress", strict=False))
    if n in PENDING_DOCSTRINGS else n
    for n in _exported_functions()
])
def test_exported_function_docstring_has_args_and_returns(name):
    doc = inspect.getdoc(getattr(pagjax, name)) or ""
    assert re.search(r"^Args:$", doc, re.M), f"{name}: no 'Args:' section"
    assert re.search(r"^Returns:$", doc, re.M), f"{name}: no 'Returns:' section"


def test_exported_classes_are_documented():
    for name in pagjax.__all__:
        obj = getattr(pagjax, name)
        if inspect.isclass(obj):
            assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"


def test_help_lists_every_export_and_where_to_start():
    doc = pagjax.__doc__
    for name in pagjax.__all__:
        assert re.search(rf"`{name}`", doc), f"pagjax's docstring does not mention {name}"
    for start in ("notebooks/quickstart.ipynb", "docs/theory.md", "docs/design.md"):
        assert start in doc
        assert os.path.exists(os.path.join(ROOT, start)), start


# --------------------------------------------------------------------------- dependencies


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _constraints() -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    return pins


def test_dependencies_are_ranges_and_constraints_pin_each_tested_version():
    project = _pyproject()["project"]
    pins = _constraints()
    declared = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    for req in declared:
        assert "==" not in req, f"{req}: declare a range; exact versions belong in constraints.txt"
        match = re.search(r">=\s*([\w.]+)", req)
        assert match, f"{req}: needs a lower bound (the version tested)"
        name = _name(req)
        assert name in pins, f"constraints.txt does not pin {name}"
        assert pins[name] == match.group(1), f"{name}: tested {pins[name]}, lower bound {match.group(1)}"
    # torch is an optional comparison, never something the library needs
    assert "torch" not in {_name(r) for r in project["dependencies"]}
    assert "torch" in {_name(r) for r in project["optional-dependencies"]["bench"]}


def test_ci_installs_with_the_constraints_and_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    setup, test = block[0], block[1]
    assert "-c constraints.txt" in setup and "-c constraints.txt" in ci
    test_cmd = test.split("&&")[-1].strip()
    assert test_cmd in ci.splitlines()


# --------------------------------------------------------------------------- docs


def _text_files():
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "results"}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        for f in files:
            if f.endswith((".py", ".md", ".toml", ".ipynb", ".txt", ".cfg")) or f == "run":
                yield os.path.join(folder, f)


def test_no_reference_to_documents_outside_the_repository():
    missing = ["PAPER" + ".md", "DESIGN" + ".md"]  # split so this file does not match itself
    hits = [f"{os.path.relpath(p, ROOT)}: {m}" for p in _text_files()
            for m in missing if m in open(p, encoding="utf-8", errors="replace").read()]
    assert not hits, hits


def test_docs_links_point_at_existing_files_and_sections():
    """Every `docs/<file>.md §N` reference names a file that has a section N."""
    headings = {}
    for doc in ("theory.md", "design.md"):
        text = open(os.path.join(ROOT, "docs", doc), encoding="utf-8").read()
        headings[doc] = {int(n) for n in re.findall(r"^## (\d+)\.", text, re.M)}
    refs = []
    for p in _text_files():
        for doc, sections in re.findall(r"docs/(theory|design)\.md ((?:§\d+(?:-\d+)?(?:, )?)+)",
                                        open(p, encoding="utf-8", errors="replace").read()):
            for a, b in re.findall(r"§(\d+)(?:-(\d+))?", sections):
                refs += [(p, f"{doc}.md", n) for n in range(int(a), int(b or a) + 1)]
    assert refs
    bad = [f"{os.path.relpath(p, ROOT)} -> {doc} §{n}" for p, doc, n in refs if n not in headings[doc]]
    assert not bad, bad
