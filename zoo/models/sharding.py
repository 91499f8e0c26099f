"""Device mesh, logical-axis partition rules, and host-local <-> global arrays.

Mesh axes: `data` (pure data parallel), `expert` (expert parallel; also splits the batch),
`fsdp` (batch and parameters/optimizer state), `tensor` (attention heads, MLP hidden, vocab).
Parameters carry logical axis names (see zoo/models/layers.py); `LOGICAL_RULES` maps each name to a
mesh axis. A dimension that the mesh axis does not divide stays replicated.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "fsdp", "tensor")
BATCH_AXES = ("data", "expert", "fsdp")

LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "norm": None,
    "expert": "expert",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over all (or the given) devices; one axis size may be -1 (= the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "expert": expert, "fsdp": fsdp, "tensor": tensor}
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {sizes}")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if unknown:
    if len(devices) % known:
      raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {known}")
    sizes[unknown[0]] = len(devices) // known
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ValueError(f"mesh {sizes} needs {total} devices but {len(devices)} are available; "
                     "set mesh.data/fsdp/tensor so their product is the device count (-1 = rest)")
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg: Mapping[str, Any]) -> Mesh:
  return make_mesh(data=mesh_cfg.get("data", 1), fsdp=mesh_cfg.get("fsdp", -1),
                   tensor=mesh_cfg.get("tensor", 1), expert=mesh_cfg.get("expert", 1))


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> P:
  """PartitionSpec for a parameter with logical `axes`; non-divisible dims stay replicated."""
  if not axes:
    return P()
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axis = rules.get(name) if name is not None else None
    if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
        or dim % mesh.shape[mesh_axis]):
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
  axes = variable.get_metadata().get("out_sharding")
  return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding for every variable of an nnx.State (same tree structure as the state)."""
  return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh)), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def path_names(path) -> tuple[str, ...]:
  """Key path of a pytree leaf -> tuple of names (drops nnx's `.value` attribute)."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
      names.append(k.name)
  return tuple(names)


def follow_param_shardings(tree: Any, params: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer-state tree: leaves that mirror a parameter get its sharding.

  Optax states hold parameter-shaped copies (Adam moments, masked/multi_transform wrappers)
  whose key paths end with the parameter's path; those follow the parameter, everything else
  (counts, scalars) is replicated. Explicit, so nothing depends on jit's sharding propagation.
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    by_path[path_names(path)] = (tuple(leaf.shape), leaf.sharding)
  repl = replicated(mesh)

  def pick(path, leaf):
    full = path_names(path)
    for start in range(len(full)):
      hit = by_path.get(full[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return repl

  return jax.tree_util.tree_map_with_path(pick, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every batch axis of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def host_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch (this host's rows) -> global jax.Arrays sharded over the batch axes."""
  def put(x):
    x = np.asarray(x)
    spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

  return jax.tree.map(put, dict(batch))


def shard_state(state: Any, shardings: Any) -> Any:
  """Places (possibly host) arrays onto the given shardings."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)
