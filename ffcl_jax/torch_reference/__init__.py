"""PyTorch reference of FFCL, written from docs/method.md: the baseline every comparison uses.

`models.py` (model zoo, fusion module, cohort), `losses.py` (every loss term and the cohort
objective). Module and parameter names mirror the Flax models, so that
`ffcl_jax.convert` maps weights by name. Install with `pip install -e .[torch]`.
"""
