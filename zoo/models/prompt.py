"""Prompt learning on a frozen CLIP: CoOp, CoCoOp and MaPLe (Flax NNX).

`PromptCLIP` is a CLIP (same towers, same parameter names) plus `prompt`, the only part that
trains: CoOp's n_ctx context vectors in the text tower's token-embedding space (shared or one
set per class) take the place of some tokens of each class prompt; CoCoOp adds a meta-net
(Linear d -> d/16, ReLU, Linear -> width) whose image-conditioned bias shifts the context;
MaPLe adds deep prompts to the first `depth` layers of both towers, the vision prompts made from
the language prompts by one Linear coupling per layer. `build_prompts` turns class names into
token ids and context positions with any zoo tokenizer (CLIP BPE, sentencepiece); they are
stored in the config, so `zoo.save` / `zoo.load` round-trip the model with its classes.
Paper notes and deviations: docs/families/prompt.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models import clip as clip_lib, configs
from zoo.models.layers import Linear, param

Array = jax.Array
METHODS = ("coop", "cocoop", "maple")
POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"  # the word whose token marks a context slot before it is replaced
PLACEHOLDERS = (PLACEHOLDER, "x", "*", "a")  # the first a tokenizer keeps as one token is used


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """The prompt learner, stored with the model.

  method: coop | cocoop | maple. n_ctx: context vectors. ctx_init: the phrase they start from
  ("" = random, normal 0.02). class_specific: one context per class (CoOp's CSC).
  class_token_position: end | middle | front. depth: MaPLe's J (prompts in the first J layers
  of both towers; 0 = none: CoOp). meta_ratio: CoCoOp's meta-net reduction (d -> d / ratio).
  classnames / token_ids [C, L] / ctx_positions [C, n_ctx] / ctx_init_ids: `build_prompts`.
  """

  method: str = "coop"
  n_ctx: int = 4
  ctx_init: str = "a photo of a"
  class_specific: bool = False
  class_token_position: str = "end"
  depth: int = 9
  meta_ratio: int = 16
  classnames: tuple[str, ...] = ()
  token_ids: tuple[tuple[int, ...], ...] = ()
  ctx_positions: tuple[tuple[int, ...], ...] = ()
  ctx_init_ids: tuple[int, ...] = ()

  def __post_init__(self):
    check_settings(self.method, self.n_ctx, self.class_specific, self.class_token_position,
                   self.depth, self.meta_ratio)
    if len(self.token_ids) != len(self.classnames) or len(self.ctx_positions) != len(
        self.classnames):
      raise ValueError(f"prompt config: {len(self.classnames)} classnames but "
                       f"{len(self.token_ids)} token rows and {len(self.ctx_positions)} position "
                       "rows; build it with zoo.models.prompt.prompt_config")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PromptConfig:
    d = dict(d)
    for key in ("token_ids", "ctx_positions"):
      d[key] = tuple(tuple(int(v) for v in row) for row in d.get(key, ()))
    d["classnames"] = tuple(d.get("classnames", ()))
    d["ctx_init_ids"] = tuple(int(v) for v in d.get("ctx_init_ids", ()))
    return configs.checked_config(cls, d, "prompt")


def check_settings(method: str, n_ctx: int, class_specific: bool, position: str, depth: int,
                   meta_ratio: int) -> None:
  """One ValueError naming the bad prompt setting."""
  if method not in METHODS:
    raise ValueError(f"prompt.method={method!r}: expected one of {', '.join(METHODS)}")
  if position not in POSITIONS:
    raise ValueError(f"prompt.class_token_position={position!r}: expected one of "
                     f"{', '.join(POSITIONS)}")
  if n_ctx < 1:
    raise ValueError(f"prompt.n_ctx={n_ctx}: expected >= 1")
  if depth < 0 or meta_ratio < 1:
    raise ValueError(f"prompt.depth={depth} / prompt.meta_ratio={meta_ratio}: expected "
                     "depth >= 0 and meta_ratio >= 1")
  if class_specific and method != "coop":
    raise ValueError(f"prompt.class_specific applies to coop only (method={method!r})")


@dataclasses.dataclass(frozen=True)
class PromptCLIPConfig(configs.CLIPConfig):
  """A CLIPConfig plus the prompt learner (`prompt`)."""

  prompt: PromptConfig = PromptConfig()

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PromptCLIPConfig:
    d = dict(d)
    prompt = PromptConfig.from_dict(d.pop("prompt", {}) or {})
    return dataclasses.replace(super().from_dict(d), prompt=prompt)


def placeholder(tokenizer: Any) -> str:
  """The first of PLACEHOLDERS that `tokenizer` encodes as one token (a context slot)."""
  for word in PLACEHOLDERS:
    if len(tokenizer.encode(word)) == 1:
      return word
  raise ValueError(f"the tokenizer encodes none of {PLACEHOLDERS} as one token; prompt learning "
                   "marks each context slot with one")


def build_prompts(tokenizer: Any, classnames: Sequence[str], *, n_ctx: int, ctx_init: str = "",
                  position: str = "end", context_length: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  """(token_ids [C, L], ctx_positions [C, n_ctx], ctx_init_ids) of the class prompts.

  `tokenizer`: a zoo tokenizer (`encode(text)`, `__call__(texts, context_length)`,
  `sot_token_id`). Class token at the end: the text is "{ctx_init} {name}." (`placeholder`s
  without ctx_init) and the context is its first n_ctx tokens (the rest of a longer phrase stays
  as fixed tokens, as MaPLe's "a photo of a" with n_ctx=2); middle / front: "X.. {name} X..."
  / "{name} X...". With ctx_init, `ctx_init_ids` are the phrase's first n_ctx token ids.
  """
  if position not in POSITIONS:
    raise ValueError(f"prompt.class_token_position={position!r}: expected one of "
                     f"{', '.join(POSITIONS)}")
  if not classnames:
    raise ValueError("prompt learning needs at least one class name")
  word = placeholder(tokenizer) if position != "end" or not ctx_init else PLACEHOLDER
  init_ids: tuple[int, ...] = ()
  if ctx_init:
    phrase = tokenizer.encode(ctx_init)
    if len(phrase) < n_ctx:
      raise ValueError(f"prompt.ctx_init={ctx_init!r} has {len(phrase)} tokens, fewer than "
                       f"prompt.n_ctx={n_ctx}; lower n_ctx or lengthen the phrase")
    init_ids = tuple(int(t) for t in phrase[:n_ctx])
  start = 0 if getattr(tokenizer, "sot_token_id", None) is None else 1
  texts, positions = [], []
  half = n_ctx // 2
  for name in classnames:
    name = str(name).replace("_", " ")
    length = len(tokenizer.encode(name))
    if position == "end":
      lead = ctx_init if ctx_init else " ".join([word] * n_ctx)
      texts.append(f"{lead} {name}.")
      positions.append(list(range(start, start + n_ctx)))
    elif position == "middle":
      texts.append(" ".join([word] * half + [name] + [word] * (n_ctx - half)) + ".")
      positions.append(list(range(start, start + half))
                       + list(range(start + half + length, start + n_ctx + length)))
    else:
      texts.append(" ".join([name] + [word] * n_ctx) + ".")
      positions.append(list(range(start + length, start + length + n_ctx)))
  ids = np.asarray(tokenizer(texts, context_length=context_length) if context_length else
                   tokenizer(texts), np.int32)
  pos = np.asarray(positions, np.int32)
  specials = start + (0 if getattr(tokenizer, "eot_token_id", None) is None else 1)
  for text, name in zip(texts, classnames):  # a cut prompt would lose its class name
    if len(tokenizer.encode(text)) + specials > ids.shape[1]:
      raise ValueError(f"class {name!r}: its prompt {text!r} does not fit the text context of "
                       f"{ids.shape[1]} tokens")
  return ids, pos, init_ids


def prompt_config(base: configs.CLIPConfig | str, tokenizer: Any, classnames: Sequence[str], *,
                  method: str = "coop", n_ctx: int = 4, ctx_init: str = "a photo of a",
                  class_specific: bool = False, class_token_position: str = "end",
                  depth: int = 9, meta_ratio: int = 16) -> PromptCLIPConfig:
  """A PromptCLIPConfig over an architecture (a name or CLIPConfig) for `classnames`."""
  if isinstance(base, str):
    base = configs.get_model_config(base)
  check_settings(method, n_ctx, class_specific, class_token_position, depth, meta_ratio)
  ids, pos, init_ids = build_prompts(tokenizer, classnames, n_ctx=n_ctx, ctx_init=ctx_init,
                                     position=class_token_position,
                                     context_length=base.text.context_length)
  prompt = PromptConfig(
      method=method, n_ctx=n_ctx, ctx_init=ctx_init, class_specific=class_specific,
      class_token_position=class_token_position, depth=depth if method == "maple" else 0,
      meta_ratio=meta_ratio, classnames=tuple(str(c) for c in classnames),
      token_ids=tuple(tuple(int(v) for v in row) for row in ids),
      ctx_positions=tuple(tuple(int(v) for v in row) for row in pos), ctx_init_ids=init_ids)
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(configs.CLIPConfig)}
  return PromptCLIPConfig(prompt=prompt, **fields)


def place(embeddings: Array, positions: Array, values: Array) -> Array:
  """`embeddings` [..., C, L, d] with row positions[c, j] of class c set to values[..., c, j]."""
  length = embeddings.shape[-2]
  onehot = (positions[..., None] == jnp.arange(length)).astype(values.dtype)  # [C, n, L]
  placed = jnp.einsum("cnl,...cnd->...cld", onehot, values)
  mask = jnp.any(positions[..., None] == jnp.arange(length), axis=-2)  # [C, L]
  return jnp.where(mask[..., None], placed.astype(embeddings.dtype), embeddings)


class PromptLearner(nnx.Module):
  """The trainable prompts: `ctx`; CoCoOp's `meta1`, `meta2`; MaPLe's `proj` (first-layer
  coupling), `deep_text` [J-1, n, width] and the stacked deep couplings `deep_kernel`,
  `deep_bias`."""

  def __init__(self, pc: PromptConfig, text_width: int, vision_width: int, embed_dim: int, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    n, c = pc.n_ctx, len(pc.classnames)
    init = nnx.initializers.normal(0.02)
    shape = (c, n, text_width) if pc.class_specific else (n, text_width)
    self.ctx = param(rngs, init, shape, (None,) * (len(shape) - 1) + ("embed",))
    cocoop, maple = pc.method == "cocoop", pc.method == "maple" and pc.depth >= 1
    hidden = max(embed_dim // pc.meta_ratio, 1)
    self.meta1 = (Linear(embed_dim, hidden, axes=(None, None), dtype=dtype, rngs=rngs)
                  if cocoop else None)
    self.meta2 = (Linear(hidden, text_width, axes=(None, "embed"), dtype=dtype, rngs=rngs)
                  if cocoop else None)
    self.proj = (Linear(text_width, vision_width, axes=("embed", None), dtype=dtype, rngs=rngs)
                 if maple else None)
    j = pc.depth - 1 if maple else 0
    self.deep_text = param(rngs, init, (j, n, text_width), (None, None, "embed")) if j else None
    self.deep_kernel = (param(rngs, nnx.initializers.normal(text_width ** -0.5),
                              (j, text_width, vision_width), (None, "embed", None))
                        if j else None)
    self.deep_bias = (nnx.Param(jnp.zeros((j, vision_width), jnp.float32),
                                eager_sharding=False, out_sharding=(None, None))
                      if j else None)

  def meta_bias(self, image_features: Array) -> Array:
    """CoCoOp: [B, E] normalized image features -> [B, width] context shift."""
    return self.meta2(jax.nn.relu(self.meta1(image_features)))

  def vision_prompts(self) -> Array:
    """MaPLe: the first layer's vision prompts [n, vision width] from the context."""
    return self.proj(self.ctx[...])

  def deep_vision(self) -> Array:
    """MaPLe: [J-1, n, vision width], layer i+1's vision prompts from its language prompts."""
    return jnp.einsum("jnd,jdv->jnv", self.deep_text[...], self.deep_kernel[...]) + (
        self.deep_bias[...][:, None])


class PromptCLIP(clip_lib.CLIP):
  """A frozen CLIP with learned prompts (`prompt`) for the classes of `config.prompt`.

  `class_logits(images)` [B, C] scores the stored classes (or `token_ids` / `ctx_positions` of
  other classes: shared context only); `class_text_features` their normalized text features;
  `encode_image` applies MaPLe's vision prompts. `encode_text` is the plain CLIP's.
  """

  def __init__(self, config: PromptCLIPConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    pc = config.prompt
    self.prompt = PromptLearner(pc, config.text.width, config.vision.width, config.embed_dim,
                                dtype=jnp.dtype(config.dtype), rngs=rngs)

  @property
  def deep(self) -> int:
    """MaPLe's prompt depth J (0 for CoOp / CoCoOp)."""
    pc = self.config.prompt
    return pc.depth if pc.method == "maple" else 0

  def init_context(self) -> None:
    """Sets the context to the token embeddings of `ctx_init` (call after loading the CLIP's
    weights; nothing to do for a random init)."""
    ids = self.config.prompt.ctx_init_ids
    if not ids:
      return
    rows = jnp.take(self.text.token_embedding[...], jnp.asarray(ids, jnp.int32), axis=0)
    ctx = self.prompt.ctx
    ctx[...] = jnp.broadcast_to(rows, ctx.shape).astype(ctx[...].dtype)

  def encode_image(self, images: Array, normalize: bool = False) -> Array:
    clip_lib.check_images(images)
    if not self.deep:
      return super().encode_image(images, normalize=normalize)
    deep = self.prompt.deep_vision() if self.deep > 1 else None
    n = self.config.prompt.n_ctx

    def before_block(i: int, x: Array) -> Array:
      if i == 0 or i >= self.deep:
        return x
      new = jnp.broadcast_to(deep[i - 1].astype(x.dtype), (x.shape[0], n, x.shape[2]))
      return jnp.concatenate([x[:, :-n], new], axis=1)

    x = self.visual(images, prompts=self.prompt.vision_prompts()[None],
                    before_block=before_block).astype(jnp.float32)
    return clip_lib.l2_normalize(x) if normalize else x

  def _class_prompts(self, token_ids: Array | None, ctx_positions: Array | None
                     ) -> tuple[Array, Array]:
    pc = self.config.prompt
    if token_ids is None:
      return jnp.asarray(pc.token_ids, jnp.int32), jnp.asarray(pc.ctx_positions, jnp.int32)
    if ctx_positions is None:
      raise ValueError("class_text_features: pass ctx_positions with token_ids (build_prompts)")
    if pc.class_specific and token_ids.shape[0] != len(pc.classnames):
      raise ValueError(f"class-specific context holds {len(pc.classnames)} classes; it cannot "
                       f"score {token_ids.shape[0]} other classes (use a shared context)")
    return jnp.asarray(token_ids, jnp.int32), jnp.asarray(ctx_positions, jnp.int32)

  def class_text_features(self, token_ids: Array | None = None,
                          ctx_positions: Array | None = None,
                          image_features: Array | None = None) -> Array:
    """Normalized class text features [C, E]; CoCoOp (given normalized `image_features`
    [B, E]): [B, C, E], each image's context shifted by its meta-net bias."""
    ids, pos = self._class_prompts(token_ids, ctx_positions)
    c, length = ids.shape
    ctx = self.prompt.ctx[...]
    if ctx.ndim == 2:
      ctx = jnp.broadcast_to(ctx, (c, *ctx.shape))
    lead: tuple[int, ...] = ()
    if self.config.prompt.method == "cocoop":
      if image_features is None:
        raise ValueError("CoCoOp's class text features depend on the image: pass image_features")
      ctx = ctx[None] + self.prompt.meta_bias(image_features)[:, None, None, :].astype(ctx.dtype)
      lead = (ctx.shape[0],)
    emb = place(jnp.broadcast_to(self.text.embed(ids), (*lead, c, length, ctx.shape[-1])), pos,
                ctx.astype(self.text.dtype))
    before_block = None
    if self.deep > 1:
      deep = self.prompt.deep_text[...]

      def before_block(i: int, x: Array) -> Array:
        if i == 0 or i >= self.deep:
          return x
        return place(x, pos, jnp.broadcast_to(deep[i - 1].astype(x.dtype), (c, *deep.shape[1:])))

    flat_ids = jnp.broadcast_to(ids, (*lead, c, length)).reshape(-1, length)
    x = self.text.encode_embeddings(emb.reshape(-1, length, emb.shape[-1]), flat_ids,
                                    before_block=before_block)
    return clip_lib.l2_normalize(x.astype(jnp.float32)).reshape(*lead, c, -1)

  def class_logits(self, images: Array, token_ids: Array | None = None,
                   ctx_positions: Array | None = None) -> Array:
    """[B, C] = exp(logit_scale) * cos(image, class prompt) (the frozen CLIP's scale)."""
    img = self.encode_image(images, normalize=True)
    scale = jnp.exp(self.logit_scale[...])
    if self.config.prompt.method == "cocoop":
      txt = self.class_text_features(token_ids, ctx_positions, image_features=img)
      return scale * jnp.einsum("be,bce->bc", img, txt)
    txt = self.class_text_features(token_ids, ctx_positions)
    return scale * img @ txt.T
