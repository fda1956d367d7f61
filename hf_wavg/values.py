"""Small predicates on values read from logs and records (no imports beyond the standard library)."""

from __future__ import annotations

import math
from typing import Any


def is_finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite; booleans, strings and None are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
