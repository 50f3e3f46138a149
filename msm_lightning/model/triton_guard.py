"""triton beside TensorFlow: make its import fail cleanly instead of crashing the process.

HEAR's tools (hearvalidator, heareval's embeddings runner) import TensorFlow before they import a HEAR
module. In such a process, loading triton's native library (which PyTorch's CUDA builds install) kills it
with a segmentation fault. triton gets imported by mamba-ssm's fused kernels and by torch._dynamo, which
PyTorch imports the first time a model is built on the meta device (as bundle checks do). So, with
TensorFlow loaded and triton not, `import triton` is made an ImportError: PyTorch then treats triton as
absent and the Mamba encoder takes its portable path.
"""

from __future__ import annotations

import sys


def refuse_triton_beside_tensorflow() -> bool:
    """If TensorFlow is loaded and triton is not, make `import triton` raise ImportError; whether it did."""
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        sys.modules["triton"] = None  # an ImportError on import, by Python's rules
        return True
    return False
