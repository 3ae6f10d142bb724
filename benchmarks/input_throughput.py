"""Measures make_dataset images/s on small stored JPEG records.

  .venv/bin/python benchmarks/input_throughput.py --csv /work/shared/data/fashion_small12k/meta.csv \
      --rows 2000 --stored_size 64

Writes (or reuses) records in --workdir, then times full passes of the training input
pipeline after one warm-up batch, and prints a small table.
"""

import argparse
import pathlib
import tempfile
import time

from input_pipeline import catalogue
from input_pipeline import pipeline
from input_pipeline import records
from input_pipeline import tokenizer as tokenizer_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--csv", default="/work/shared/data/fashion_small12k/meta.csv")
  parser.add_argument("--rows", type=int, default=2000)
  parser.add_argument("--stored_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--workdir", default=str(pathlib.Path(tempfile.gettempdir()) / "oclear_bench"))
  args = parser.parse_args()

  cols = catalogue.CatalogueColumns(title="productDisplayName", label="articleType")
  read = catalogue.read_catalogue(args.csv, cols, max_rows=args.rows)
  tok = tokenizer_lib.TitleTokenizer.train([r.title for r in read.rows])
  out = pathlib.Path(args.workdir) / f"records_{args.rows}_{args.stored_size}"
  start = time.perf_counter()
  summary = records.write_records(read.rows, out, tokenizer=tok, max_title_len=32,
                                  num_shards=8, stored_image_size=args.stored_size)
  print(f"write_records: {time.perf_counter() - start:.1f} s for {summary['rows_in']} rows")

  print(f"{'preprocess':<60} {'cache':>5} {'images/s':>9}")
  specs = [f"decode|resize({args.stored_size})|value_range(-1, 1)",
           f"decode|random_resized_crop({args.stored_size})|flip_lr|value_range(-1, 1)"]
  for spec in specs:
    for cache in (False, True):
      ds = pipeline.make_dataset(out, "train", batch_size=args.batch_size, preprocess=spec,
                                 shuffle=True, repeat=True, cache_decoded=cache)
      it = pipeline.numpy_batches(ds)
      next(it)  # Warm-up: graph tracing, first file opens, shuffle buffer fill.
      start = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      rate = args.batches * args.batch_size / (time.perf_counter() - start)
      print(f"{spec:<60} {str(cache):>5} {rate:>9.0f}")


if __name__ == "__main__":
  main()
