"""Align stage: brings every model into the unit order (basis) of a reference model.

``ALIGNERS`` maps ``align.method`` names to their implementations.
"""

from __future__ import annotations

from typing import Any

#: Every available alignment method by name.
ALIGNERS: dict[str, Any] = {}

#: Alignment methods from the design that are not built yet.
PLANNED: set[str] = {"weight_matching", "activation_matching", "sinkhorn", "zipit"}
