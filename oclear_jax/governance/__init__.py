"""Category governance: a raw, noisy catalogue in; curated same-product categories out.

Classification-based retrieval learns one class centre per category, so every category must mean
one product and every product must have one category. Raw catalogues break both: wrong labels,
one product under several ids, one id over several products, duplicates, a long tail of tiny
labels and a few huge ones. `curate.curate_categories` repairs that in steps, each switchable off
in `config.governance`:

  featurize    image descriptors, perceptual/content hashes (per item)   featurize.py
  duplicates   exact and near duplicates                                  duplicates.py
  (space)      PCA + within-category whitening: distances in spread units category_space.py
  split        labels whose members form separate clusters                split.py
  merge        labels that denote one product (kNN over centroids)        merge.py
  outliers     items far from their category: relabelled or dropped       outliers.py
  long tail    tiny categories merged or dropped, heads capped, weights   long_tail.py

Per-item passes run through an executor (`executors.py`: in process, or Apache Beam with any
runner, `beam_pipeline.py`); per-category steps work on collected centroids, and every "nearest other
categories" question goes through a ScaNN index over them (`centroid_search.py`), so no step costs
items x categories (`curate.py` runs the rounds, `finalize.py` the decisions, `summary.py` the counts and the category map, `report.py` the
report; `step_clock.py` times each step). `quality.py` scores a run against planted ground truth and `planted_noise.py` plants it
into a clean catalogue (tests, benchmarks/governance_quality.py). `command.run` is `--mode=govern`:
it writes the curated catalogue, the category map, the per-item decision log, sampling weights,
a report with plots, and the curated records. With `categories='product'` (`product_govern.py`) the
categories are same-product groups built from titles instead (`product_categories.py`: same title,
colour variants, single products), split by whole category into train / val / eval.
"""
