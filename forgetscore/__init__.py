"""forgetscore: which training images did a text-to-image diffusion model draw on?

Attribution by unlearning: forget a generated picture with a Fisher-preconditioned
Newton step on the cross-attention key/value weights, then rank training images by
how much their own diffusion loss rose. The heavy parts run as fused kernels
(:mod:`forgetscore.kernels`).
"""
__version__ = "0.1.0"
