"""The 21 hand joints: orders, names and the reference bone.

NumPy only, so the dataset builders use the same tables without importing
JAX. The project's internal order is AIT (wrist, then the MCPs, PIPs, DIPs
and tips, each thumb..pinky); FreiHAND lists the joints finger by finger;
MANO's regressor gives 16 joints, to which 5 fingertip vertices are added
(docs/datasets.md#joint-orders).
"""

import numpy as np

NUM_JOINTS = 21
FINGERS = ("thumb", "index", "middle", "ring", "pinky")

#: ait[k] = freihand[FREIHAND_TO_AIT[k]]
FREIHAND_TO_AIT = np.array(
  [0, 1, 5, 9, 13, 17, 2, 6, 10, 14, 18, 3, 7, 11, 15, 19, 4, 8, 12, 16, 20], dtype=np.int32
)
#: freihand[k] = ait[AIT_TO_FREIHAND[k]]
AIT_TO_FREIHAND = np.argsort(FREIHAND_TO_AIT).astype(np.int32)
#: ait[k] = mano[MANO_TO_AIT[k]] (MANO regressor order: 16 joints + 5 tips).
MANO_TO_AIT = np.array(
  [0, 13, 1, 4, 10, 7, 14, 2, 5, 11, 8, 15, 3, 6, 12, 9, 16, 17, 18, 19, 20], dtype=np.int32
)

#: AIT joint names: wrist, MCPs, PIPs, DIPs, tips (each thumb..pinky).
AIT_NAMES = ("wrist",) + tuple(
  f"{finger}_{part}" for part in ("mcp", "pip", "dip", "tip") for finger in FINGERS
)
#: The same names in FreiHAND order (wrist, then 4 joints per finger).
FREIHAND_NAMES = tuple(AIT_NAMES[i] for i in AIT_TO_FREIHAND)

#: AIT index of the middle-finger MCP (the palm root is wrist-MCP midway).
AIT_MIDDLE_MCP = 3
#: Reference bone (AIT middle MCP -> middle PIP); its length normalises depth.
REF_BONE = (AIT_MIDDLE_MCP, 8)
