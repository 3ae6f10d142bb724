r"""`--mode=govern`: raw catalogue -> curated catalogue, category map, decision log, report, records.

  python -m oclear_jax.main --mode=govern --config=configs/demo.py --workdir=workdirs/demo
  python -m oclear_jax.main --config=configs/demo.py --workdir=workdirs/demo --config.data.governed=True

Reads the raw catalogue exactly as `--mode=train` would (config.data: the built-in catalogue, or a
CSV with its column mapping) and writes, under {workdir}/governance/:
  curated_catalogue.csv  id,image,title,label,kind,split: the kept rows with curated labels
  decisions.csv          one row per catalogue row: kept / relabelled / dropped, the step and why
  category_map.csv       raw label -> curated category (';' between the parts of a split label), why
  class_weights.json     class-balanced sampling weights, used by the input pipeline
  summary.json           counts per step, bad input, the settings
  report.md, report.html class sizes before/after, decisions per step, thumbnails of examples
then writes the curated records ({workdir}/records, or config.data.records_dir) that training with
config.data.governed=True reads. A URL workdir (gs://bucket/run) gets the same files: they are
written to a local staging folder first (Beam, matplotlib and the feature cache want local files)
and copied to {workdir}/governance at the end, summary.json last, before the records are written.

With config.governance.categories='product' the labels are product categories built from the titles
(same title, colour variants, single products) over data's catalogue and config.governance.extra_catalogues,
split by whole category into train / val / eval; see product_govern.py for the steps and the columns.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator

import ml_collections

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import paths as paths_lib
from oclear_jax import run_data
from oclear_jax.distributed import multihost
from oclear_jax.governance import curate
from oclear_jax.governance import decisions as decisions_lib
from oclear_jax.governance import executors
from oclear_jax.governance import product_govern
from oclear_jax.governance import report
from oclear_jax.governance import settings as settings_lib


def read_raw_catalogue(data: ml_collections.ConfigDict, workdir: str, seed: int, *, progress: bool = True):
  """The raw catalogue of `data` (generating the built-in one when configured)."""
  if data.source == "synthetic":
    run_data.generate_builtin_catalogue(data, workdir, progress=progress)
  csv_path, _ = run_data.catalogue_paths(data, workdir)
  columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in data.columns.to_dict().items()})
  return csv_path, catalogue_lib.read_catalogue(csv_path, columns, eval_fraction=data.eval_fraction, split_seed=seed,
                                                max_rows=data.max_rows or None)


def write_outputs(out_dir: str, result, rows, settings: settings_lib.GovernanceSettings, executor) -> dict[str, str]:
  """The record-writing pass (through the executor) and the small files."""
  os.makedirs(out_dir, exist_ok=True)
  size = settings.chunk_size
  chunks = [(list(rows[i:i + size]), result.decisions[i:i + size]) for i in range(0, len(rows), size)]
  parts = executor.map_chunks("write curated rows", decisions_lib.format_chunk, chunks,
                              sizes=[len(c[0]) for c in chunks])
  paths = {name: os.path.join(out_dir, name) for name in (
      "curated_catalogue.csv", "decisions.csv", "category_map.csv", "class_weights.json", "summary.json")}
  for name, columns, index in (("curated_catalogue.csv", decisions_lib.CURATED_COLUMNS, 0),
                               ("decisions.csv", decisions_lib.DECISION_COLUMNS, 1)):
    tmp = paths[name] + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      f.write(decisions_lib.header(columns))
      for part in parts:
        f.write(part[index])
    os.replace(tmp, paths[name])  # A reader never sees half a catalogue.
  with open(paths["category_map.csv"], "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=decisions_lib.CATEGORY_MAP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.category_map)
  with open(paths["class_weights.json"], "w", encoding="utf-8") as f:
    json.dump({"scheme": f"n ** -{settings.balance_power}, scaled so the largest weight is 1",
               "weights": result.weights}, f, indent=1, ensure_ascii=False)
  return paths


def _remove_empty_staging(out_dir: str) -> None:
  staging = os.path.join(out_dir, "beam_staging")
  if os.path.isdir(staging) and not os.listdir(staging):
    os.rmdir(staging)


@contextlib.contextmanager
def _output_folder(workdir: str, files: dict[str, str]) -> Iterator[str]:
  """{workdir}/governance, made; for a URL workdir a local staging folder, copied there on exit.

  `files` (name -> path, filled in the block) is rewritten to the copied paths on exit; a block
  that raises copies nothing, so a bucket never holds half a governance output.
  """
  final = paths_lib.join(workdir, "governance")
  if not paths_lib.is_remote(workdir):
    os.makedirs(final, exist_ok=True)
    yield final
    return
  with tempfile.TemporaryDirectory(prefix="oclear-governance-") as local:
    yield local
    _remove_empty_staging(local)
    paths_lib.copy_tree(local, final, last="summary.json")
    files.update({name: path.replace(local, final, 1) for name, path in files.items()
                  if isinstance(path, str) and path.startswith(local)})


def write_curated_records(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> str:
  """Records from the curated catalogue (`prepare_data` with data.governed); every process calls it."""
  data = config.data.copy_and_resolve_references()
  data.governed = True
  data.max_rows = 0  # The curated catalogue is already cut to max_rows per catalogue read.
  return run_data.prepare_data(data, workdir, seed=config.seed, progress=progress).records_dir


def run_products(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
                 write_records: bool = True) -> dict[str, Any]:
  """`categories='product'`: product categories over data's catalogue and the extra ones (product_govern.py)."""
  settings = settings_lib.from_config(config.governance)
  data = config.data
  if data.source == "synthetic":
    run_data.generate_builtin_catalogue(data, workdir, progress=progress)
  root = data.root or paths_lib.join(workdir, "catalogue")
  csv_path = data.csv if os.path.isabs(data.csv) or paths_lib.is_remote(data.csv) else paths_lib.join(root, data.csv)
  columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in data.columns.to_dict().items()})
  files: dict[str, str] = {}
  with _output_folder(workdir, files) as out_dir:
    executor = executors.make_executor(settings, os.path.join(out_dir, "beam_staging"), progress=progress)
    out = product_govern.run(csv_path, columns, settings, executor, out_dir, seed=config.seed,
                             max_rows=data.max_rows or None)
    _remove_empty_staging(out_dir)
    files.update(out["paths"])
  out["paths"] = files
  if write_records:
    out["paths"]["records"] = write_curated_records(config, workdir, progress)
  c = out["counts"]
  if progress:
    print(f"{c['rows']} rows from {len(out['sources'])} catalogue(s) -> {c['categories_categories']} product "
          f"categories ({c['categories_colour_variants_categories']} colour-variant, "
          f"{c['categories_same_title_categories']} same-title, {c['categories_single_product_categories']} single); "
          f"split rows train {c['split_train']}, val {c['split_val']}, eval {c['split_eval']}, dropped from "
          f"training {c['split_dropped']}; {c['steps']}\nreport: {out['paths']['markdown']}\n"
          f"curated catalogue: {out['paths']['curated_catalogue.csv']}\n"
          f"train on it: --config.data.governed=True --workdir={workdir}")
  return out


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        write_records: bool = True) -> dict[str, Any]:
  """Governs the catalogue of `config.data`; returns the counts and the output paths."""
  settings = settings_lib.from_config(config.governance)
  if settings.categories == "product":
    return run_products(config, workdir, progress=progress, write_records=write_records)
  csv_path, read = read_raw_catalogue(config.data, workdir, config.seed, progress=progress)
  paths: dict[str, str] = {}
  with _output_folder(workdir, paths) as out_dir:
    executor = executors.make_executor(settings, os.path.join(out_dir, "beam_staging"), progress=progress)
    result = curate.curate_categories(read.rows, settings, executor,
                                      cache_dir=settings.feature_cache or os.path.join(out_dir, "feature_cache"))
    paths.update(write_outputs(out_dir, result, read.rows, settings, executor))
    _remove_empty_staging(out_dir)
    with open(paths["summary.json"], "w", encoding="utf-8") as f:
      json.dump({"catalogue": csv_path, "reader": read.counts, "counts": result.counts,
                 "settings": dataclasses.asdict(settings)}, f, indent=1, ensure_ascii=False, default=str)
    paths.update(report.write_report(out_dir, result, read.rows, settings, read.counts))
  if write_records:
    paths["records"] = write_curated_records(config, workdir, progress)
  c = result.counts
  if progress:
    print(f"governed {c['rows_governed']} of {c['rows']} rows: {c['labels_before']} raw labels -> "
          f"{c['categories_after']} categories; {c['actions']}\n"
          f"report: {paths['markdown']}\ncurated catalogue: {paths['curated_catalogue.csv']}\n"
          f"train on it: --config.data.governed=True --workdir={workdir}")
  return {"counts": result.counts, "paths": paths, "result": result,
          "staged_bytes": getattr(executor, "staged_bytes", 0), "shuffle_bytes": getattr(executor, "shuffle_bytes", 0)}


def run_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`--mode=govern` on every process of a run."""
  # One process governs (it writes the shared governance/ files and uses no device); its outcome
  # reaches every process, which then all join the records step (a collective of its own).
  multihost.run_on_process_zero(run, config, workdir, write_records=False)
  write_curated_records(config, workdir)
