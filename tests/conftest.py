"""Test-suite settings: one torch thread per test process.

The suite runs on two pytest-xdist workers on two cores; two threads per worker oversubscribe the cores and
make OpenMP kernels wait for each other (10x slower in places).
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
