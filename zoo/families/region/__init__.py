"""The region family: `family` (settings, losses, field hook, loop seam) and `evals` (eval kinds)."""

from zoo.families.region import evals, family
from zoo.families.region.family import FAMILY, Settings

__all__ = ["FAMILY", "Settings", "evals", "family"]
