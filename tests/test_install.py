"""The install: the wheel's only top-level import name is `zoo` (the repository's kernels/
folder installs as `zoo.kernels`), every package is listed, and Hugging Face's `kernels`
package (which transformers >= 5.25 needs) lives beside zoo, even run from the repository."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import tomllib

from tests import cli_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_packages_listed_and_only_zoo_at_the_top():
  tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(tool["packages"])
  on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "zoo").rglob("*.py")}
  assert on_disk - listed == set(), f"packages missing from pyproject's list: {on_disk - listed}"
  assert {p.split(".")[0] for p in listed} == {"zoo"}
  assert (ROOT / "zoo" / "kernels").is_symlink() and (ROOT / "zoo" / "kernels").resolve() == (
      ROOT / "kernels")
  assert not (ROOT / "kernels" / "__init__.py").exists(), (
      "kernels/__init__.py would make the repository's folder shadow Hugging Face's `kernels` "
      "for anything run from the repository root")
  spec = importlib.util.find_spec("zoo.kernels.contrastive")
  assert spec is not None and pathlib.Path(spec.origin).resolve().parent == ROOT / "kernels"


def test_hugging_face_kernels_and_transformers_beside_zoo():
  """From the repository root (where kernels/ is a folder): `import kernels` is Hugging Face's,
  transformers imports, and zoo's loss still computes the reference value."""
  if importlib.util.find_spec("kernels") is None or "site-packages" not in str(
      importlib.util.find_spec("kernels").origin or ""):
    # transformers >= 5.25 requires it, so both CI runs have it ([dev] and the 3.12 venv); an
    # environment with an older transformers has nothing that could clash.
    pytest.skip("Hugging Face's kernels package is not installed (it comes with transformers "
                ">= 5.25)")
  code = (
      "import pathlib, kernels, transformers\n"
      "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
      "assert hasattr(kernels, 'get_kernel'), dir(kernels)\n"
      "import numpy as np, jax.numpy as jnp\n"
      "from zoo.kernels.contrastive import contrastive_loss, reference_loss\n"
      "x = jnp.asarray(np.random.RandomState(0).randn(16, 8), jnp.float32)\n"
      "y = jnp.asarray(np.random.RandomState(1).randn(16, 8), jnp.float32)\n"
      "a, b = contrastive_loss(x, y, 10.0, impl='xla'), reference_loss(x, y, 10.0)\n"
      "assert abs(float(a) - float(b)) < 1e-5, (a, b)\n"
      "print(transformers.__version__, kernels.__file__)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_run.env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
