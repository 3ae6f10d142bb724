"""The Colab notebooks run top to bottom on the tiny configuration (8 simulated CPU devices).

Each notebook has a cell tagged `parameters`; like papermill, the test inserts a cell after it
that sets TINY = True (and a scratch WORKDIR), then executes every cell with nbclient and fails
on the first error. The notebooks are stored with outputs cleared.
"""
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))


def test_notebooks_exist_and_are_stored_without_outputs():
  assert {"quickstart.ipynb", "sharding.ipynb", "fashion_retrieval.ipynb"} <= set(NOTEBOOKS)
  for name in NOTEBOOKS:
    nb = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name}: clear the outputs before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "TINY = False" in tagged[0].source, f"{name}: needs one `parameters` cell"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_on_the_tiny_configuration(name, tmp_path):
  nb = nbformat.read(COLAB / name, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"TINY = True\nWORKDIR = {str(tmp_path / 'work')!r}"))
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
