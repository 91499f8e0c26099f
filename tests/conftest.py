"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere; the `versioned`
marker on the test files whose outcome depends on the JAX / jaxlib / libtpu / Orbax /
transformers versions (CI runs them again in a venv with the newest releases)."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Kernels and their lowering, sharding and the train step, checkpoints and resume, the
# command lines, multi-host, the allocator, the import rules, the install.
VERSIONED_FILES = {
    "test_architecture.py", "test_checkpoint.py", "test_cli_errors.py", "test_cli_run.py",
    "test_commands.py", "test_contrastive.py", "test_contrastive_train.py", "test_host_memory.py",
    "test_install.py", "test_kernel_lowering.py", "test_multihost.py", "test_remat.py",
    "test_resume.py", "test_train_sharding.py",
    "test_tpu_compile.py", "test_plan.py",  # libtpu compiles (skipped without libtpu)
}


def pytest_configure(config):
  config.addinivalue_line("markers", "versioned: outcome depends on the JAX / Orbax / "
                          "transformers versions (CI reruns these with the newest releases)")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if os.path.basename(str(item.fspath)) in VERSIONED_FILES:
      item.add_marker(pytest.mark.versioned)
