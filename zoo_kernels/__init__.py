"""zoo kernels: fused contrastive losses (CLIP softmax, SigLIP sigmoid), Pallas and blockwise XLA.

Named `zoo_kernels`: the import name `kernels` is Hugging Face's kernels package, which
transformers requires and imports whenever it is installed.
"""

from zoo_kernels.contrastive import contrastive_loss, reference_loss, resolve_impl

__all__ = ["contrastive_loss", "reference_loss", "resolve_impl"]
