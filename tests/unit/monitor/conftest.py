"""Shared fixtures of the monitor tests: constructed feature records."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from shiftguard.monitor.features import BY_NAME, FEATURE_NAMES


def frame(n: int, seed: int, shift: float = 0.0, scanner: str = "Skyra") -> pd.DataFrame:
    """Records whose numerical features are N(shift, 1) and whose scanner is ``scanner``."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {}
    for name in FEATURE_NAMES:
        f = BY_NAME[name]
        if f.kind == "numerical":
            data[name] = rng.normal(shift if f.group in ("image", "metadata") else 0.0, 1.0, n)
        elif name == "scanner_model":
            data[name] = [scanner] * n
        elif name == "manufacturer":
            data[name] = ["SIEMENS" if scanner == "Skyra" else "Canon"] * n
        elif name == "sex":
            data[name] = rng.choice(["F", "M"], n)
        else:
            data[name] = rng.choice(["40-49", "50-59", "60-69"], n)
    out = pd.DataFrame(data)
    out["site"] = "a"
    out["processed_at"] = "2026-11-01T00:00:00Z"
    return out


@pytest.fixture(scope="session")
def make_frame() -> Any:
    """:func:`frame`, for tests to build records with."""
    return frame
