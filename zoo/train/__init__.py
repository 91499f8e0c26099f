"""Training: the loop and everything only a training run needs.

loop.py        `train(config)`: builds the trainer, runs steps, evaluates, checkpoints
step.py        the jitted train step, optimizer and schedule, microbatching
checkpoints.py the workdir's train checkpoints (Orbax, exact resume, diverged runs)
run_config.py  the workdir's config record: resume checks, schedule seams, value checks
config_files.py configs/*.py files and --config.key=value overrides, one-line errors
run_log.py     metrics to TensorBoard / stdout, non-finite checks, Ctrl-C
distributed.py jax.distributed from the cluster environment (multi-host)
host_memory.py glibc settings that keep XLA:CPU's per-step buffer mapped
"""
