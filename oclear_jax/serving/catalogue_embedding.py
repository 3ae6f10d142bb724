"""A catalogue CSV embedded by a trained run: every readable row as a query, a document, or both.

What `--mode=embed` writes and `--mode=index` searches. With N processes each decodes and embeds
its round-robin share of every batch of rows (`host_gather`), and the rows are gathered back into
CSV order on every process. Unreadable rows are skipped and listed with their reasons.
"""
from __future__ import annotations

import csv
import dataclasses

import jax
import ml_collections
import numpy as np
import tqdm

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import images as images_lib
from input_pipeline import paths
from oclear_jax.distributed import host_gather
from oclear_jax.distributed import multihost
from oclear_jax.serving import trained_run


@dataclasses.dataclass
class EmbeddedCatalogue:
  """The embedded rows of a catalogue, in CSV order, and what was skipped."""
  rows: list[catalogue_lib.CatalogueRow]
  outputs: dict[str, np.ndarray]  # {output: f32[n, ...]}: 'query', 'doc' (and 'pooled', 'title': views_and_towers)
  skipped: list[dict]  # {"id", "image", "reason"[, "detail"]}; "line" too for rows with an empty id or image
  counts: dict[str, int]

  ids = property(lambda self: [r.id for r in self.rows])
  titles = property(lambda self: [r.title for r in self.rows])
  labels = property(lambda self: [r.label for r in self.rows])  # '' everywhere without a label column
  image_paths = property(lambda self: [r.image_path for r in self.rows])
  queries = property(lambda self: self.outputs.get("query"))  # f32[n, d]; None when not asked for
  documents = property(lambda self: self.outputs.get("doc"))


def catalogue_columns(config: ml_collections.ConfigDict, *, with_label: bool = False) -> catalogue_lib.CatalogueColumns:
  """The CSV columns to read: id, image, title (None if ''), and the label only when asked for."""
  names = config.data.columns
  return catalogue_lib.CatalogueColumns(id=names.id, image=names.image, title=names.title or None,
                                        label=(names.label or None) if with_label else None)


def csv_header(csv_path: str) -> list[str]:
  """The column names of a CSV (as `catalogue.read_catalogue` reads them)."""
  with catalogue_lib.open_text(check_catalogue(csv_path)) as f:
    return next(csv.reader(f), [])


def check_catalogue(csv_path: str) -> str:
  if not paths.exists(csv_path) or paths.isdir(csv_path):
    raise FileNotFoundError(f"catalogue {csv_path} not found; pass --catalogue=DIR/meta.csv (a CSV whose image "
                            f"paths are relative to its folder)")
  return paths.resolve(csv_path)  # gs://bucket/cat.csv stays a URL


def read_rows(config: ml_collections.ConfigDict, csv_path: str, *,
              columns: catalogue_lib.CatalogueColumns | None = None) -> catalogue_lib.CatalogueReadResult:
  """The catalogue's usable rows (`columns` default: id, image, title of `catalogue_columns`)."""
  return catalogue_lib.read_catalogue(check_catalogue(csv_path), columns or catalogue_columns(config),
                                      eval_fraction=config.data.eval_fraction, split_seed=config.seed)


def embed_catalogue(trained: trained_run.TrainedModel, csv_path: str, *, heads: tuple[str, ...] = ("query", "doc"),
                    with_label: bool = False, progress: bool = True) -> EmbeddedCatalogue:
  """Embeds every readable row of `csv_path` through `heads` ('query', 'doc' or both) in batches."""
  read = read_rows(trained.config, csv_path, columns=catalogue_columns(trained.config, with_label=with_label))
  head = "query_and_doc" if set(heads) == {"query", "doc"} else heads[0]
  embedded = embed_rows(trained, read, head, progress=progress)
  if head == "query_and_doc":
    both = embedded.outputs.pop(head)
    embedded.outputs.update(query=both[:, 0], doc=both[:, 1])
  return embedded


def embed_rows(trained: trained_run.TrainedModel, read: catalogue_lib.CatalogueReadResult, head: str, *,
               progress: bool = True) -> EmbeddedCatalogue:
  """Embeds `read.rows` through `trained`'s `head` (`trained_run.HEADS`) in batches; unreadable images skipped."""
  config = trained.config
  embedder = trained.mesh_embedder(head)
  batch_size = config.eval.batch_size
  local = {"row": [], "outputs": [], "failed": []}  # this process's share: CSV positions, outputs, failures
  for start in tqdm.tqdm(range(0, len(read.rows), batch_size), desc=f"embed catalogue ({head})", unit="batch",
                         disable=not progress or jax.process_index() != 0):
    positions = start + host_gather.share_rows(len(read.rows[start:start + batch_size]))
    rows = [read.rows[i] for i in positions]
    images, kept, failed = images_lib.preprocess_image_files([r.image_path for r in rows], config.data,
                                                             first_index=start)
    for position, reason in failed:
      row = rows[position]
      local["failed"].append((int(positions[position]), {"id": row.id, "image": row.image_path,
                                                         "reason": reason.split(":")[0], "detail": reason}))
    batch = {"image": images, "title_tokens": trained.tokenize([rows[i].title for i in kept])} if kept else None
    out = embedder.step(batch)  # every process, every chunk: a collective (rows: this process's share, maybe 0)
    if out is not None:
      local["row"].append(positions[kept])
      local["outputs"].append({k: np.asarray(v, np.float32) for k, v in out.items()})
  kept_rows, outputs, failed = _gathered(local, read.rows)
  skipped = list(read.skipped) + failed
  counts = {"rows_read": read.counts["rows_read"], "embedded": len(kept_rows), "skipped": len(skipped),
            "empty_titles": sum(not r.title for r in kept_rows)}
  return EmbeddedCatalogue(rows=kept_rows, outputs=outputs, skipped=skipped, counts=counts)


def _gathered(local: dict, rows: list) -> tuple[list, dict, list[dict]]:
  """(embedded rows, {output: f32[n, ...]}, failures) of every process, in CSV order.

  Every process took part in every step that embedded any row (a collective), so all hold the same
  outputs; none at all (no readable row anywhere) gives no outputs.
  """
  mine = {"row": np.concatenate(local["row"]) if local["row"] else np.zeros(0, np.int64)}
  names = local["outputs"][0].keys() if local["outputs"] else ()
  mine.update({name: np.concatenate([out[name] for out in local["outputs"]]) for name in names})
  every = host_gather.gather_rows(mine)
  order = np.argsort(every["row"], kind="stable")
  failed = sorted((f for part in multihost.gather_objects(local["failed"]) for f in part), key=lambda f: f[0])
  outputs = {name: every[name][order] for name in names}
  return [rows[i] for i in every["row"][order]], outputs, [f for _, f in failed]
