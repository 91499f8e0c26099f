"""The `clip` family: CLIP / SigLIP contrastive training (the `Family` defaults, unchanged).

Batch fields: image, tokens. Loss: softmax (CLIP) or sigmoid (SigLIP, a model with a logit
bias) contrastive loss over the global batch, through zoo.losses -> kernels. Notes:
docs/families/clip.md.
"""

from __future__ import annotations

from zoo.families import base


class ClipFamily(base.Family):
  """Plain CLIP / SigLIP: every default of `Family`."""

  name = "clip"


FAMILY = ClipFamily()
