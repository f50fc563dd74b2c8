"""Neural Implicit Segmentation Functions (Stolt-Ansó et al., MICCAI 2023) for MONAI.

Subpackages: ``networks`` (NISFNet, LatentTable), ``transforms`` (physical coordinates, point sampling,
input checks), ``losses``, ``engines`` (trainer, latent-optimising evaluator), ``inferers``,
``handlers`` and ``data`` (datalists, synthetic cohort).
"""

__version__ = "0.14.0"
