"""llmdpd-pl: LLM-Driven Policy Diffusion (arXiv 2509.00347) in PyTorch Lightning."""

__version__ = "0.1.0"
