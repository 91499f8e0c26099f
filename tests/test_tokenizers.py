"""Tokenizers: CLIP BPE ids equal open_clip's; sentencepiece follows SigLIP conventions."""

from __future__ import annotations

import random

import numpy as np
import pytest

from zoo import tokenizers
from zoo.tokenizers import ClipTokenizer, SentencePieceTokenizer, get_tokenizer

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT.",
    "",
    "   ",
    "\t\n",
    "café crème brûlée, naïve façade, Ångström, jalapeño",
    "東京タワーの夜景 and 北京烤鸭 und 서울의 밤",
    "مرحبا بالعالم — שלום עולם",
    "Привет, мир! Съешь же ещё этих мягких французских булок",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️",
    "Tom &amp; Jerry &lt;3 it&#39;s &quot;fine&quot;",
    "double escaped: &amp;amp; &amp;lt;b&amp;gt; &amp;#39;",
    # '<' stops ftfy's own unescaping, so only the double html.unescape handles these.
    "<b>tags</b> &amp;amp; &amp;lt;i&amp;gt; &amp;amp;amp; &amp;#39;",
    "  lots   of\t\ttabs\n\nand\r\nnewlines   everywhere  ",
    "numbers 1234567890 3.14159 -42 1e-5 $9.99 100% #1 @home",
    "don't can't won't I'm you're we've they'll she'd it's IT'S DON'T",
    "curly quotes: it’s “quoted” ‘single’",
    "punctuation!!! ??? ... ;;; :-) (parens) [brackets] {braces} <angles> a/b\\c",
    "mojibake: The Mona Lisa doesnâ€™t have eyebrows.",
    "special strings <start_of_text> and <end_of_text> inside text",
    "hyphen-ated under_scored CamelCaseWords snake_case_words",
    "a " * 100,
    "supercalifragilisticexpialidocious " * 30,
    " ".join(f"word{i}" for i in range(200)),
    "😀" * 120,
]


def _fuzz_corpus(n: int, seed: int = 0) -> list[str]:
  """Random strings mixing ASCII, Latin-1, CJK, Cyrillic, Arabic, emoji, whitespace, entities."""
  rng = random.Random(seed)
  pools = [
      [chr(c) for c in range(0x20, 0x7F)],
      [chr(c) for c in range(0xA0, 0x180)],
      [chr(c) for c in range(0x4E00, 0x4E80)],
      [chr(c) for c in range(0x410, 0x450)],
      [chr(c) for c in range(0x620, 0x64A)],
      [chr(c) for c in range(0x1F600, 0x1F640)],
      [" ", "\t", "\n", "  ", "&amp;", "&lt;", "&#39;", "'s", "'ll", "0", "7"],
  ]
  out = []
  for _ in range(n):
    pieces = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 60))]
    out.append("".join(pieces))
  return out


@pytest.fixture(scope="module")
def open_clip():
  return pytest.importorskip("open_clip")


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14", "test-tiny"])
def test_clip_ids_equal_open_clip(open_clip, name):
  ours = get_tokenizer(name)
  ref = open_clip.get_tokenizer(name)
  assert isinstance(ours, ClipTokenizer)
  texts = CORPUS + _fuzz_corpus(150)
  got = ours(texts)
  want = ref(texts).numpy()
  assert got.dtype == np.int32 and got.shape == (len(texts), 77)
  bad = [texts[i] for i in np.nonzero((got != want).any(axis=1))[0]]
  assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"


@pytest.mark.parametrize("context_length", [16, 248])
def test_clip_ids_equal_open_clip_other_context(open_clip, context_length):
  ours = get_tokenizer("ViT-B-16", context_length=context_length)
  ref = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)
  texts = CORPUS + _fuzz_corpus(60, seed=1)
  got = ours(texts)
  assert got.shape == (len(texts), context_length)
  np.testing.assert_array_equal(got, ref(texts).numpy())
  # A per-call context length overrides the tokenizer's default, as in open_clip.
  np.testing.assert_array_equal(get_tokenizer("ViT-B-16")(texts, context_length), got)


def test_clip_single_string_and_encode_equal_open_clip(open_clip):
  ours, ref = ClipTokenizer(), open_clip.get_tokenizer("ViT-B-32")
  for text in CORPUS:
    assert ours.encode(text) == ref.encode(text), text
  np.testing.assert_array_equal(ours("a dog"), ref("a dog").numpy())


def test_clip_row_layout():
  tok = ClipTokenizer(context_length=8)
  assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (
      49408, 49406, 49407, 0)
  row = tok("a photo")[0]
  ids = tok.encode("a photo")
  assert row.tolist() == [49406, *ids, 49407] + [0] * (8 - len(ids) - 2)
  long = tok("one two three four five six seven eight nine ten")[0]
  assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] < 49406).all()
  assert long[1:-1].tolist() == tok.encode("one two three four five six")
  empty = tok("")[0]
  assert empty.tolist() == [49406, 49407] + [0] * 6
  assert tok([]).shape == (0, 8)


def test_clip_decode_round_trip(open_clip):
  tok, ref = ClipTokenizer(), open_clip.get_tokenizer("ViT-B-32")
  for text in ["a photo of a cat", "café 東京 😀", "supercalifragilistic"]:
    assert tok.decode(tok.encode(text)) == text + " "
  # Every regex piece ends a word, so punctuation and digits come back space-separated.
  for text in ["hello, world! it's 2024", "emoji 👨‍👩‍👧 &amp; ünïcödé"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == ref.decode(ids)
  assert tok.decode(tok.encode("hello, world! it's 2024")) == "hello , world ! it 's 2 0 2 4 "
  row = tok("two dogs")[0]
  assert tok.decode(row[row != 0]) == "<start_of_text>two dogs <end_of_text>"


def test_clip_bad_input_errors():
  tok = ClipTokenizer()
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tok(["ok", 3])
  with pytest.raises(ValueError, match="context_length"):
    ClipTokenizer(context_length=0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([5, 49408])
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    ClipTokenizer(bpe_path="/nonexistent/nope.txt.gz")


def test_vocab_file_is_shipped_and_complete():
  encoder, ranks = tokenizers._load_bpe(tokenizers.DEFAULT_BPE_PATH)
  assert len(ranks) == 48894 and len(encoder) == 49408
  assert len(set(encoder.values())) == 49408


def test_bytes_to_unicode_is_a_printable_bijection():
  table = tokenizers.bytes_to_unicode()
  assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
  assert all(not c.isspace() and c.isprintable() for c in table.values())


# ----------------------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
  """A tiny T5-style unigram model (pad 0, eos 1, unk 2, no bos) trained on generated text."""
  spm = pytest.importorskip("sentencepiece")
  rng = random.Random(0)
  syllables = "ka to ri mu se pa lo ne chi va de ru mi so ta be go".split()
  words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
  words += "a photo of the cat dog".split()
  sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
  prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=160,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      num_threads=1, minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="module")
def spm_model_with_bos(tmp_path_factory) -> str:
  spm = pytest.importorskip("sentencepiece")
  rng = random.Random(1)
  words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(300)]
  sentences = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
  prefix = str(tmp_path_factory.mktemp("spm_bos") / "bos")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=120,
      model_type="bpe", pad_id=3, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return prefix + ".model"


SPM_TEXTS = [
    "A photo of the cat!",
    "",
    "kato rimu, sepa & lone... near THE river " * 4,
    "xyz über 東京",
    "  two   birds\tflying\n",
    "kato",
    "under_score &amp; entity",
]


def test_sentencepiece_siglip_conventions(spm_model):
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=spm_model)
  tok = SentencePieceTokenizer(spm_model, context_length=16)
  assert (tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 1, sp.get_piece_size())
  rows = tok(SPM_TEXTS)
  assert rows.dtype == np.int32 and rows.shape == (len(SPM_TEXTS), 16)
  for text, row in zip(SPM_TEXTS, rows):
    ids = sp.encode(tokenizers.canonicalize_text(tokenizers.basic_clean(text)))
    if len(ids) + 1 <= 16:
      assert row.tolist() == ids + [1] + [1] * (16 - len(ids) - 1), text
    else:  # truncated: the first 15 ids, then EOS last
      assert row.tolist() == ids[:15] + [1], text
  assert rows[1].tolist() == [1] * 16  # empty text: EOS then EOS padding
  assert any(len(tok.encode(t)) >= 16 for t in SPM_TEXTS)  # truncation was exercised


def test_sentencepiece_matches_hf_siglip_tokenizer(spm_model, tmp_path):
  """Same ids as open_clip's SigLIP recipe: canonicalize + HF T5 tokenizer, pad = eos = 1."""
  open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
  transformers = pytest.importorskip("transformers")
  import shutil

  shutil.copy(spm_model, tmp_path / "spiece.model")
  hf = transformers.T5TokenizerFast.from_pretrained(str(tmp_path), extra_ids=0, legacy=False)
  hf.pad_token_id = 1
  hf.eos_token_id = 1
  clean = [open_clip_tokenizer.canonicalize_text(open_clip_tokenizer.basic_clean(t))
           for t in SPM_TEXTS]
  want = hf(clean, max_length=16, padding="max_length", truncation=True,
            return_tensors="np").input_ids
  np.testing.assert_array_equal(SentencePieceTokenizer(spm_model, 16)(SPM_TEXTS), want)


def test_sentencepiece_options(spm_model_with_bos):
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=spm_model_with_bos)
  bos, eos = sp.bos_id(), sp.eos_id()
  tok = SentencePieceTokenizer(spm_model_with_bos, context_length=12, add_bos=True,
                               add_eos=False, pad_id=3, clean="whitespace")
  text = "abc  DEF\tghij"
  ids = sp.encode("abc DEF ghij")
  row = tok(text)[0].tolist()
  assert row[: len(ids) + 1] == [bos] + ids and set(row[len(ids) + 1 :]) <= {3}
  long = "abcdefghij " * 20
  row = tok(long, context_length=6)[0].tolist()
  assert row == ([bos] + sp.encode(long.strip()))[:6]  # no EOS: plain cut
  lower = SentencePieceTokenizer(spm_model_with_bos, 12, clean="whitespace", lowercase=True)
  assert lower.encode("ABC Def") == sp.encode("abc def")
  assert lower(["abc"])[0].tolist()[: len(sp.encode("abc")) + 1] == sp.encode("abc") + [eos]
  assert lower.decode(lower("abc def")[0]) == "abc def"


def test_sentencepiece_errors(spm_model, tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.model"):
    SentencePieceTokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="add_bos=True"):
    SentencePieceTokenizer(spm_model, add_bos=True)  # this model has no BOS piece
  with pytest.raises(ValueError, match="pad_id 999"):
    SentencePieceTokenizer(spm_model, pad_id=999)


def test_get_tokenizer_dispatch(spm_model):
  assert isinstance(get_tokenizer(spm_model), SentencePieceTokenizer)
  assert get_tokenizer(spm_model, context_length=20).context_length == 20
  assert get_tokenizer("ViT-B-32").context_length == 77
  assert get_tokenizer("ViT-L-14", context_length=248).context_length == 248
  assert get_tokenizer("some-unknown-model").context_length == 77
  with pytest.raises(ValueError, match="model_path"):
    get_tokenizer("ViT-B-16-SigLIP")
  siglip = get_tokenizer("ViT-B-16-SigLIP", model_path=spm_model)
  assert isinstance(siglip, SentencePieceTokenizer) and siglip.context_length == 64
  assert siglip(["a photo"]).shape == (1, 64)


def test_tokenizers_pickle_for_data_workers(spm_model):
  import pickle

  texts = ["a photo of a cat", "kato rimu sepa"]
  clip = ClipTokenizer(context_length=20)
  clip_copy = pickle.loads(pickle.dumps(clip))
  assert clip_copy.context_length == 20 and len(pickle.dumps(clip)) < 1000  # args, not tables
  np.testing.assert_array_equal(clip_copy(texts), clip(texts))
  sp = SentencePieceTokenizer(spm_model, 12, add_eos=True, clean="whitespace")
  sp_copy = pickle.loads(pickle.dumps(sp))
  np.testing.assert_array_equal(sp_copy(texts), sp(texts))
