"""Text tokenizers: CLIP byte-level BPE (ids identical to open_clip) and sentencepiece.

Both tokenizers map `str | list[str]` to an int32 array [N, context_length] that the text
towers take as input. `get_tokenizer(name)` picks the right one for a model name.

CLIP BPE conventions (OpenAI CLIP / open_clip `SimpleTokenizer`):
  * clean: ftfy.fix_text, html.unescape twice, strip, collapse whitespace, lowercase;
  * split with a regex over contractions, letter runs (\\p{L}), single digits (\\p{N}) and
    runs of other non-space symbols; each piece is mapped byte -> printable unicode char and
    merged with the 48,894 ranked BPE merges of `assets/bpe_simple_vocab_16e6.txt.gz`;
  * a row is [SOT=49406, ids..., EOT=49407, 0, 0, ...]; a row longer than the context is cut
    to the context length and its last slot set to EOT (so EOT, the largest id, stays the
    argmax that CLIP's text pooling reads).
  * the literal strings "<start_of_text>" / "<end_of_text>" inside a text encode as the
    special ids, as they do in open_clip.

Sentencepiece conventions (SigLIP, big_vision / open_clip `SigLipTokenizer`):
  * text is canonicalized (punctuation removed, lowercased, whitespace collapsed);
  * no start token; EOS (id 1 in the T5 "c4-en" 32k vocab) is appended and kept last when the
    text is truncated; rows are padded with the pad id, which for SigLIP is the EOS id 1
    (big_vision `pad_value=1`, HF SiglipTokenizer `pad_token="</s>"`).
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
import string
from typing import Any, Callable, Sequence

import ftfy
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_BPE_PATH = os.path.join(ASSETS_DIR, "bpe_simple_vocab_16e6.txt.gz")
# The vocabulary file holds more merges than CLIP uses; CLIP keeps the first 48,894 so that
# 256 bytes + 256 end-of-word bytes + merges + 2 special tokens = 49,408 ids.
NUM_CLIP_MERGES = 49152 - 256 - 2
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"

Texts = str | Sequence[str]


# ----------------------------------------------------------------------------- text cleaning


def basic_clean(text: str) -> str:
  """Fixes mojibake (ftfy) and HTML entities (twice, for double-escaped text), then strips."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  return text.strip()


def whitespace_clean(text: str) -> str:
  """Collapses every run of whitespace (tabs, newlines, ...) to one space."""
  return " ".join(text.split())


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str) -> str:
  """SigLIP / big_vision canonical form: '_' -> ' ', ASCII punctuation removed, lowercased."""
  text = text.replace("_", " ").translate(_PUNCTUATION_TABLE).lower()
  return whitespace_clean(text)


def _clean_lower(text: str) -> str:
  return whitespace_clean(basic_clean(text)).lower()


def _clean_whitespace(text: str) -> str:
  return whitespace_clean(basic_clean(text))


def _clean_canonicalize(text: str) -> str:
  return canonicalize_text(basic_clean(text))


def _clean_none(text: str) -> str:
  return text


# Named module-level functions (not lambdas) so that tokenizers pickle into data workers.
_CLEAN_FNS: dict[str, Callable[[str], str]] = {
    "lower": _clean_lower,
    "whitespace": _clean_whitespace,
    "canonicalize": _clean_canonicalize,
    "none": _clean_none,
}


def get_clean_fn(kind: str) -> Callable[[str], str]:
  """The text-cleaning function named `kind` ('lower', 'whitespace', 'canonicalize', 'none')."""
  if kind not in _CLEAN_FNS:
    raise ValueError(f"Unknown clean {kind!r}; valid: {', '.join(sorted(_CLEAN_FNS))}")
  return _CLEAN_FNS[kind]


# ----------------------------------------------------------------------------- shared helpers


def _as_list(texts: Texts) -> list[str]:
  if isinstance(texts, str):
    return [texts]
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"texts[{i}] is {type(t).__name__}; expected str")
  return texts


def _check_context_length(context_length: int | None) -> int:
  if context_length is None or int(context_length) < 1:
    raise ValueError(f"context_length must be a positive int, got {context_length!r}")
  return int(context_length)


def _pack_rows(rows: list[list[int]], context_length: int, pad_id: int,
               last_id: int | None) -> np.ndarray:
  """Pads rows to `context_length`; an overlong row is cut (its last slot set to `last_id`)."""
  out = np.full((len(rows), context_length), pad_id, dtype=np.int32)
  for i, ids in enumerate(rows):
    if len(ids) > context_length:
      ids = ids[:context_length]
      if last_id is not None:
        ids[-1] = last_id
    out[i, : len(ids)] = ids
  return out


# ----------------------------------------------------------------------------- CLIP BPE


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """Reversible map byte -> unicode char that avoids whitespace/control characters.

  Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68
  bytes map, in increasing byte order, to code points 256, 257, ...
  """
  printable = (
      set(range(ord("!"), ord("~") + 1))
      | set(range(ord("¡"), ord("¬") + 1))
      | set(range(ord("®"), ord("ÿ") + 1))
  )
  table: dict[int, str] = {b: chr(b) for b in sorted(printable)}
  extra = 0
  for b in range(256):
    if b not in printable:
      table[b] = chr(256 + extra)
      extra += 1
  return table


@functools.lru_cache(maxsize=4)
def _load_bpe(bpe_path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
  """Reads the merges file once per path -> (token -> id, merge pair -> rank)."""
  if not os.path.isfile(bpe_path):
    raise FileNotFoundError(f"BPE vocabulary file not found: {bpe_path}")
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merge_lines = lines[1 : NUM_CLIP_MERGES + 1]  # line 0 is a version header
  if len(merge_lines) != NUM_CLIP_MERGES:
    raise ValueError(
        f"{bpe_path}: expected {NUM_CLIP_MERGES} merges after the header, found {len(merge_lines)}")
  merges = []
  for n, line in enumerate(merge_lines, start=1):
    pair = tuple(line.split())
    if len(pair) != 2:
      raise ValueError(f"{bpe_path}: line {n} is not a merge pair: {line!r}")
    merges.append(pair)
  byte_chars = list(bytes_to_unicode().values())
  vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in merges]
  vocab += [SOT_TOKEN, EOT_TOKEN]
  encoder = {tok: i for i, tok in enumerate(vocab)}
  ranks = {pair: r for r, pair in enumerate(merges)}
  return encoder, ranks


def _bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """Repeatedly merges the lowest-ranked adjacent pair (all its occurrences, left to right)."""
  while len(symbols) > 1:
    best_rank, best = None, None
    for pair in zip(symbols, symbols[1:]):
      r = ranks.get(pair)
      if r is not None and (best_rank is None or r < best_rank):
        best_rank, best = r, pair
    if best is None:
      break
    first, second = best
    merged: list[str] = []
    i = 0
    while i < len(symbols):
      if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
        merged.append(first + second)
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


class ClipTokenizer:
  """CLIP byte-level BPE tokenizer; `tok(texts)` equals `open_clip.get_tokenizer(name)(texts)`.

  Args:
    context_length: default row length (77 for CLIP; Long-CLIP uses 248).
    bpe_path: merges file (defaults to the vocabulary shipped in `zoo/assets`).
    clean: 'lower' (CLIP default), 'whitespace' or 'canonicalize'.
  """

  def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH,
               bpe_path: str = DEFAULT_BPE_PATH, clean: str = "lower"):
    self._init_args = (context_length, bpe_path, clean)
    self.context_length = _check_context_length(context_length)
    self.encoder, self._ranks = _load_bpe(os.path.abspath(bpe_path))
    self.decoder = {i: tok for tok, i in self.encoder.items()}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self._clean = get_clean_fn(clean)
    self.vocab_size = len(self.encoder)
    self.sot_token_id = self.encoder[SOT_TOKEN]
    self.eot_token_id = self.encoder[EOT_TOKEN]
    self.pad_token_id = 0
    self._special = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}
    self._pattern = regex.compile(
        r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE)
    self._cache: dict[str, tuple[int, ...]] = {}

  def __getstate__(self):
    # Pickle the constructor arguments only (data workers reload the cached vocabulary).
    return {"args": self._init_args, "context_length": self.context_length}

  def __setstate__(self, state):
    self.__init__(*state["args"])
    self.context_length = state["context_length"]

  def _word_ids(self, word: str) -> tuple[int, ...]:
    """Ids of one regex piece (cached: captions repeat words a lot)."""
    ids = self._cache.get(word)
    if ids is None:
      special = self._special.get(word)
      if special is not None:
        ids = (special,)
      else:
        chars = [self._byte_encoder[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        ids = tuple(self.encoder[s] for s in _bpe_merge(chars, self._ranks))
      if len(self._cache) < 200_000:
        self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Cleaned, BPE-encoded ids of one text, without SOT/EOT."""
    ids: list[int] = []
    for word in self._pattern.findall(self._clean(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`, as open_clip decodes: word ends become spaces, SOT/EOT stay as text.

    Drop padding first (`ids[ids != 0]`): pad id 0 is also the byte "!".
    """
    unknown = [int(i) for i in ids if int(i) not in self.decoder]
    if unknown:
      raise ValueError(f"decode: ids {unknown[:5]} are outside the vocabulary [0, {self.vocab_size})")
    chars = "".join(self.decoder[int(i)] for i in ids)
    data = bytearray(self._byte_decoder[c] for c in chars)
    return data.decode("utf-8", errors="replace").replace("</w>", " ")

  def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
    """int32 [N, context_length]: SOT + ids + EOT, zero-padded, truncated with EOT last."""
    length = _check_context_length(context_length or self.context_length)
    rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in _as_list(texts)]
    return _pack_rows(rows, length, self.pad_token_id, self.eot_token_id)


# ----------------------------------------------------------------------------- sentencepiece


class _PicklableSentencePiece:
  """Pickles `self.sp` (a SentencePieceProcessor, not picklable itself) as its serialized
  model, so tokenizers cross process boundaries (grain workers) without the .model file."""

  def __getstate__(self):
    state = dict(self.__dict__)
    state["sp"] = self.sp.serialized_model_proto()
    return state

  def __setstate__(self, state):
    import sentencepiece as spm

    state = dict(state)
    state["sp"] = spm.SentencePieceProcessor(model_proto=state["sp"])
    self.__dict__.update(state)


class SentencePieceTokenizer(_PicklableSentencePiece):
  """Sentencepiece tokenizer with SigLIP conventions by default.

  Args:
    model_path: a sentencepiece `.model` file.
    context_length: default row length (64 for SigLIP).
    add_bos: prepend the model's BOS id (SigLIP: no).
    add_eos: append the model's EOS id, kept last under truncation (SigLIP: yes).
    pad_id: padding id; None = the EOS id (SigLIP pads with EOS = 1), or the model's pad id
      when the model has no EOS.
    clean: 'canonicalize' (SigLIP: punctuation removed, lowercase), 'lower', 'whitespace'
      or 'none'.
    lowercase: lowercase after cleaning (already implied by 'canonicalize' and 'lower').
  """

  def __init__(self, model_path: str, context_length: int = 64, *, add_bos: bool = False,
               add_eos: bool = True, pad_id: int | None = None, clean: str = "canonicalize",
               lowercase: bool = False):
    import sentencepiece as spm  # Imported lazily: only sentencepiece models need it.

    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
    self.model_path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    self.context_length = _check_context_length(context_length)
    self.vocab_size = int(self.sp.get_piece_size())
    self.bos_token_id = int(self.sp.bos_id())
    self.eos_token_id = int(self.sp.eos_id())
    if add_bos and self.bos_token_id < 0:
      raise ValueError(f"{model_path}: add_bos=True but the model defines no BOS piece")
    if add_eos and self.eos_token_id < 0:
      raise ValueError(f"{model_path}: add_eos=True but the model defines no EOS piece")
    if pad_id is None:
      pad_id = self.eos_token_id if self.eos_token_id >= 0 else int(self.sp.pad_id())
    if not 0 <= pad_id < self.vocab_size:
      raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {self.vocab_size}) of {model_path}")
    self.pad_token_id = int(pad_id)
    self.add_bos, self.add_eos = add_bos, add_eos
    self.sot_token_id = self.bos_token_id if add_bos else None
    self.eot_token_id = self.eos_token_id if add_eos else None
    self._clean = get_clean_fn(clean)
    self._lowercase = lowercase

  def clean(self, text: str) -> str:
    """The text as it is fed to sentencepiece."""
    text = self._clean(text)
    return text.lower() if self._lowercase else text

  def encode(self, text: str) -> list[int]:
    """Sentencepiece ids of the cleaned text, without BOS/EOS."""
    return list(self.sp.encode(self.clean(text)))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; pad/BOS/EOS ids are dropped."""
    drop = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
    return self.sp.decode([int(i) for i in ids if int(i) not in drop])

  def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
    """int32 [N, context_length]: [BOS] + ids + [EOS], padded with `pad_token_id`.

    Overlong rows are cut to the context; with add_eos the last slot is EOS.
    """
    length = _check_context_length(context_length or self.context_length)
    prefix = [self.bos_token_id] if self.add_bos else []
    suffix = [self.eos_token_id] if self.add_eos else []
    rows = [prefix + self.encode(t) + suffix for t in _as_list(texts)]
    return _pack_rows(rows, length, self.pad_token_id, self.eot_token_id)


class XLMRobertaTokenizer(_PicklableSentencePiece):
  """XLM-R / M-CLIP ids from a sentencepiece model (fairseq dictionary convention).

  As Hugging Face's (slow) XLMRobertaTokenizer: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, every
  other sentencepiece id i maps to i + 1, and `<mask>` is the last id; a row is
  `<s> pieces </s>`, padded with `<pad>`, and an overlong row keeps `</s>` last. No cleaning
  beyond sentencepiece's own normalization (no lowercasing). Vocabulary size = pieces + 2.
  """

  BOS, PAD, EOS, UNK = 0, 1, 2, 3
  OFFSET = 1

  def __init__(self, model_path: str, context_length: int = DEFAULT_CONTEXT_LENGTH):
    import sentencepiece as spm

    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
    self.model_path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    self.context_length = _check_context_length(context_length)
    self.vocab_size = int(self.sp.get_piece_size()) + self.OFFSET + 1
    self.mask_token_id = self.vocab_size - 1
    self.pad_token_id, self.bos_token_id, self.eos_token_id = self.PAD, self.BOS, self.EOS

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without `<s>` / `</s>`."""
    unk = self.sp.unk_id()
    return [i + self.OFFSET if i != unk else self.UNK for i in self.sp.encode(text)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; special ids are dropped."""
    pieces = [int(i) - self.OFFSET for i in ids if int(i) > self.UNK and int(i) != self.mask_token_id]
    return self.sp.decode(pieces)

  def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
    """int32 [N, context_length]: `<s>` ids `</s>`, padded with `<pad>` (1)."""
    length = _check_context_length(context_length or self.context_length)
    rows = [[self.BOS] + self.encode(t) + [self.EOS] for t in _as_list(texts)]
    return _pack_rows(rows, length, self.PAD, self.EOS)


# NLLB's source-language tokens: FLORES-200 codes ('eng_Latn', 'zho_Hant').
_FLORES_CODE = regex.compile(r"[a-z]{3}_[A-Z][a-z]{3}")


@functools.lru_cache(maxsize=None)
def nllb_languages() -> dict[str, str]:
  """Language code -> NLLB source-language token, as CLIP_benchmark's NLLB-CLIP evaluation
  sets it (`assets/nllb_languages.json`, written by scripts/gen_benchmark_assets.py)."""
  with open(os.path.join(ASSETS_DIR, "nllb_languages.json"), encoding="utf-8") as f:
    table = json.load(f)
  return {k.lower(): v for k, v in table.items() if not k.startswith("_")}


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library), as open_clip's HFTokenizer
  calls it: `clean` first ('whitespace' by default), then special tokens added by the file's
  post-processor, truncation to the context (specials kept), padding with `pad_id` (default:
  the file's `<pad>`). RoBERTa, XLM-R and NLLB towers read their hub repo's tokenizer.json.
  `prefix` / `suffix` wrap each stripped text (LLM2Vec's chat template and EOS, e.g. Llama 3
  Instruct's '<|start_header_id|>user<|end_header_id|>\n\n' ... '<|eot_id|>').
  """

  def __init__(self, path: str, context_length: int = DEFAULT_CONTEXT_LENGTH, *,
               clean: str = "whitespace", pad_id: int | None = None,
               strip_sep_token: bool = False, language: str | None = None,
               prefix: str = "", suffix: str = ""):
    try:
      import tokenizers
    except ImportError:
      raise ImportError("reading a tokenizer.json needs the `tokenizers` package: pip install "
                        "tokenizers") from None
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path, self.clean_name, self.prefix, self.suffix = path, clean, prefix, suffix
    self.clean = get_clean_fn(clean)
    self.context_length = _check_context_length(context_length)
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    for token in ("<pad>", "[PAD]"):  # RoBERTa / XLM-R / NLLB; BERT
      if pad_id is None:
        pad_id = self.tokenizer.token_to_id(token)
    if pad_id is None:
      raise ValueError(f"{path}: no <pad> or [PAD] token; pass pad_id")
    self.pad_token_id = int(pad_id)
    # open_clip's strip_sep_token (CLIPA's BERT): [SEP] ids become padding
    self.sep_token_id = self.tokenizer.token_to_id("[SEP]") if strip_sep_token else None
    self.vocab_size = self.tokenizer.get_vocab_size()
    self.language = None
    if language is not None:
      self._set_language(language)

  def __getstate__(self):
    return {"path": self.path, "context_length": self.context_length, "clean": self.clean_name,
            "pad_id": self.pad_token_id, "strip_sep_token": self.sep_token_id is not None,
            "prefix": self.prefix, "suffix": self.suffix, "language": self.language}

  def __setstate__(self, state):
    self.__init__(state["path"], state["context_length"], clean=state["clean"],
                  pad_id=state["pad_id"], strip_sep_token=state.get("strip_sep_token", False),
                  prefix=state.get("prefix", ""), suffix=state.get("suffix", ""),
                  language=state.get("language"))

  def language_token(self) -> str | None:
    """The source-language token the file's template puts first (NLLB: 'eng_Latn'), or None
    for tokenizers without one (RoBERTa, XLM-R, BERT)."""
    processor = json.loads(self.tokenizer.to_str()).get("post_processor") or {}
    first = (processor.get("single") or [{}])[0] if processor.get("type") == "TemplateProcessing" \
        else {}
    token = first.get("SpecialToken", {}).get("id", "")
    return token if _FLORES_CODE.fullmatch(token) else None

  def for_language(self, language: str) -> "HFTokenizer":
    """A copy that starts every text with `language`'s NLLB token: a FLORES-200 code
    ('deu_Latn') or a code of CLIP_benchmark's NLLB map (`nllb_languages()`: 'de', 'jp', ...,
    any case). Raises ValueError for a language without a token in this file; returns `self`
    for a tokenizer without language tokens."""
    if self.language_token() is None:
      return self
    copy = HFTokenizer.__new__(HFTokenizer)
    copy.__setstate__(dict(self.__getstate__(), language=language))
    return copy

  def _set_language(self, language: str) -> None:
    current = self.language_token()
    if current is None:
      raise ValueError(f"{self.path}: this tokenizer has no source-language token to set "
                       f"(asked for {language!r})")
    code = language if _FLORES_CODE.fullmatch(language) else nllb_languages().get(language.lower())
    token_id = self.tokenizer.token_to_id(code) if code else None
    if token_id is None:
      raise ValueError(f"{self.path}: no NLLB language token for {language!r}"
                       + (f" ({code} is not in the vocabulary)" if code else
                          " (not a FLORES-200 code nor in CLIP_benchmark's NLLB language map)"))
    import tokenizers

    spec = json.loads(self.tokenizer.to_str())
    processor = spec["post_processor"]
    for template in ("single", "pair"):
      for item in processor.get(template) or []:
        if item.get("SpecialToken", {}).get("id") == current:
          item["SpecialToken"]["id"] = code
    processor["special_tokens"].pop(current)
    processor["special_tokens"][code] = {"id": code, "ids": [token_id], "tokens": [code]}
    self.tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    self.language = language

  @functools.cached_property
  def wrap_tokens(self) -> int:
    """Tokens a text gets besides its own: specials, template prefix and suffix."""
    return len(self.tokenizer.encode(self._wrap("")).ids)

  def _wrap(self, text: str) -> str:
    text = self.clean(text)
    return f"{self.prefix}{text.strip()}{self.suffix}" if self.prefix or self.suffix else text

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without special tokens."""
    return self.tokenizer.encode(self.clean(text), add_special_tokens=False).ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
    """int32 [N, context_length], specials added by the file's post-processor."""
    length = _check_context_length(context_length or self.context_length)
    self.tokenizer.enable_truncation(max_length=length)
    try:
      rows = [e.ids for e in self.tokenizer.encode_batch([self._wrap(t) for t in _as_list(texts)])]
    finally:
      self.tokenizer.no_truncation()
    out = _pack_rows(rows, length, self.pad_token_id, None)
    if self.sep_token_id is not None:
      out[out == self.sep_token_id] = 0
    return out


def for_config(model_config: Any, path: str | None = None, context_length: int | None = None
               ) -> HFTokenizer:
  """The HFTokenizer a model config with `tokenizer_format` 'hf' names (its tokenizer.json,
  clean, pad id and, for LLM towers, LLM2Vec's prefix / suffix)."""
  return HFTokenizer(path or model_config.tokenizer,
                     context_length or model_config.text.context_length,
                     clean=getattr(model_config, "tokenizer_clean", "whitespace"),
                     pad_id=model_config.text.pad_token_id,
                     prefix=getattr(model_config, "tokenizer_prefix", ""),
                     suffix=getattr(model_config, "tokenizer_suffix", ""))


# ----------------------------------------------------------------------------- by model name


Tokenizer = ClipTokenizer | SentencePieceTokenizer | XLMRobertaTokenizer | HFTokenizer


def _model_config(name: str):
  """The zoo registry's config for `name`, or None when the registry or the name is unknown.

  This is the only coupling to `zoo.models.configs`: it needs `get_model_config(name)` returning an
  object with `.tokenizer` ('clip', 'sentencepiece' or a `.model` path) and
  `.text.context_length`.
  """
  try:
    from zoo.models import configs
  except ImportError:
    return None
  try:
    return configs.get_model_config(name)
  except (KeyError, ValueError):
    return None


def get_tokenizer(name: str, context_length: int | None = None, *,
                  model_path: str | None = None, **kwargs) -> Tokenizer:
  """The tokenizer of model `name` (a zoo / open_clip name, or a path to a `.model` file).

  * a registered CLIP model -> `ClipTokenizer` with the model's context length (77);
  * a registered sentencepiece model (SigLIP) -> `SentencePieceTokenizer` on `model_path`
    (or the `.model` path in its config) with the model's context length (64);
  * a path ending in `.model` -> `SentencePieceTokenizer(path)`;
  * any other name -> `ClipTokenizer` with context 77, as open_clip does for names whose
    config names no other tokenizer.
  `context_length` overrides the model's (e.g. Long-CLIP: 248); `kwargs` go to the tokenizer.
  """
  if name.endswith(".model"):
    return SentencePieceTokenizer(name, **_with_length(kwargs, context_length))
  config = _model_config(name)
  if config is None:
    if "siglip" in name.lower() and model_path is None:
      raise ValueError(
          f"{name!r} looks like a SigLIP model, whose text tower uses a sentencepiece vocabulary; "
          "pass its file: get_tokenizer(name, model_path='.../spiece.model')")
    if model_path is not None:
      return SentencePieceTokenizer(model_path, **_with_length(kwargs, context_length))
    return ClipTokenizer(context_length or DEFAULT_CONTEXT_LENGTH, **kwargs)
  length = context_length or config.text.context_length
  kind = getattr(config, "tokenizer", "clip")
  if kind == "clip":
    return ClipTokenizer(length, **kwargs)
  path = model_path or (kind if kind.endswith(".model") else None)
  if path is None:
    raise ValueError(
        f"Model {name!r} uses a sentencepiece tokenizer ({kind!r}) and no .model file is known; "
        "pass it: get_tokenizer(name, model_path='.../spiece.model')")
  if kind == "xlmr":  # XLM-V / XLM-R vocabularies (MetaCLIP 2 worldwide)
    return XLMRobertaTokenizer(path, length)
  if config.text.vocab_size == 256000:  # SigLIP 2's Gemma vocabulary pads with 0
    kwargs = dict(kwargs, pad_id=kwargs.get("pad_id", 0))
  return SentencePieceTokenizer(path, length, **kwargs)


def _with_length(kwargs: dict, context_length: int | None) -> dict:
  return dict(kwargs, context_length=context_length) if context_length else dict(kwargs)
