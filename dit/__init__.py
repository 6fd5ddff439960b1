"""dit: Diffusion Transformers with every conditioning variant of the DiT paper."""

__version__ = "0.1.0"
