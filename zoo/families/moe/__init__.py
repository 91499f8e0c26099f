"""The CLIP-MoE family: `family` (settings, loss, trainable phases) and `dmu` (its driver)."""

from zoo.families.moe import dmu, family
from zoo.families.moe.family import FAMILY, Settings

__all__ = ["FAMILY", "Settings", "dmu", "family"]
