"""The Colab notebooks in ``colab/``: committed without outputs, and each runs end to end.

Each notebook is executed with nbclient in smoke mode (``RETRIEVAL_JAX_NOTEBOOK_SMOKE=1``: the
parameters cell switches to tiny sizes) by a kernel on this interpreter, declared in a temporary
kernelspec directory (``JUPYTER_PATH``), so neither a kernel installed elsewhere nor the user's
home is involved. The kernels inherit this process's environment: the forced CPU devices of
``XLA_FLAGS`` (conftest) and ``JAX_PLATFORMS``. Each runs in a temporary directory, where the
notebooks write their ``runs/``; the three run at the same time.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
import time
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("quickstart", "train_remap", "evaluate_revisited")
KERNEL = "retrieval-jax-test"
SMOKE_ENV = "RETRIEVAL_JAX_NOTEBOOK_SMOKE"


def _read(name: str):
  return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def _kernelspec(root: pathlib.Path) -> pathlib.Path:
  """A kernelspec for this interpreter under ``root``; returns the ``JUPYTER_PATH`` entry."""
  spec = root / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "retrieval_jax tests", "language": "python"}))
  return root / "jupyter"


async def _execute(name: str, workdir: pathlib.Path) -> dict[str, Any]:
  nb = _read(name)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                                   resources={"metadata": {"path": str(workdir)}})
  start = time.perf_counter()
  try:
    await client.async_execute()
    error = None
  except Exception as err:  # noqa: BLE001 (reported by the notebook's own test)
    error = err
  return {"nb": nb, "error": error, "seconds": time.perf_counter() - start, "workdir": workdir}


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, dict[str, Any]]:
  """Every notebook executed once in smoke mode, the three kernels at the same time (most of
  their time is single-threaded XLA compilation, so they share the cores well): per name, the
  executed notebook, the error (None) and the seconds it took."""
  root = tmp_path_factory.mktemp("notebooks")
  with pytest.MonkeyPatch.context() as env:
    env.setenv("JUPYTER_PATH", str(_kernelspec(root)))
    # Connection files and IPython's profile (history) stay out of the home directory too.
    env.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    env.setenv("IPYTHONDIR", str(root / "ipython"))
    env.setenv(SMOKE_ENV, "1")
    # Figures as PNG outputs, whatever backend the calling environment chose.
    env.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    dirs = {name: root / name for name in NOTEBOOKS}
    for d in dirs.values():
      d.mkdir()

    async def run_all():
      return await asyncio.gather(*(_execute(name, dirs[name]) for name in NOTEBOOKS))

    start = time.perf_counter()
    results = dict(zip(NOTEBOOKS, asyncio.run(run_all())))
  print(f"\nnotebooks (concurrently): {time.perf_counter() - start:.1f} s; " + ", ".join(
      f"{name} {r['seconds']:.1f} s" for name, r in results.items()))
  return results


def _outputs(nb, kind: str) -> list:
  return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
          if out.output_type in kind.split("|")]


def _text(nb) -> str:
  parts = []
  for out in _outputs(nb, "stream|execute_result|display_data"):
    parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
  return "".join(parts)


def _has_image(nb) -> bool:
  return any("image/png" in out.get("data", {})
             for out in _outputs(nb, "execute_result|display_data"))


# ------------------------------------------------------------------------------ static checks


def test_the_notebooks_exist():
  assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_with_a_guarded_install_cell(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  # The first code cell installs the library on Colab, only where it is not importable.
  first = code[0].source
  assert "%pip install" in first and "except ImportError:" in first
  assert "git+https://github.com/" in first
  # One parameters cell near the top, switched by the smoke variable; no local paths.
  params = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
  assert len(params) == 1 and code.index(params[0]) == 1 and SMOKE_ENV in params[0].source
  source = "\n".join(cell.source for cell in nb.cells)
  for local in ("/work/", "/tmp/", "/home/", "C:\\"):
    assert local not in source
  # The notebooks use the library, they do not redefine it.
  assert "import retrieval_jax" in source or "from retrieval_jax" in source


# ------------------------------------------------------------------------------ execution


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_end_to_end_in_smoke_mode(name, executed):
  result = executed[name]
  if result["error"] is not None:
    raise result["error"]  # nbclient's CellExecutionError names the cell and the traceback
  nb, workdir = result["nb"], result["workdir"]
  assert not _outputs(nb, "error")
  text = _text(nb)
  if name == "quickstart":
    assert _has_image(nb)  # the result grid
    assert "medium mAP of these queries" in text  # the synthetic benchmark (no PHOTO_DIR)
  elif name == "train_remap":
    assert _has_image(nb)  # KL weights and training curve
    assert "validation mAP before" in text and "validation mAP after" in text
    assert (workdir / "runs" / "train_remap" / "remap_init.npz").is_file()
  else:
    assert "synthetic_landmarks/tiny:test" in text and "Medium" in text  # format_table
