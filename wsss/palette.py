"""Class-index masks as people see them: the VOC colour map, and the label that means "ignore".

Shared by training (data, figures) and serving (mask PNGs): nothing here needs torch.
"""

from __future__ import annotations

IGNORE = 255  # boundary / void pixels (Pet trimap 3, VOC 255): left out of losses and metrics


def _voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved class index), 256 RGB triples."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


VOC_PALETTE = _voc_palette()
