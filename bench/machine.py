"""What every benchmark's JSON says about the machine it ran on."""

from __future__ import annotations

import os
import platform
from typing import Any

import onnxruntime as ort


def machine_info() -> dict[str, Any]:
    """Cores, processor, Python and ONNX Runtime: what figures from different runs depend on."""
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }
