"""TPU (Mosaic) Pallas kernels for the contrastive-loss statistics; interface of `_blockwise`.

* `_stats_kernel` (softmax forward, 1 matmul unit per call): grid (row block "parallel", column
  block "arbitrary", d chunk "arbitrary"); running row max / sum in VMEM scratch, the rows'
  log-sum-exp out. Called twice (rows of x @ y.T, then of y @ x.T): O(B) statistics. With
  `sigmoid`, the rows' sums of -log sigmoid(+-z) instead: the SigLIP loss alone, for calls
  without gradients (evaluation), 1 unit instead of the gradient kernel's 3.
* `_grads_kernel` (softmax backward, sigmoid forward, 3 units): grid (core half "parallel",
  column block, row block); each tile is computed once and feeds G @ y_j and G.T @ x_i. G.T @ x
  accumulates in the resident output block over the inner row axis; G @ y accumulates over the
  outer column axis in HBM, read and written by explicit DMAs (double-buffered slots: with two
  or more row blocks per core a step's write back overlaps the next step's tile), so both
  inner axes are sequential ("arbitrary"); the leading axis splits the rows between the two
  TensorCores of megacore chips (v5p), each half with its own G.T @ x partial; single-core
  chips (v5e, v6e) have one. Softmax tiles subtract the targets in fp32 (`softmax_g`).
Blocks obey the (8, 128) rules for any B (rows / columns padded to the block, d to 128; vectors
as (br, 1) / (1, bc) blocks); VMEM per kernel depends on the blocks and d only (`plan`), and
`vmem_limit_bytes` is set from it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zoo.kernels._blockwise import dot, out_struct, softmax_g, varying_like

Array = jax.Array

_NT = (((1,), (1,)), ((), ()))  # x @ y.T
_TN = (((0,), (0,)), ((), ()))  # g.T @ x
MIB = 1 << 20
VMEM_LIMIT = 16 * MIB  # the smallest default scoped VMEM (v4: 16 MiB physical)
_BUDGET = 12 * MIB  # blocks + scratch + temporaries; the rest of the limit is headroom
_TILES = (512, 256, 128)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def vmem_bytes(shape: tuple[int, ...], itemsize: int) -> int:
  """Bytes of a VMEM buffer: the last two dims padded to the (8 * packing, 128) tile."""
  *lead, a, b = (1,) * max(0, 2 - len(shape)) + tuple(shape)
  sub = 8 * max(1, 4 // itemsize)
  n = _round_up(a, sub) * _round_up(b, 128) * itemsize
  for s in lead:
    n *= s
  return n


@dataclasses.dataclass(frozen=True)
class Plan:
  br: int  # rows per tile
  bc: int  # columns per tile
  dk: int  # d per chunk (== dp when d is kept whole)
  dp: int  # d padded to 128
  vmem: int  # estimated bytes: double-buffered windows + scratch + tile temporaries
  limit: int  # vmem_limit_bytes


def _stats_vmem(br: int, bc: int, dk: int, nk: int, isz: int) -> int:
  win = 2 * (vmem_bytes((br, dk), isz) + vmem_bytes((bc, dk), isz) + vmem_bytes((br, 1), 4))
  scratch = 2 * vmem_bytes((br, 1), 4) + (vmem_bytes((br, bc), 4) if nk > 1 else 0)
  return win + scratch + 3 * vmem_bytes((br, bc), 4)


def _grads_vmem(br: int, bc: int, dp: int, isz: int, sigmoid: bool) -> int:
  win = 2 * (vmem_bytes((br, dp), isz) + vmem_bytes((bc, dp), isz) + vmem_bytes((bc, dp), 4))
  win += 2 * (2 * vmem_bytes((1, bc), 4) if sigmoid
              else vmem_bytes((br, 1), 4) + vmem_bytes((1, bc), 4))
  scratch = 2 * vmem_bytes((br, dp), 4)
  return win + scratch + 3 * vmem_bytes((br, bc), 4) + vmem_bytes((br, dp), 4)


def _limit(vmem: int) -> int:
  return min(VMEM_LIMIT, _round_up(vmem + 4 * MIB, MIB))


def _tile_cap(m: int, n: int, block: int | None) -> int:
  cap = max(128, _round_up(block, 128)) if block else _TILES[0]
  return min(cap, max(128, _round_up(max(m, n), 128)))


def plan_stats(m: int, n: int, d: int, itemsize: int, block: int | None = None) -> Plan:
  """Tiles for the softmax statistics: the largest square tile, d whole if it fits, else in
  chunks of a multiple of 128 dividing the padded d."""
  dp, cap = _round_up(d, 128), _tile_cap(m, n, block)
  for t in (t for t in _TILES if t <= cap):
    for nk in range(1, dp // 128 + 1):
      if (dp // 128) % nk:
        continue
      v = _stats_vmem(t, t, dp // nk, nk, itemsize)
      if v <= _BUDGET:
        return Plan(t, t, dp // nk, dp, v, _limit(v))
  raise AssertionError("unreachable: a 128 x 128 x 128 tile always fits")


def plan_grads(m: int, n: int, d: int, itemsize: int, sigmoid: bool,
               block: int | None = None) -> Plan:
  """Tiles for the gradient kernel (d whole: its accumulators span d)."""
  dp, cap = _round_up(d, 128), _tile_cap(m, n, block)
  for br, bc in ((512, 512), (256, 512), (256, 256), (128, 256), (128, 128)):
    if max(br, bc) > cap:
      continue
    v = _grads_vmem(br, bc, dp, itemsize, sigmoid)
    if v <= _BUDGET:
      return Plan(br, bc, dp, dp, v, _limit(v))
  raise ValueError(f"contrastive_loss(impl='pallas') on TPU: embedding dim {d} needs "
                   f"{_grads_vmem(128, 128, dp, itemsize, sigmoid) / MIB:.1f} MiB of VMEM "
                   f"at 128 x 128 tiles (> {_BUDGET // MIB} MiB); use impl='xla'")


def tensor_cores() -> int:
  """TensorCores per device (2 on megacore v5p; v5e / v6e and v4's per-core devices: 1) of the
  TPU traced for: the current (abstract) mesh's device, e.g. under `jax.set_mesh` or
  `shard_map` in an AOT compile, else the default backend's first device if a TPU, else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  dev = getattr(mesh, "abstract_device", None) if mesh is not None else None
  if dev is None or getattr(dev, "platform", None) != "tpu":
    dev = jax.devices()[0] if jax.default_backend() == "tpu" else None
  return int(getattr(dev, "num_cores", None) or 1)


def _smem():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def _params(scale: Array) -> Array:
  return jnp.reshape(jnp.asarray(scale, jnp.float32), (1,))


def _pad2(a: Array, rows: int, cols: int) -> Array:
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


# ----------------------------------------------------------------------------- row statistics


def _softplus(z: Array) -> Array:
  return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _stats_kernel(*refs, n: int, nk: int, sigmoid: bool = False, m: int = 0):
  """Row log-sum-exp of the tiles (softmax), or the rows' sums of -log sigmoid(+-z) (sigmoid:
  the loss alone, no gradients; positives where column - row == offset)."""
  if sigmoid:
    p_ref, o_ref, x_ref, y_ref, lse_ref, m_sc, s_sc, *zacc = refs
  else:
    p_ref, x_ref, y_ref, lse_ref, m_sc, s_sc, *zacc = refs
  i, j, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  nj = pl.num_programs(1)
  br, bc = x_ref.shape[0], y_ref.shape[0]

  @pl.when((j == 0) & (k == 0))
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)

  part = dot(x_ref[...], y_ref[...], _NT)
  if nk > 1:
    @pl.when(k == 0)
    def _():
      zacc[0][...] = part

    @pl.when(k > 0)
    def _():
      zacc[0][...] += part

  @pl.when(k == nk - 1)
  def _():
    z = p_ref[0] * (zacc[0][...] if nk > 1 else part)
    cols = j * bc + lax.broadcasted_iota(jnp.int32, (br, bc), 1)
    if sigmoid:
      rows = i * br + lax.broadcasted_iota(jnp.int32, (br, bc), 0)
      zs = jnp.where((cols - rows) == o_ref[0], -(z + p_ref[1]), z + p_ref[1])
      sp = jnp.where((rows < m) & (cols < n), _softplus(zs), 0.0)
      s_sc[...] += jnp.sum(sp, axis=1, keepdims=True)
    else:
      zr = jnp.where(cols < n, z, -jnp.inf)
      m_old = m_sc[...]
      m_new = jnp.maximum(m_old, jnp.max(zr, axis=1, keepdims=True))
      s_sc[...] = (s_sc[...] * jnp.exp(m_old - m_new)
                   + jnp.sum(jnp.exp(zr - m_new), axis=1, keepdims=True))
      m_sc[...] = m_new

    @pl.when(j == nj - 1)
    def _():
      lse_ref[...] = s_sc[...] if sigmoid else m_sc[...] + jnp.log(s_sc[...])


def _row_call(x: Array, y: Array, params: Array, block: int | None, offset: Array | None,
              interpret, name: str) -> Array:
  """[m] per-row statistic of z = scale * x @ y.T: log-sum-exp, or (with `offset`) the sigmoid
  loss' row sums."""
  (m, d), n = x.shape, y.shape[0]
  p = plan_stats(m, n, d, x.dtype.itemsize, block)
  br, bc, dk = p.br, p.bc, p.dk
  mp, np_, nk = _round_up(m, br), _round_up(n, bc), p.dp // p.dk
  sigmoid = offset is not None
  kernel = functools.partial(_stats_kernel, n=n, nk=nk, sigmoid=sigmoid, m=m)
  scratch = [pltpu.VMEM((br, 1), jnp.float32), pltpu.VMEM((br, 1), jnp.float32)]
  if nk > 1:
    scratch.append(pltpu.VMEM((br, bc), jnp.float32))
  args = [params] + ([jnp.reshape(offset, (1,)).astype(jnp.int32)] if sigmoid else [])
  args += [_pad2(x, mp, p.dp), _pad2(y.astype(x.dtype), np_, p.dp)]
  args = varying_like(args, *args)
  in_specs = [_smem()] * (2 if sigmoid else 1)
  in_specs += [pl.BlockSpec((br, dk), lambda i, j, k: (i, k)),
               pl.BlockSpec((bc, dk), lambda i, j, k: (j, k))]
  out = pl.pallas_call(
      kernel,
      grid=(mp // br, np_ // bc, nk), in_specs=in_specs,
      out_specs=pl.BlockSpec((br, 1), lambda i, j, k: (i, 0)),
      out_shape=out_struct((mp, 1), args[-1]),
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"),
          vmem_limit_bytes=p.limit),
      interpret=interpret, name=name,
  )(*args)
  return out[:m, 0]


def sigmoid_loss_call(x: Array, y: Array, params: Array, offset: Array, block: int | None, *,
                      interpret=False) -> Array:
  """The sigmoid loss sum alone (no gradients: one matmul unit), e.g. for evaluation.
  params: [scale, bias, ...]."""
  return jnp.sum(_row_call(x, y, params[:2], block, offset, interpret,
                           "contrastive_sigmoid_loss"))


def row_lse_call(x: Array, y: Array, scale: Array, block: int | None, *,
                 interpret=False) -> Array:
  """Log-sum-exp over y of each row of z = scale * x @ y.T [m] (O(m) output)."""
  return _row_call(x, y, _params(scale), block, None, interpret, "contrastive_softmax_stats")


def softmax_stats_call(x: Array, y: Array, scale: Array, block: int | None, *,
                       interpret=False) -> tuple[Array, Array]:
  """(row log-sum-exp [m], column log-sum-exp [n]) of z = scale * x @ y.T: two row passes (the
  columns' as the rows of y @ x.T), so no statistic grows with B^2 / block."""
  return (row_lse_call(x, y, scale, block, interpret=interpret),
          row_lse_call(y.astype(x.dtype), x, scale, block, interpret=interpret))


# ----------------------------------------------------------------------------- gradients


def _grads_kernel(*refs, sigmoid: bool, m: int, n: int, nh: int):
  if sigmoid:
    p_ref, o_ref, x_ref, y_ref, dy_ref, loss_ref, gs_ref, dx_hbm, buf, sem = refs
  else:
    p_ref, o_ref, x_ref, y_ref, lr_ref, lc_ref, dy_ref, dx_hbm, buf, sem = refs
  c, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  nj, ni = pl.num_programs(1), pl.num_programs(2)
  br, bc = x_ref.shape[0], y_ref.shape[0]
  r = c * nh + i  # this program's row block
  step = j * ni + i  # position in this core's sequential walk
  slot = step % 2
  rows_hbm = dx_hbm.at[pl.ds(pl.multiple_of(r * br, br), br)]
  read = pltpu.make_async_copy(rows_hbm, buf.at[slot], sem.at[2])
  write = pltpu.make_async_copy(buf.at[slot], rows_hbm, sem.at[slot])

  if nh == 1:  # every step reads back the rows the step before wrote: that write completes first
    @pl.when(step > 0)
    def _():
      pltpu.make_async_copy(buf.at[1 - slot], rows_hbm, sem.at[1 - slot]).wait()
  else:  # other rows: the previous write runs on under this step's tile; only this slot's last
    # write (two steps back, whose rows are read again no sooner than nh >= 2 steps later) waits
    @pl.when(step > 1)
    def _():
      write.wait()

  @pl.when(j > 0)
  def _():
    read.start()

  x, y = x_ref[...], y_ref[...]
  z = p_ref[0] * dot(x, y, _NT)
  rows = r * br + lax.broadcasted_iota(jnp.int32, (br, bc), 0)
  cols = j * bc + lax.broadcasted_iota(jnp.int32, (br, bc), 1)
  valid = (rows < m) & (cols < n)
  pos = (cols - rows) == o_ref[0]
  if sigmoid:
    zs = jnp.where(pos, -(z + p_ref[1]), z + p_ref[1])
    sig = 1.0 / (1.0 + jnp.exp(-zs))
    g = jnp.where(valid, jnp.where(pos, -sig, sig), 0.0)
    sp = jnp.where(valid, _softplus(zs), 0.0)
  else:
    g = softmax_g(z, lr_ref[...], lc_ref[...], pos, (p_ref[2], p_ref[3]))
    g = jnp.where(valid, g, 0.0)
  gt = g.astype(x.dtype)

  @pl.when(i == 0)
  def _():
    dy_ref[...] = jnp.zeros(dy_ref.shape, jnp.float32)
    if sigmoid:
      loss_ref[...] = jnp.zeros(loss_ref.shape, jnp.float32)
      gs_ref[...] = jnp.zeros(gs_ref.shape, jnp.float32)

  dy_ref[0] += dot(gt, x, _TN)
  if sigmoid:
    loss_ref[0] += jnp.sum(sp, axis=0, keepdims=True)
    gs_ref[0] += jnp.sum(g, axis=0, keepdims=True)
  gx = dot(gt, y)

  @pl.when(j == 0)
  def _():
    buf[slot] = gx

  @pl.when(j > 0)
  def _():
    read.wait()
    buf[slot] += gx

  write.start()

  @pl.when(step == nj * ni - 1)
  def _():
    write.wait()
    if nh > 1:  # and the previous step's, still in flight
      pltpu.make_async_copy(buf.at[1 - slot], rows_hbm, sem.at[1 - slot]).wait()


def grads_call(x: Array, y: Array, params: Array, block: int | None, *, sigmoid: bool,
               lse_rows: Array | None = None, lse_cols: Array | None = None,
               offset: Array | None = None, cores: int | None = None, interpret=False):
  """G @ y [m, d], G.T @ x [n, d] (fp32) and, for sigmoid, (sum of softplus, sum of G).
  params: [scale, bias, 2 t_pair, 2 t_other]; pairs where column - row == offset. `cores`:
  TensorCores sharing the chip (2 on megacore v4 / v5p: the rows split between them, each with
  a G.T @ x partial; 1 elsewhere: no partials); None = `tensor_cores()`."""
  (m, d), n = x.shape, y.shape[0]
  p = plan_grads(m, n, d, x.dtype.itemsize, sigmoid, block)
  br, bc, dp = p.br, p.bc, p.dp
  nbr = -(-m // br)
  ncore = min(cores or tensor_cores(), 2) if nbr >= 2 else 1
  nbr = _round_up(nbr, ncore)
  nh, mp, np_ = nbr // ncore, nbr * br, _round_up(n, bc)
  xspec = pl.BlockSpec((br, dp), lambda c, j, i: (c * nh + i, 0))
  yspec = pl.BlockSpec((bc, dp), lambda c, j, i: (j, 0))
  args = [params, jnp.reshape(offset, (1,)).astype(jnp.int32)]
  in_specs = [_smem(), _smem()]
  args += [_pad2(x, mp, dp), _pad2(y.astype(x.dtype), np_, dp)]
  in_specs += [xspec, yspec]
  if not sigmoid:
    args += [jnp.pad(lse_rows.astype(jnp.float32), (0, mp - m))[:, None],
             jnp.pad(lse_cols.astype(jnp.float32), (0, np_ - n))[None, :]]
    in_specs += [pl.BlockSpec((br, 1), lambda c, j, i: (c * nh + i, 0)),
                 pl.BlockSpec((1, bc), lambda c, j, i: (0, j))]
  vec = lambda: pl.BlockSpec((1, 1, bc), lambda c, j, i: (c, 0, j))
  out_specs = [pl.BlockSpec((1, bc, dp), lambda c, j, i: (c, j, 0))]
  args = varying_like(args, *args)
  out_shape = [out_struct((ncore, np_, dp), args[-1])]
  if sigmoid:
    out_specs += [vec(), vec()]
    out_shape += [out_struct((ncore, 1, np_), args[-1])] * 2
  out_specs.append(pl.BlockSpec(memory_space=pl.ANY))
  out_shape.append(out_struct((mp, dp), args[-1]))
  outs = pl.pallas_call(
      functools.partial(_grads_kernel, sigmoid=sigmoid, m=m, n=n, nh=nh),
      grid=(ncore, np_ // bc, nh), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((2, br, dp), jnp.float32), pltpu.SemaphoreType.DMA((3,))],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"),
          vmem_limit_bytes=p.limit),
      interpret=interpret,
      name="contrastive_sigmoid_grads" if sigmoid else "contrastive_softmax_grads",
  )(*args)
  gy, gx = jnp.sum(outs[0], axis=0)[:n, :d], outs[-1][:m, :d]
  if not sigmoid:
    return gx, gy
  return gx, gy, jnp.sum(outs[1][:, 0, :n]), jnp.sum(outs[2][:, 0, :n])
