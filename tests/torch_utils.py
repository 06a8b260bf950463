"""Helpers shared by the parity tests (torch lives only in tests/, benchmarks/ and convert/)."""
from __future__ import annotations

import numpy as np
import torch


def randomize_batchnorm_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every (Frozen)BatchNorm non-trivial statistics so a parity test exercises them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "running_mean") and hasattr(mod, "running_var") and mod.running_mean is not None:
                n = mod.running_mean.shape[0]
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                mod.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)
