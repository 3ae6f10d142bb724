"""The right-aligned text table the benchmarks print (one place, so every table reads alike)."""
from __future__ import annotations

import sys


def print_table(rows: list[dict], columns: list[str], float_format: str = "{:.3f}") -> None:
  """One line per row; floats with `float_format`, ints with thousands separators, the rest as str."""
  fmt = {float: float_format, int: "{:,}"}
  cells = [[fmt.get(type(r[c]), "{}").format(r[c]) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for row in cells:
    print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
  sys.stdout.flush()
