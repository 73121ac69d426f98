"""Multi-block masks (sampling in ``multiblock``) and gathering the kept tokens (``gather``)."""

from pijepa.masks.gather import apply_masks
from pijepa.masks.multiblock import MultiBlockMaskCollator

__all__ = ["MultiBlockMaskCollator", "apply_masks"]
