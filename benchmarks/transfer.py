r"""Transfer table: a trained run on its own held-out products and on catalogues of other naming styles.

  .venv/bin/python benchmarks/transfer.py --workdir=workdirs/products          # configs/fashion_products.py's run

Every cell comes from `python -m oclear_jax.main --mode=evaluate` (the command a user runs; its
evaluate.json), so the frozen tower's row is measured in the same run as the trained one, on the
same rows:
  in domain          the run's own eval split (held-out products; governed labels)
  flipkart1k         another retailer (../shared/data/flipkart1k, its README's protocol: every product a
                     query against all others, same category_l2 = relevant); never trained on
  myntra, renamed    the run's eval split with every title rewritten into another naming style
                     ("Puma Men Black T-shirt" -> "black t-shirt from puma, for men"): the same photos, other
                     names (`renamed_title`)
each with image+title documents and with image-only documents (the title column emptied), and each
row followed by its title-feedback re-ranking. Targets (issue 26): trained >= frozen mAP@R on every
out-of-domain set; image+title >= image only; in domain, R@1 >= frozen + 0.05.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import text_table  # noqa: E402

FLIPKART = os.path.join(REPO, "..", "shared", "data", "flipkart1k", "meta.csv")
GENDERS = ("Men", "Women", "Boys", "Girls", "Unisex", "Kids")
GOVERNED = ["--config.data.columns.id=id", "--config.data.columns.image=image", "--config.data.columns.label=label",
            "--config.data.columns.kind=kind", "--config.data.columns.split=split"]


def renamed_title(title: str) -> str:
  """Myntra's "Brand Gender Colour... Type" as "colour... type from brand, for gender" (lower case)."""
  words = title.split()
  at = next((i for i, w in enumerate(words) if w in GENDERS), None)
  if at is None or at == 0 or at == len(words) - 1:
    return title.lower()
  return f"{' '.join(words[at + 1:])} from {' '.join(words[:at])}, for {words[at].lower()}".lower()


def renamed_catalogue(workdir: str, path: str) -> str:
  """The run's governed catalogue with every title renamed (same ids, images, labels, splits)."""
  source = os.path.join(workdir, "governance", "curated_catalogue.csv")
  with open(source, encoding="utf-8") as f:
    reader = csv.DictReader(f)
    rows, header = list(reader), reader.fieldnames
  root = os.path.dirname(source)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, header)
    writer.writeheader()
    for row in rows:
      image = row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
      writer.writerow({**row, "title": renamed_title(row["title"]), "image": image})
  return path


def evaluate(workdir: str, output: str, args: list[str]) -> tuple[dict, float]:
  """evaluate.json of one --mode=evaluate run, and its wall time."""
  start = time.time()
  command = [sys.executable, "-m", "oclear_jax.main", "--mode=evaluate", f"--workdir={workdir}",
             f"--output={output}", *args]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  print(done.stdout.strip().splitlines()[-1], flush=True)
  with open(os.path.join(output, "evaluate.json"), encoding="utf-8") as f:
    return json.load(f), time.time() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "products"))
  parser.add_argument("--flipkart", default=FLIPKART)
  parser.add_argument("--output", default="", help="default: WORKDIR/transfer")
  parser.add_argument("overrides", nargs="*", help="--config.* overrides applied to every evaluation")
  args = parser.parse_args()
  out = args.output or os.path.join(args.workdir, "transfer")
  os.makedirs(out, exist_ok=True)
  renamed = renamed_catalogue(args.workdir, os.path.join(out, "renamed_catalogue.csv"))
  sets = {
      "in domain": [f"--catalogue={os.path.join(args.workdir, 'governance', 'curated_catalogue.csv')}",
                    "--split=eval", *GOVERNED],
      "flipkart1k": [f"--catalogue={args.flipkart}", "--config.data.columns.id=uniq_id",
                     "--config.data.columns.title=product_name", "--config.data.columns.label=category_l2",
                     "--config.data.columns.image=image", "--config.data.columns.colour="],
      "myntra, renamed": [f"--catalogue={renamed}", "--split=eval", *GOVERNED],
  }
  table = []
  for name, set_args in sets.items():
    for docs, title in (("image+title", "title" if name != "flipkart1k" else "product_name"), ("image only", "")):
      folder = os.path.join(out, f"{name.replace(', ', '_').replace(' ', '_')}_{docs.replace('+', '_').replace(' ', '_')}")
      result, seconds = evaluate(args.workdir, folder,
                                 [*set_args, f"--config.data.columns.title={title}", *args.overrides])
      for row in result["rows"]:
        for feedback in ("", "prf/"):
          if f"{feedback}map@r" not in row["metrics"]:
            continue
          m = row["metrics"]
          model = row["name"].split(" (")[0] + (" + PRF" if feedback else "")
          table.append({"set": name, "documents": docs, "model": model,
                        "rows": result["counts"]["embedded"], "R@1": m[f"{feedback}recall@1"],
                        "R@10": m[f"{feedback}recall@10"], "mAP@R": m[f"{feedback}map@r"], "s": round(seconds)})
  text_table.print_table(table, ["set", "documents", "model", "rows", "R@1", "R@10", "mAP@R", "s"])


if __name__ == "__main__":
  main()
