"""Plain-text tables of retrieval metrics: one row per model, each followed by its title-feedback row."""
from __future__ import annotations

from collections.abc import Sequence

FEEDBACK_ROW = "  + title feedback re-ranking"


def with_feedback_rows(named: Sequence[tuple[str, dict[str, float]]]) -> list[tuple[str, dict[str, float]]]:
  """Each (name, metrics) followed by its prf/ metrics (title feedback) as a row of their own, where present."""
  rows = []
  for name, metrics in named:
    rows.append((name, metrics))
    if "prf/map@r" in metrics:
      rows.append((FEEDBACK_ROW, {k[len("prf/"):]: v for k, v in metrics.items() if k.startswith("prf/")}))
  return rows


def metrics_table(named: Sequence[tuple[str, dict[str, float]]], ks: Sequence[int] = (1, 5, 10), *,
                  columns: Sequence[tuple[str, str]] = (("mAP@R", "map@r"),
                                                        ("ScaNN R@10 vs exact", "scann/recall_vs_exact@10"))) -> str:
  """Recall@k for `ks`, then each (header, metric key) of `columns`; missing values print as nan."""
  headers = [f"Recall@{k}" for k in ks] + [header for header, _ in columns]
  keys = [f"recall@{k}" for k in ks] + [key for _, key in columns]
  rows = [[name] + [f"{metrics.get(key, float('nan')):.3f}" for key in keys]
          for name, metrics in with_feedback_rows(named)]
  header = ["model"] + headers
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
