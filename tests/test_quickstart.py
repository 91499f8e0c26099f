"""examples/quickstart.ipynb runs top to bottom on a model exported by a short training run."""

import os

import pytest

from tests.train_utils import tiny_config

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs_on_a_trained_checkpoint(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  from zoo.train import loop

  config = tiny_config()
  config.total_steps = 3
  config.eval_every = 0
  workdir = tmp_path / "run"
  loop.train(config, str(workdir))
  model_dir = workdir / "model"
  assert (model_dir / "zoo_config.json").exists()

  nb = nbformat.read(NOTEBOOK, as_version=4)
  env_cell = nbformat.v4.new_code_cell(
      f"import os\nos.environ['ZOO_MODEL_DIR'] = {str(model_dir)!r}\n"
      "os.environ['JAX_PLATFORMS'] = 'cpu'")
  nb.cells.insert(0, env_cell)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "zero-shot top-1 on 64 held-out images" in outputs
  assert (tmp_path / "quickstart_predictions.png").exists()
  assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))
