"""The train loop's `config.loss.impl` switch: one sharded train step with the fused losses
(xla, pallas) equals the step with the reference loss (loss, gradient norm), for CLIP's softmax
and SigLIP's sigmoid head, on a (data=2, fsdp=4) mesh, with and without gradient accumulation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.train_utils import synthetic_batches, tiny_config
from zoo.models import sharding
from zoo.train import trainer as trainer_lib


def _step_metrics(impl: str, accum: int, bias: float | None) -> dict:
  overrides = {"loss.impl": impl, "grad_accum": accum}
  if bias is not None:
    overrides["model_overrides"] = {"init_logit_bias": bias}
  config = tiny_config(**overrides)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  trainer = trainer_lib.build_trainer(config, mesh)
  batch = sharding.host_to_global(synthetic_batches(1, config.batch_size)[0], mesh)
  _, metrics = trainer.step_fn(trainer.state, batch)
  return {k: float(metrics[k]) for k in ("loss", "grad_norm")}


@pytest.mark.slow
@pytest.mark.parametrize("bias", [None, -10.0], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_loss_impls_agree(accum, bias):
  want = _step_metrics("reference", accum, bias)
  for impl in ("xla", "pallas"):
    got = _step_metrics(impl, accum, bias)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=f"{impl} {key}")
