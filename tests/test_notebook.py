"""The quickstart notebook runs top to bottom, at tiny sizes, on the CPU.

Its code cells are executed in order in one namespace, in this process: no Jupyter kernel
is needed, and the fake CPU devices of conftest.py make its mesh code shard over several
devices. The notebook reads PAGJAX_NOTEBOOK_SMALL to shrink its sizes.
"""
from __future__ import annotations

import json
import math
import os

import jax
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def _code_cells(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    cells = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown", "raw")
        if cell["cell_type"] == "code":
            # committed without outputs, so diffs stay readable and nothing stale is shown
            assert cell["outputs"] == [] and cell["execution_count"] is None
            cells.append("".join(cell["source"]))
    return cells


def test_notebook_is_plain_python():
    """Cells run under `exec` here, so they may not use IPython's ! and % syntax."""
    for i, src in enumerate(_code_cells(NOTEBOOK)):
        for line in src.splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"cell {i}: {line}"
        compile(src, f"quickstart.ipynb code cell {i}", "exec")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setenv("PAGJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    namespace = {"__name__": "__main__"}
    try:
        for i, src in enumerate(_code_cells(NOTEBOOK)):
            exec(compile(src, f"quickstart.ipynb code cell {i}", "exec"), namespace)
    finally:
        plt.close("all")

    assert namespace["SMALL"]
    # every device of the runtime is used: the mesh spans them and the test batch is split
    assert namespace["mesh"].size == jax.device_count() > 1
    assert len(namespace["xs"].sharding.device_set) == jax.device_count()
    results = namespace["results"]
    assert len(results) == 2
    for name, row in results.items():
        assert set(row) >= {"accuracy", "on_change", "off_change", "on_manifold_fraction",
                            "cosine_exact_bayes", "ssim_exact_bayes", "cosine_learned_bayes"}, name
        assert all(math.isfinite(v) for v in row.values()), (name, row)
        assert 0.0 <= row["accuracy"] <= 1.0
        assert -1.0 <= row["cosine_exact_bayes"] <= 1.0 and -1.0 <= row["cosine_learned_bayes"] <= 1.0



def test_install_cell_refuses_a_missing_source_instead_of_asking_an_index(monkeypatch, tmp_path):
    import importlib.util
    import subprocess

    install_cell = _code_cells(NOTEBOOK)[0]
    assert "pip" in install_cell
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as if not installed
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    monkeypatch.setenv("PAGJAX_SOURCE", str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="pyproject.toml"):
        exec(compile(install_cell, "quickstart.ipynb code cell 0", "exec"), {"__name__": "__main__"})
