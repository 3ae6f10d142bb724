"""The governance report: report.md and report.html (same content) with PNG plots and thumbnails.

What a reviewer needs to trust (or tune) a run: how many items each step kept, relabelled or
dropped; the bad input found (unreadable images, empty titles, single-item labels, labels with
conflicting titles, CSV rows the reader skipped); class sizes before and after; the merges and
splits with their evidence; and pictures of examples of each kind of decision.
"""
from __future__ import annotations

import collections
import html
import os
from collections.abc import Sequence
from typing import Any

from oclear_jax.governance import decisions as decisions_lib
from oclear_jax.governance import report_plots

Block = tuple  # ('h', text) | ('p', text) | ('ul', [text]) | ('table', header, rows) | ('img', file, caption)


def _examples(result, rows, limit: int) -> dict[str, list[list[tuple[str, str]]]]:
  """Thumbnail rows for merged, split, relabelled and dropped examples."""
  image_of = {r.id: r.image_path for r in rows}
  by_category = collections.defaultdict(list)
  by_label = collections.defaultdict(list)
  for d in result.decisions:
    if d.action != decisions_lib.DROPPED:
      by_category[d.category].append(d)
    by_label[d.raw_label].append(d)
  tile = lambda d, text: (image_of[d.id], f"{d.id}: {text}")
  merged = []
  for m in result.merges[:limit]:
    row = []
    for labels in (m["left"], m["right"]):
      picks = [d for label in labels for d in by_label.get(label.split("/part")[0], [])
               if d.action != decisions_lib.DROPPED][:2]
      row += [tile(d, f"{d.raw_label} -> {d.category}") for d in picks]
    merged.append(row)
  split = []
  for s in result.splits[:limit]:
    row = []
    for part in s["parts"]:
      picks = [d for d in by_label.get(s["label"], []) if d.category == part][:2]
      row += [tile(d, f"{d.raw_label} -> {d.category}") for d in picks]
    split.append(row)
  relabelled = []
  for d in [d for d in result.decisions if d.step == "outliers" and d.action == decisions_lib.RELABELLED][:limit]:
    peer = next((p for p in by_category.get(d.category, []) if p.id != d.id and p.step != "outliers"), None)
    relabelled.append([tile(d, f"was {d.raw_label}, now {d.category}")] +
                      ([tile(peer, f"a member of {d.category}")] if peer else []))
  dropped_by_step = collections.defaultdict(list)
  for d in result.decisions:
    if d.action == decisions_lib.DROPPED:
      dropped_by_step[d.step].append(d)
  dropped = [[tile(d, f"{step}: {d.reasons[-1]}") for d in items[:limit]]
             for step, items in sorted(dropped_by_step.items())]
  return {"merged": merged, "split": split, "relabelled": relabelled, "dropped": dropped}


def _blocks(result, reader_counts: dict[str, Any], settings, images: dict[str, str]) -> list[Block]:
  c = result.counts
  actions = c["actions"]
  blocks: list[Block] = [
      ("h", "Category governance report"),
      ("p", f"{c['rows']} catalogue rows: {c['rows_governed']} governed ({', '.join(settings.kinds)} of "
            f"{', '.join(settings.splits)}), {c['rows_following']} following their label, "
            f"{c['rows_passthrough']} passed through untouched (other splits). "
            f"{c['labels_before']} raw labels became {c['categories_after']} curated categories."),
      ("table", ("action", "items"), [(k, str(actions.get(k, 0))) for k in decisions_lib.ACTIONS]),
      ("h2", "Bad input (handled, never silently lost)"),
      ("table", ("problem", "count", "what happened"), [
          ("CSV rows skipped by the reader (empty id, image or label)",
           str(sum(v for k, v in reader_counts.items() if k.startswith("skipped_"))), "not read (reader counts)"),
          *[(f"unreadable image: {k}", str(v), "dropped, logged per item") for k, v in
            sorted(c["unreadable_images"].items())],
          ("empty titles", str(c["empty_titles"]), "kept; compared on images alone"),
          *([("unusable exposure values", str(reader_counts.get("invalid_exposure", 0)), "read as 0; row kept")]
            if c.get("exposure") else []),
          ("labels with a single governed item", str(c["singleton_labels"]), "kept unless merged or long tail"),
          ("labels with conflicting titles", f"{c['conflicting_title_labels']} ({c['conflicting_title_items']} items)",
           "examined by split and outlier steps: " + ", ".join(c["conflicting_title_examples"][:8])),
      ]),
      *([("p", f"Exposure: the curated items keep {c['exposure']['kept']:.0f} of {c['exposure']['total']:.0f} "
               f"({c['exposure']['kept'] / max(c['exposure']['total'], 1e-12):.1%}); duplicates and capped heads "
               "keep their most exposed items.")] if c.get("exposure") else []),
      ("h2", "Decisions per step"),
      ("table", ("step/action", "items"), [(k, str(v)) for k, v in sorted(c["steps"].items(), key=lambda kv: -kv[1])]),
  ]
  for name, caption in (("class_sizes.png", "Class sizes before and after (log axes)"),
                        ("decisions.png", "Items per decision")):
    blocks.append(("img", name, caption))
  blocks.append(("h2", "Merges"))
  blocks.append(("p", f"{c['merge_edges']} merge edges (D <= {settings.merge_max_distance} on images and titles and "
                      f"on titles alone, mutual nearest, majority fit)." if settings.merge else
                 "Merging is switched off."))
  if result.merges:
    blocks.append(("table", ("labels", "joined with", "D", "title D"),
                   [(", ".join(m["left"]), ", ".join(m["right"]), f"{m['distance']:.2f}",
                     f"{m['title_distance']:.2f}") for m in result.merges[:50]]))
  blocks.append(("h2", "Splits"))
  blocks.append(("p", f"{c['split_labels']} labels split into separate products." if settings.split else
                 "Splitting is switched off."))
  if result.splits:
    blocks.append(("table", ("label", "parts", "sizes", "effect"),
                   [(s["label"], ", ".join(s["parts"]), str(s["sizes"]),
                     ", ".join(f"{cut['effect']:.1f}" for cut in s["cuts"])) for s in result.splits[:50]]))
  dup = c.get("duplicates") or {}
  blocks += [
      ("h2", "Long tail, duplicates, head cap, sampling weights"),
      ("ul", [f"long tail (< {settings.min_category_size} items): {c['long_tail_merged']} categories merged into a "
              f"neighbour, {c['long_tail_dropped']} dropped" if settings.long_tail else "long tail step off",
              (f"duplicates: {dup.get('exact_pairs', 0)} exact and {dup.get('near_pairs', 0)} near pairs; "
               f"{dup.get('dropped', 0)} items dropped; {dup.get('groups_spanning_categories', 0)} groups span "
               f"categories (kept: their labels disagree); {dup.get('split_buckets', 0)} oversized title buckets checked "
               f"through their image hashes, {dup.get('skipped_buckets', 0)} parts still oversized and skipped") if settings.dedupe else "dedupe step off",
              f"head cap: {settings.max_category_size or 'off'}",
              f"sampling weights n ** -{settings.balance_power} (largest 1): {len(result.weights)} categories, "
              f"smallest weight {min(result.weights.values(), default=1.0):.3f}"]),
  ]
  if result.notes:
    blocks += [("h2", "Notes"), ("ul", list(result.notes))]
  blocks.append(("h2", "Examples"))
  for name, caption in (("merged", "Merged labels (two items from each side)"),
                        ("split", "Split labels (two items per part)"),
                        ("relabelled", "Outliers relabelled (the item, and a member of its new category)"),
                        ("dropped", "Dropped items, by step")):
    if name in images:
      blocks.append(("img", images[name], caption))
  blocks.append(("p", "Files: curated_catalogue.csv, decisions.csv (one row per item), category_map.csv "
                      "(raw label -> category, with the reason), class_weights.json, summary.json."))
  return blocks


def _markdown(blocks: Sequence[Block]) -> str:
  out = []
  for block in blocks:
    kind = block[0]
    if kind == "h":
      out.append(f"# {block[1]}\n")
    elif kind == "h2":
      out.append(f"## {block[1]}\n")
    elif kind == "p":
      out.append(f"{block[1]}\n")
    elif kind == "ul":
      out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
    elif kind == "table":
      header, rows = block[1], block[2]
      cell = lambda v: str(v).replace("|", "\\|")
      out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                           ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]) + "\n")
    elif kind == "img":
      out.append(f"![{block[2]}]({block[1]})\n")
  return "\n".join(out)


def _html(blocks: Sequence[Block]) -> str:
  e = html.escape
  out = ["<!doctype html><meta charset='utf-8'><title>Category governance report</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}</style>"]
  for block in blocks:
    kind = block[0]
    if kind == "h":
      out.append(f"<h1>{e(block[1])}</h1>")
    elif kind == "h2":
      out.append(f"<h2>{e(block[1])}</h2>")
    elif kind == "p":
      out.append(f"<p>{e(block[1])}</p>")
    elif kind == "ul":
      out.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in block[1]) + "</ul>")
    elif kind == "table":
      out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block[1]) + "</tr>" +
                 "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in block[2]) +
                 "</table>")
    elif kind == "img":
      out.append(f"<figure><img src='{e(block[1])}' alt='{e(block[2])}'>"
                 f"<figcaption>{e(block[2])}</figcaption></figure>")
  return "\n".join(out)


def write_report(out_dir: str, result, rows, settings, reader_counts: dict[str, Any]) -> dict[str, str]:
  """Writes the plots, thumbnail sheets, report.md and report.html into out_dir; returns their paths."""
  report_plots.plot_class_sizes(result.sizes_before, result.sizes_after, os.path.join(out_dir, "class_sizes.png"))
  report_plots.plot_decisions(result.counts["steps"], os.path.join(out_dir, "decisions.png"))
  images = {}
  for name, sheet in _examples(result, rows, settings.report_examples).items():
    file = f"examples_{name}.png"
    if report_plots.thumbnail_sheet(sheet, os.path.join(out_dir, file), f"{name} examples"):
      images[name] = file
  blocks = _blocks(result, reader_counts, settings, images)
  paths = {"markdown": os.path.join(out_dir, "report.md"), "html": os.path.join(out_dir, "report.html")}
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write(_markdown(blocks))
  with open(paths["html"], "w", encoding="utf-8") as f:
    f.write(_html(blocks))
  return paths
