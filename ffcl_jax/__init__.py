"""ffcl_jax: feature fusion-based collaborative learning (FFCL) for knowledge distillation in JAX.

A teacher and a student network are trained together from scratch in one compiled step; their
last-stage features are fused into a third classifier, and the three teach each other (see
`ffcl_jax.losses` and docs/method.md).
"""

__version__ = "0.1.0"
