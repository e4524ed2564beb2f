"""llmdpd-pl: LLM-Driven Policy Diffusion (arXiv 2509.00347) in PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Policy", "__version__", "load_policy"]

if TYPE_CHECKING:
    from llmdpd_pl.pretrained import Policy, load_policy


def __getattr__(name: str) -> Any:
    """``load_policy`` and ``Policy`` on first use: ``import llmdpd_pl`` stays free of torch and Lightning."""
    if name in ("Policy", "load_policy"):
        from llmdpd_pl import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'llmdpd_pl' has no attribute {name!r}")
