"""Retrieval evaluation: exact and ScaNN search, metrics, and report figures.

Product1M's metrics are `oclear_jax.retrieval.product1m_metrics.product1m_metrics` (not
re-exported here: the function shares its module's name).
"""
from oclear_jax.retrieval.exact_search import exact_top_k
from oclear_jax.retrieval.exact_search import exact_top_k_blocks
from oclear_jax.retrieval.metrics import map_at_r
from oclear_jax.retrieval.metrics import num_relevant
from oclear_jax.retrieval.metrics import r_precision
from oclear_jax.retrieval.metrics import recall_against_exact
from oclear_jax.retrieval.metrics import recall_at_k
from oclear_jax.retrieval.metrics import relevance_matrix
from oclear_jax.retrieval.metrics import retrieval_metrics
from oclear_jax.retrieval.plots import contact_sheet
from oclear_jax.retrieval.plots import plot_recall_at_k
from oclear_jax.retrieval.scann_search import ScannIndex

__all__ = [
    "ScannIndex",
    "contact_sheet",
    "exact_top_k",
    "exact_top_k_blocks",
    "map_at_r",
    "num_relevant",
    "plot_recall_at_k",
    "r_precision",
    "recall_against_exact",
    "recall_at_k",
    "relevance_matrix",
    "retrieval_metrics",
]
