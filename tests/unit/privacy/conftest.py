"""Privacy tests share 2 cores with other test processes: one torch thread."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
