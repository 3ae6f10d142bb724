"""Titles tokenized the way a checkpoint's text tower was trained: its own tokenizer, from its folder.

`transformers.AutoTokenizer` reads the folder (CLIP's byte-level BPE, SigLIP's SentencePiece) and
adds the specials the checkpoint expects (CLIP: start and end; SigLIP: end). In those vocabularies
id 0 is a real token, while our batches pad with 0, so every id is stored plus `ID_OFFSET`; the text
tower (`models/text.py`, `id_offset`) subtracts it and writes the checkpoint's own pad id. What the
records keep beside them (`save`) names the folder and the hash of its tokenizer files, so
`TitleTokenizer.load` of a run's tokenizer.json returns this tokenizer again.
"""

import hashlib
import json
import os
import pathlib
from typing import Sequence

import numpy as np

ID_OFFSET = 1
MARKER = "oclear_checkpoint_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "spiece.model", "tokenizer.model")


class CheckpointTitleTokenizer:
  """The `TitleTokenizer` interface over a checkpoint folder's Hugging Face tokenizer, ids + ID_OFFSET."""

  def __init__(self, folder: str | os.PathLike):
    import transformers  # pylint: disable=g-import-not-at-top  (only for checkpoint text towers)
    self.folder = pathlib.Path(folder).resolve()
    self._tok = transformers.AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
    if self._tok.eos_token_id is None:
      raise ValueError(f"{self.folder}: the tokenizer has no end token; a checkpoint text tower pools or "
                       f"stops at it")
    self.pad_id = 0

  @property
  def special_ids(self) -> tuple[int, ...]:
    """The specials' ids (+ offset): with padding, what an empty title holds (`models.fusion.title_present`)."""
    return tuple(sorted({int(i) + ID_OFFSET for i in self._tok.all_special_ids}))

  @property
  def vocab_size(self) -> int:
    return len(self._tok) + ID_OFFSET

  def to_json(self) -> str:
    """The folder and its tokenizer files' hash: what the records' fingerprint hashes."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
      if (self.folder / name).exists():
        digest.update(name.encode() + (self.folder / name).read_bytes())
    return json.dumps({MARKER: str(self.folder), "sha256": digest.hexdigest()})

  def save(self, path: str | os.PathLike) -> None:
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    path.write_text(self.to_json())

  @classmethod
  def from_json(cls, text: str) -> "CheckpointTitleTokenizer":
    saved = json.loads(text)
    tokenizer = cls(saved[MARKER])
    if json.loads(tokenizer.to_json())["sha256"] != saved["sha256"]:
      raise ValueError(f"the tokenizer files in {saved[MARKER]} changed since these records were written; "
                       f"rerun --mode=prepare")
    return tokenizer

  def tokenize(self, title: str) -> list[str]:
    return self._tok.tokenize(title)

  def encode_batch(self, titles: Sequence[str], max_len: int) -> np.ndarray:
    """int32[n, max_len]: the checkpoint's ids (specials included, truncated keeping the end) + 1, padded with 0."""
    out = np.zeros((len(titles), max_len), np.int32)
    encoded = self._tok([str(t) for t in titles], add_special_tokens=True, truncation=True,
                        max_length=max_len)["input_ids"]
    for i, ids in enumerate(encoded):
      out[i, :len(ids)] = np.asarray(ids, np.int64) + ID_OFFSET
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) - ID_OFFSET for i in ids if int(i) > 0], skip_special_tokens=True)


def is_saved_checkpoint_tokenizer(text: str) -> bool:
  return MARKER in text[:200]
