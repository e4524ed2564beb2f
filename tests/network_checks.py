"""Checks shared by the network tests (test_layers, test_networks, test_prompt_encoders)."""

from __future__ import annotations

from torch import nn

# Same float32 computation routed through different kernels (baddbmm vs addmm, masked vs cropped
# attention): agreement to a few ulps of O(1) activations.
KERNEL_TOL = 1e-5


def assert_all_params_get_grad(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
