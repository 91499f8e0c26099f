"""open_clip's MobileCLIP image tower (TimmModel over timm's FastVit, `visual.trunk.*`) <-> zoo.

zoo's FastViT modules carry timm's own attribute names (stem.N, stages.N.downsample.proj.0
.large_conv.bn, blocks.N.token_mixer.mixer.conv_kxk.0.conv, pos_emb.pos_enc, final_conv.se.fc1,
...), so each rule is the zoo path joined with dots plus a per-leaf re-layout: conv kernels
HWIO <-> OIHW, 1x1 convs held as Linear <-> [out, in, 1, 1], layer scales [C] <-> [C, 1, 1],
batch norm (scale, bias, mean, var) <-> (weight, bias, running_mean, running_var). The rules
are read off the model's abstract state, so they cover exactly the branches the config builds;
a re-parameterized (fused, `reparam_conv`) state dict maps onto `mobileclip_reparam`'s form.
"""

from __future__ import annotations

from flax import nnx

from zoo.convert import common
from zoo.convert.common import Rule, identity
from zoo.models import mobileclip, mobileclip_reparam

_BN_NAMES = {"scale": "weight", "mean": "running_mean", "var": "running_var"}
_CONV_1X1 = ("fc1", "fc2")  # Linear modules standing for timm's 1x1 nn.Conv2d


def _leaf_rule(path: tuple, shape: tuple[int, ...]) -> Rule:
  *parents, leaf = path[1:]  # drop 'visual'
  parents = [str(p) for p in parents]
  if parents == ["head"]:
    parents = ["head", "fc"]  # timm's ClassifierHead.fc
  key = "visual.trunk." + ".".join(parents)
  if leaf == "kernel" and len(shape) == 4:  # HWIO <-> OIHW
    return Rule(path, (f"{key}.weight",), lambda a: (a.transpose(3, 2, 0, 1),),
                lambda a: a.transpose(2, 3, 1, 0))
  if leaf == "kernel" and parents[-1] in _CONV_1X1:
    return Rule(path, (f"{key}.weight",), lambda a: (a.T.reshape(a.shape[1], a.shape[0], 1, 1),),
                lambda a: a[:, :, 0, 0].T)
  if leaf == "kernel":
    return common.transposed(path, f"{key}.weight")
  if leaf == "gamma":  # LayerScale2d: [C, 1, 1]
    return Rule(path, (f"{key}.gamma",), lambda a: (a.reshape(a.shape[0], 1, 1),),
                lambda a: a.reshape(a.shape[0]))
  return identity(path, f"{key}.{_BN_NAMES.get(leaf, leaf)}")


def fastvit_rules(config: mobileclip.MobileCLIPConfig, fused: bool = False) -> list[Rule]:
  """Rules for every `visual` entry of MobileCLIP(config) (a TimmModel fastvit_mci* trunk);
  `fused`: of its re-parameterized form (timm's `reparam_conv` entries, inference mode)."""
  _, state = common.abstract_state(config, build_fused if fused else build)
  return [_leaf_rule(path, shape) for path, shape in common.flat_shapes(state).items()
          if path[0] == "visual"]


def build(config: mobileclip.MobileCLIPConfig) -> nnx.Module:
  return mobileclip.MobileCLIP(config, rngs=nnx.Rngs(0))


def build_fused(config: mobileclip.MobileCLIPConfig) -> nnx.Module:
  return mobileclip_reparam.reparameterize(build(config))


def is_fused(model: nnx.Module) -> bool:
  """Whether a MobileCLIP model is in the re-parameterized (inference) form."""
  return isinstance(getattr(getattr(model, "visual", None), "final_conv", None),
                    mobileclip_reparam.RepConvAct)
