"""`evaluate(model, eval_sets, tokenizer)`: runs named eval sets of any kind -> {"set/metric": v}.

The kinds are known without any registration step: the built-in ones (`zeroshot`,
`retrieval`, zoo.eval.evaluator) and every family's declared `eval_kinds` (zoo.families, the
one family list, plus families added there at run time). A one-off kind is passed with
`kinds={"name": fn}`; `fn(model, spec, tokenizer, *, mesh, batch_size)` returns float metrics
without the set prefix. See zoo.eval.evaluator for the spec format of each built-in kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from zoo import families
from zoo.eval import evaluator


def eval_kinds(extra: Mapping[str, evaluator.Evaluator] | None = None
               ) -> dict[str, evaluator.Evaluator]:
  """kind -> evaluator: the built-in kinds, every family's kinds, then `extra`."""
  kinds = dict(evaluator.BUILTIN_KINDS)
  for family in families.registered():
    for kind, fn in family.eval_kinds.items():
      if kind in kinds and kinds[kind] is not fn:
        raise ValueError(f"eval kind {kind!r} of family {family.name!r} is already declared by "
                         "another family or built in; rename one of them")
      kinds[kind] = fn
  return {**kinds, **(extra or {})}


def evaluate(model: nnx.Module, eval_sets: Mapping[str, Mapping[str, Any]],
             tokenizer: evaluator.Tokenizer | None, *, mesh: Mesh | None = None,
             prefix_by_set: bool = True, batch_size: int = 256,
             kinds: Mapping[str, evaluator.Evaluator] | None = None) -> dict[str, float]:
  """Runs every eval set -> {"set/metric": float}.

  `eval_sets` is a dict `name -> spec`, each spec a dict with a `"kind"` and that kind's arrays
  (host-local numpy, the full set on every host):

  * `"zeroshot"`: `images` float32 [N, H, W, 3] (preprocessed), `labels` int [N] in [0, C),
    `class_names` list[str] (C), `templates` list of str with a `{}` or `{c}` placeholder, or
    callables `class_name -> str`.
  * `"retrieval"`: `images` float32 [N, H, W, 3], `captions` list[str] (T),
    `image_to_captions` list (N) of lists of caption indices (each caption of >= 1 image).
  * a family's kinds: see the family (zoo.families).

  Optional keys for any kind: `tokenizer` (overrides `tokenizer`), `batch_size`. With `prefix_by_set=False` metric names are unprefixed; two sets producing the same name is
  then an error. `kinds` adds eval kinds for this call (over the built-in and family ones).
  """
  known = eval_kinds(kinds)
  results: dict[str, float] = {}
  for name, spec in eval_sets.items():
    if not isinstance(spec, Mapping) or "kind" not in spec:
      raise ValueError(f"eval set {name!r} needs a dict with a 'kind' (one of {sorted(known)})")
    kind = spec["kind"]
    if kind not in known:
      raise ValueError(f"eval set {name!r} has unknown kind {kind!r}; known: {sorted(known)} "
                       "(a family declares its kinds in `eval_kinds`; pass a one-off with "
                       "evaluate(..., kinds={name: fn}))")
    tok = spec.get("tokenizer", tokenizer)
    if tok is None:
      raise ValueError(f"eval set {name!r}: no tokenizer given (pass one to evaluate or set "
                       "spec['tokenizer'])")
    metrics = known[kind](model, spec, tok, mesh=mesh,
                          batch_size=int(spec.get("batch_size", batch_size)))
    for metric, value in metrics.items():
      key = f"{name}/{metric}" if prefix_by_set else metric
      if key in results:
        raise ValueError(f"metric {key!r} produced twice (eval set {name!r}); use prefix_by_set=True")
      results[key] = float(value)
  return results
