"""What shapes a run's numbers besides its config: the library versions and the hardware.

Training a model is chaotic: the same seed and data on another CPU (other vector kernels, another BLAS code path)
or another library release give a slightly different model, and a tiny organism amplifies that into different
rates. Every run and organism build records both, so that two sets of numbers can be told apart.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pairtrace import __version__

NUMERIC_LIBRARIES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "numpy",
                     "scipy", "scikit-learn")
"""The libraries whose releases can change trained models, samples or statistics."""


def library_versions(names: tuple[str, ...] = NUMERIC_LIBRARIES) -> dict[str, str]:
    """pairtrace's, Python's and each installed library's version (libraries not installed are left out)."""
    out = {"pairtrace": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; elsewhere ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware() -> dict[str, Any]:
    """CPU model and cores, torch's thread count and CPU instruction set, and the CUDA devices if any."""
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": capability() if capability is not None else None, "cuda_devices": cuda}
