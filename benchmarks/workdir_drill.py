r"""Drill: stop, resume, share and misuse a `configs/tiny.py` workdir the way a user would; one row per scenario.

  python benchmarks/workdir_drill.py [--repo=PATH] [--root=/tmp/drill]

Every scenario runs `python -m oclear_jax.main` in real processes (in `--repo`, default this checkout, so
another checkout's behaviour can be drilled the same way) with 8 simulated CPU devices, and prints:
scenario, exit code, seconds from the signal (or the start, for errors) to the exit, trained steps lost
(printed by the run, not in any checkpoint), files of the workdir changed by the misuse, and the lines the
user read on stderr.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

HANG_S = 60  # a run still alive this long after its signal is hung
BASE = ["--config=configs/tiny.py", "--config.eval.scann=False", "--config.eval.contact_sheet_queries=0",
        "--config.train.log_every=1", "--config.train.checkpoint_every=50"]


def _env(devices: int | None = 8) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return {**env, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _files(workdir: pathlib.Path) -> dict[str, str]:
  if not workdir.exists():
    return {}
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def _changed(before: dict, after: dict) -> int:
  return sum(before.get(k) != after.get(k) for k in set(before) | set(after))


def _saved_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p) for p in os.listdir(folder) if p.isdigit()) if folder.exists() else []


def _stderr_lines(text: str) -> int:
  return len([line for line in text.splitlines() if line.strip() and "%|" not in line])  # not progress bars


class Drill:
  def __init__(self, repo: pathlib.Path, root: pathlib.Path):
    self.repo, self.root, self.rows = repo, root, []

  def main(self, *args, env=None, timeout=600):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "oclear_jax.main", *args], cwd=self.repo, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start

  def row(self, scenario, code, seconds, lost="", changed="", stderr=""):
    self.rows.append((scenario, code, f"{seconds:.1f}" if seconds != "" else "", lost, changed,
                      _stderr_lines(stderr) if stderr is not None else ""))
    print(f"  {scenario}: exit {code}", file=sys.stderr, flush=True)

  def interrupted(self, workdir, *signals, steps=400, after=20):
    """Sends `signals` (0.3 s apart) once the run printed step `after`; (exit, s from last signal, lost, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "oclear_jax.main", *BASE, f"--workdir={workdir}",
                             f"--config.train.num_steps={steps}"], cwd=self.repo, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = 0
    for line in proc.stdout:
      match = re.match(r"step (\d+)/", line)
      if match and int(match.group(1)) >= after:
        printed = int(match.group(1))
        break
    for i, signum in enumerate(signals):
      if i:
        time.sleep(0.3)
      proc.send_signal(signum)
      sent = time.perf_counter()
    try:
      out, err = proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:  # hung on the way out: what another Ctrl-C does, then what kill does
      proc.send_signal(signal.SIGINT)
      try:
        out, err = proc.communicate(timeout=HANG_S)
      except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
      err = f"(hung {HANG_S} s after the signal; needed another)\n{err}"
    seconds = time.perf_counter() - sent
    printed = max([printed] + [int(s) for s in re.findall(r"^step (\d+)/", out, re.M)])
    saved = _saved_steps(workdir)
    return proc.returncode, seconds, printed - (saved[-1] if saved else 0), err

  def run(self):
    w = self.root / "run"
    code, s, lost, err = self.interrupted(w, signal.SIGINT)
    self.row("Ctrl-C mid-training", code, s, lost, "", err)
    proc, s = self.main(*BASE, f"--workdir={w}", "--config.train.num_steps=60")
    rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    self.row(f"resume after it: duplicate metrics rows {len(train_steps) - len(set(train_steps))}",
             proc.returncode, s, "", "", proc.stderr)
    code, s, lost, err = self.interrupted(self.root / "twice", signal.SIGINT, signal.SIGINT)
    self.row("Ctrl-C twice", code, s, lost, "", err)

    # Two runs on one workdir: B starts while A trains.
    shared = self.root / "shared"
    a = subprocess.Popen([sys.executable, "-m", "oclear_jax.main", *BASE, f"--workdir={shared}",
                          "--config.train.num_steps=300"], cwd=self.repo, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    for line in a.stdout:
      if line.startswith("step 5/"):
        break
    own = ("config.json", "config_history.jsonl")  # what B could change that A does not rewrite itself
    before = {k: v for k, v in _files(shared).items() if k in own}
    proc, s = self.main(*BASE, f"--workdir={shared}", "--config.train.num_steps=300",
                        "--config.optimizer.learning_rate=0.01")
    lock = shared / "train.lock"
    holder = json.loads(lock.read_text())["pid"] if lock.exists() else None
    self.row(f"second run on a live workdir: lock still A's {holder == a.pid if holder else '(no lock)'}",
             proc.returncode, s, "", _changed(before, {k: v for k, v in _files(shared).items() if k in own}),
             proc.stderr)
    a.send_signal(signal.SIGTERM)
    a.communicate(timeout=600)

    before = _files(w)
    proc, s = self.main(*BASE, f"--workdir={w}", "--config.model.embed_dim=16")
    self.row("resume with model.embed_dim changed", proc.returncode, s, "", _changed(before, _files(w)), proc.stderr)
    proc, s = self.main(*BASE, f"--workdir={w}", "--config.train.num_steps=70", "--config.optimizer.learning_rate=1e-3")
    history = (w / "config_history.jsonl").read_text().splitlines() if (w / "config_history.jsonl").exists() else []
    self.row(f"resume with learning rate changed: config.json same "
             f"{_files(w).get('config.json') == before.get('config.json')}, history rows {len(history)}",
             proc.returncode, s, "", "", proc.stderr)

    catalogue = w / "catalogue" / "catalogue.csv"
    existing = self.root / "a_file"
    existing.write_text("x")
    proc, s = self.main("--mode=embed", f"--workdir={w}", f"--catalogue={catalogue}", f"--output={existing}")
    self.row("embed --output= an existing file", proc.returncode, s, "", "", proc.stderr)
    broken = self.root / "broken"
    shutil.copytree(w, broken)
    newest = _saved_steps(broken)[-1]
    for path in (broken / "checkpoints" / str(newest)).rglob("*"):
      if path.is_file() and path.stat().st_size > 64:
        path.write_bytes(path.read_bytes()[:32])
    proc, s = self.main("--mode=embed", f"--workdir={broken}", f"--catalogue={catalogue}",
                        f"--output={self.root / 'embedded'}")
    used = re.search(r"with checkpoint step (\d+)", proc.stdout)
    self.row(f"embed with a truncated newest checkpoint ({newest}): used step {used.group(1) if used else '-'}",
             proc.returncode, s, "", "", proc.stderr)

    proc, s = self.main(*BASE, f"--workdir={self.root / 'typo'}", "--config.train.num_step=5")
    self.row("--config=FILE with a typo'd override", proc.returncode, s, "", "", proc.stderr)
    bad = self.root / "bad_config.py"
    bad.write_text("def get_config(:\n")
    proc, s = self.main(f"--config={bad}", f"--workdir={self.root / 'syntax'}")
    self.row("--config=FILE with a syntax error", proc.returncode, s, "", "", proc.stderr)
    readme = next(line for line in (self.repo / "README.md").read_text().splitlines()
                  if "--config=configs/tiny.py --workdir=/tmp/tiny" in line and "oclear_jax.main" in line)
    command = readme.split("#")[0].replace("/tmp/tiny", str(self.root / "readme"))
    start = time.perf_counter()
    proc = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=self.repo,
                          env=_env(None), capture_output=True, text=True, timeout=900)
    self.row("README's tiny command on a plain CPU", proc.returncode, time.perf_counter() - start, "", "",
             proc.stderr)

    header_only = self.root / "header_only.csv"
    header_only.write_text("id,image,title\n")
    proc, s = self.main("--mode=embed", f"--workdir={w}", f"--catalogue={header_only}",
                        f"--output={self.root / 'empty_out'}")
    self.row("embed a header-only CSV", proc.returncode, s, "", "", proc.stderr)
    big = self.root / "big" / "images"
    big.mkdir(parents=True)
    _png_header(big / "bomb.png", 12000, 12000)
    with open(catalogue, encoding="utf-8") as f:
      rows = list(csv.DictReader(f))[:3]
    with open(self.root / "big" / "meta.csv", "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["id", "image", "title"])
      writer.writerow(["bomb", "images/bomb.png", "a huge image"])
      for r in rows:
        writer.writerow([r["id"], str(catalogue.parent / r["image"]), r["title"]])
    proc, s = self.main("--mode=embed", f"--workdir={w}", f"--catalogue={self.root / 'big' / 'meta.csv'}",
                        f"--output={self.root / 'big_out'}")
    manifest = self.root / "big_out" / "manifest.json"
    reason = json.loads(manifest.read_text())["skipped"][0]["reason"][:40] if manifest.exists() else "-"
    self.row(f"embed a 12000x12000 PNG: {reason}", proc.returncode, s, "", "", proc.stderr)
    proc, s = self.main("--mode=index", f"--workdir={self.root / 'nothing'}")
    self.row("a clean error (index of a missing workdir)", proc.returncode, s, "", "", proc.stderr)


def _png_header(path: pathlib.Path, width: int, height: int) -> None:
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                   + chunk(b"IEND", b""))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parents[1]))
  parser.add_argument("--root", default="/tmp/workdir_drill")
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  drill = Drill(pathlib.Path(args.repo), root)
  drill.run()
  header = ("scenario", "exit", "s to exit", "steps lost", "files changed", "stderr lines")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for row in drill.rows:
    print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
  main()
