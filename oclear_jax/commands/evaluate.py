r"""`--mode=evaluate`: a run, and the frozen towers it started from, on any labelled catalogue.

  python -m oclear_jax.main --mode=evaluate --workdir=W                      # the run's own eval split
  python -m oclear_jax.main --mode=evaluate --workdir=W --catalogue=DIR/meta.csv \
      --config.data.columns.label=category --config.data.columns.title=name [--split=eval] [--output=OUT]
  python -m oclear_jax.main --mode=evaluate --config=configs/catalogue.py --catalogue=CSV --output=OUT  # frozen only

Every labelled row is a query (its image) against every other row as a document (image + title),
leave-one-out; a catalogue with a `kind` column (`config.data.columns.kind`) searches its query rows
against its documents. Without `--catalogue` the run's own catalogue is read (the governed one when
the run trained on governance's categories) and `--split` defaults to `eval`, the run's held-out
products; with one, every row counts unless `--split` names a value of its split column
(`--split=all`: every row). Rows without a label are skipped and counted.

The table has the frozen pretrained tower's row (its pooled features, cosine, for queries and
documents), the run's row, and the run weighed on this catalogue (`serving.composition`: how much of
its trained image part and title parts the catalogue's own titles vouch for, no label read; what
--mode=index serves), each followed by the same ranking re-ranked by title feedback
(`eval.title_feedback_docs`, `eval.title_feedback_weight`), scored by `serving.catalogue_eval`. Each
model embeds the rows once (a frozen run's pass gives the frozen row too). `OUT` (default
`W/evaluate/<catalogue name>`) gets `evaluate.json` (every metric of every row, counts, skipped rows
with reasons) and `contact_sheet.png` (the first queries and their top documents; green = same label).
The run's model is its selected checkpoint (`trained_run.restore_trained_model`), parameters only.
"""
from __future__ import annotations

import json
import os
import sys
from typing import TextIO

import jax
import ml_collections
import numpy as np

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import images as images_lib
from input_pipeline import paths
from oclear_jax.distributed import multihost
from oclear_jax import run_data
from oclear_jax.distributed import host_gather
from oclear_jax.retrieval import evaluation
from oclear_jax.retrieval import tables
from oclear_jax.serving import catalogue_embedding
from oclear_jax.serving import catalogue_eval
from oclear_jax.serving import composition
from oclear_jax.serving import trained_run
from oclear_jax.train import pretrained_towers

RESULT_FILE = "evaluate.json"
CONTACT_SHEET = "contact_sheet.png"
ALL_SPLITS = "all"


def catalogue_and_columns(config: ml_collections.ConfigDict, workdir: str | None,
                          catalogue: str | None) -> tuple[str, catalogue_lib.CatalogueColumns, str | None]:
  """(CSV, its columns, the default split): the given catalogue (all rows), or the run's own (its eval split)."""
  if catalogue:
    csv_path = catalogue_embedding.check_catalogue(catalogue)
    header = set(catalogue_embedding.csv_header(csv_path))
    names = config.data.columns
    columns = catalogue_embedding.catalogue_columns(config, with_label=True)
    optional = {key: names[key] if names[key] in header else None for key in ("kind", "split")}
    return csv_path, catalogue_lib.CatalogueColumns(**{**vars(columns), **optional}), None
  if not workdir:
    raise ValueError("--mode=evaluate needs --catalogue=CSV, or --workdir=W to evaluate on the run's own catalogue")
  if config.data.governed:
    return run_data.governed_catalogue_path(workdir), run_data.GOVERNED_COLUMNS, "eval"
  csv_path, _ = run_data.catalogue_paths(config.data, workdir)
  columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in config.data.columns.to_dict().items()})
  return csv_path, columns, "eval"


def frozen_towers(config: ml_collections.ConfigDict, tokenizer) -> trained_run.TrainedModel:
  """The config's model at initialisation with its pretrained towers loaded: the frozen row's model."""
  model = trained_run.initial_model(config, tokenizer)
  _, shardings = trained_run.abstract_model_params(model.model, config, model.mesh, model.rules)
  state = pretrained_towers.load_pretrained_into_state({"params": {"encoder": model.params}},
                                                       {"params": {"encoder": shardings}}, config.model)
  model.params = state["params"]["encoder"]
  return model


def _frozen_in_run(model_config) -> bool:
  """Does the run's own pass give the frozen row (its towers are the pretrained ones, untouched)?"""
  text_frozen = model_config.fusion == "image_only" or (model_config.text_pretrained and model_config.freeze_text_tower)
  return model_config.image_pretrained and model_config.freeze_image_tower and text_frozen


def run(config: ml_collections.ConfigDict, workdir: str | None, catalogue: str | None, *, output: str | None = None,
        split: str | None = None, progress: bool = True, out: TextIO | None = None) -> dict:
  """Embeds, searches and scores the catalogue for the frozen towers and the run; prints the table, returns
  the result (what `evaluate.json` holds)."""
  out = out or sys.stdout
  workdir = paths.resolve(workdir) if workdir else None
  csv_path, columns, default_split = catalogue_and_columns(config, workdir, catalogue)
  split = default_split if split is None else (None if split == ALL_SPLITS else split)
  output = paths.resolve(output) if output else None
  if output is None:
    if workdir is None:
      raise ValueError("--mode=evaluate without --workdir needs --output=FOLDER for evaluate.json and the sheet")
    name = os.path.splitext(os.path.basename(csv_path))[0] + (f"_{split}" if split else "")
    output = paths.join(workdir, "evaluate", name)
  multihost.run_on_process_zero(paths.check_writable, output, "--output")  # before any restore or embedding
  read, counts = catalogue_eval.labelled_rows(config, csv_path, columns=columns, split=split)  # before any restore
  if not config.model.image_pretrained and workdir is None:
    raise ValueError("config.model.image_pretrained=False: no frozen towers to evaluate; pass --workdir=W of a run")

  models: list[tuple[str, catalogue_embedding.EmbeddedCatalogue, str]] = []  # (name, embedded, view)
  trained = trained_run.restore_trained_model(config, workdir) if workdir else None
  if trained is not None:
    embedded = catalogue_embedding.embed_rows(trained, read, "views_and_towers", progress=progress)
    if _frozen_in_run(config.model):
      models.append(("frozen pretrained (pooled, cosine)", embedded, "frozen"))
    models.append((f"trained (step {trained.step})", embedded, "trained"))
    if composition.has_frozen_tower(config.model):  # the frozen tower to weigh the run's parts against
      models.append(("trained, weighed on this catalogue", embedded, "composed"))
  if config.model.image_pretrained and not (trained is not None and _frozen_in_run(config.model)):
    titles = [r.title for r in read.rows]
    tokenizer = trained.title_tokenizer if trained else run_data.title_tokenizer(config.data, titles)
    frozen = catalogue_embedding.embed_rows(frozen_towers(config, tokenizer), read, "views_and_towers",
                                            progress=progress)
    models.insert(0, ("frozen pretrained (pooled, cosine)", frozen, "frozen"))
  reference = models[-1][1]
  choice = None
  if trained is not None and composition.has_frozen_tower(config.model):
    choice = catalogue_eval.composed(config, reference)
  counts.update(embedded=reference.counts["embedded"], skipped_unreadable=reference.counts["skipped"]
                - len(read.skipped), empty_titles=reference.counts["empty_titles"])
  result = host_gather.computed_once(_score_and_write, config, models, output, {
      "catalogue": csv_path, "split": split or ALL_SPLITS, "workdir": workdir, "counts": counts,
      "checkpoint_step": trained.step if trained else None, "skipped": reference.skipped,
      "composition": choice[1] if choice else None}, choice)
  if jax.process_index() == 0:
    _print(result, config, output, out)
  return result


def _score_and_write(config, models, output: str, described: dict, choice) -> dict:
  """Process 0's part: score every model's rows, write evaluate.json and the contact sheet."""
  def view(embedded, how):
    if how == "frozen":
      return catalogue_eval.frozen_vectors(embedded)
    return choice[2] if how == "composed" else (embedded.outputs["query"], embedded.outputs["doc"])
  scored = [catalogue_eval.score(config, name if how != "composed" else f"{name} ({choice[0].name})",
                                 catalogue_eval.eval_set(embedded, *view(embedded, how)))
            for name, embedded, how in models]
  result = {**described, "rows": [{"name": s.name, "metrics": s.metrics} for s in scored],
            "leave_one_out": bool(scored[-1].metrics["leave_one_out"])}
  paths.makedirs(output)
  paths.write_bytes(paths.join(output, RESULT_FILE), json.dumps(result, indent=2, ensure_ascii=False).encode("utf-8"))
  if config.eval.contact_sheet_queries > 0:
    last, embedded = scored[-1], models[-1][1]  # the served ranking
    wanted = evaluation.contact_sheet_ids(last.eval_set, last.result, config.eval.contact_sheet_queries)
    size = config.data.stored_image_size
    images = {row.id: np.clip((images_lib.load_image(row.image_path, size) + 1.0) * 127.5, 0, 255).astype(np.uint8)
              for row in embedded.rows if row.id in wanted}
    evaluation.write_contact_sheet(last.eval_set, last.result, images, paths.join(output, CONTACT_SHEET),
                                   config.eval.contact_sheet_queries)
  return result


def _print(result: dict, config, output: str, out: TextIO) -> None:
  c = result["counts"]
  how = "leave-one-out" if result["leave_one_out"] else "query rows against documents"
  print(f"\n{result['catalogue']} ({result['split']}): {c['embedded']} labelled rows embedded, {how}; skipped "
        f"{c['skipped_empty_label']} without a label, {c['skipped_unreadable']} unreadable, {c['other_split']} of "
        f"other splits; {c['empty_titles']} empty titles", file=out)
  ks = tuple(k for k in config.eval.ks if k in (1, 5, 10))
  columns = [("mAP@R", "map@r")] + ([("Product1M mAP@10", "map@10")] if 10 in config.eval.cutoffs else [])
  columns.append(("ScaNN R@10 vs exact", "scann/recall_vs_exact@10"))
  print(tables.metrics_table([(row["name"], row["metrics"]) for row in result["rows"]], ks, columns=columns),
        file=out)
  print(f"-> {paths.join(output, RESULT_FILE)}, {paths.join(output, CONTACT_SHEET)}", file=out)
