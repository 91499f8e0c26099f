"""zoo kernels: fused contrastive losses (CLIP softmax, SigLIP sigmoid), Pallas and blockwise XLA."""

from zoo.kernels.contrastive import contrastive_loss, reference_loss, resolve_impl

__all__ = ["contrastive_loss", "reference_loss", "resolve_impl"]
