"""Multi-process start-up: `jax.distributed.initialize` from the config, the ZOO_* variables
or the cluster launcher JAX detects itself (SLURM, Open MPI, a TPU pod)."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from zoo import errors

log = logging.getLogger("zoo.train")


def cluster_environment() -> str | None:
  """The multi-process launcher `jax.distributed.initialize()` detects by itself (SLURM with
  several tasks, Open MPI's mpirun, a TPU pod), or None for a single process."""
  env = os.environ

  def count(name: str) -> int:
    value = env.get(name, "")
    return int(value) if value.isdigit() else 1

  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                            "SLURM_LOCALID")) and count("SLURM_NTASKS") > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  hosts = env.get("TPU_PROCESS_ADDRESSES", "") or env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU pod"
  return None


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize from config.distributed, the ZOO_* variables, or (no
  arguments: JAX's own detection) under SLURM / Open MPI / a TPU pod; coordinator "auto"
  forces the latter. Call before anything touches a JAX backend."""
  dist = config.get("distributed", None) or {}
  coordinator = dist.get("coordinator_address", "") or os.environ.get("ZOO_COORDINATOR_ADDRESS",
                                                                      "")
  launcher = cluster_environment() if coordinator in ("", "auto") else None
  if coordinator == "" and launcher is None:
    return  # a single process
  kwargs = {}
  if coordinator not in ("", "auto"):
    num = int(dist.get("num_processes", 0) or os.environ.get("ZOO_NUM_PROCESSES", 0) or 0)
    pid = int(dist.get("process_id", -1))
    if pid < 0:
      pid = int(os.environ.get("ZOO_PROCESS_ID", -1) or -1)
    if num < 1 or not 0 <= pid < num:
      raise errors.UserError(f"multi-process run with coordinator {coordinator}: set "
                          "distributed.num_processes (ZOO_NUM_PROCESSES) >= 1 and "
                          "distributed.process_id (ZOO_PROCESS_ID) in [0, num_processes); got "
                          f"num_processes={num}, process_id={pid}")
    kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
  else:
    log.info("multi-process run (%s): jax.distributed.initialize() reads the cluster's settings",
             launcher or "coordinator_address=auto")
  # Set before the CPU backend exists (a no-op for accelerators): CPU collectives across
  # processes go through gloo. Nothing here may initialize a backend (jax.default_backend()
  # would, and jax.distributed.initialize must come first).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
