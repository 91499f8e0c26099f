"""One process of the two-process test: 4 CPU devices here, 8 in the job (jax.distributed)."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def main(process_id: int, port: int, out_path: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  from tests.train_utils import synthetic_batches, tiny_config
  from zoo import sharding, train_lib

  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
  trainer = train_lib.build_trainer(tiny_config(), mesh)
  losses = []
  for batch in synthetic_batches(5, 16):
    local = {k: v[process_id * 8:(process_id + 1) * 8] for k, v in batch.items()}
    trainer.state, metrics = trainer.step_fn(trainer.state, sharding.host_to_global(local, mesh))
    losses.append(float(metrics["loss"]))
  with open(out_path, "w") as f:
    json.dump(losses, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
