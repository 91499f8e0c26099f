"""Old import path of multilingual CLIP (kept for one release): re-exports zoo.models.multilingual,
zoo.families.multilingual and zoo.convert.mclip; `main` is `python -m zoo.convert`."""

from __future__ import annotations

import sys

import ml_collections

from zoo.convert import cli
from zoo.convert.mclip import from_hf_text, text_config_from_hf, to_hf_text
from zoo.families.multilingual import (
  FAMILY,
  MultilingualFields,
  Settings,
  babel_zeroshot_language,
  build_demo_tokenizer,
  default_settings,
  demo_corpus,
  eval_babel_zeroshot,
  tokenizer_for,
  train_sentencepiece,
)
from zoo.models.multilingual import (
  DEMO_TOKENIZER,
  TEXT_MODELS,
  MultilingualCLIP,
  MultilingualCLIPConfig,
  MultilingualTextConfig,
  MultilingualTextTransformer,
  PostNormBlock,
  config_from_clip,
  from_clip,
  list_text_models,
  student_only,
  text_config,
)


def settings(config: ml_collections.ConfigDict) -> Settings:
  return FAMILY.settings(config)


def build_model(config: ml_collections.ConfigDict) -> MultilingualCLIP:
  return FAMILY.build_model(config, FAMILY.settings(config))


def main(argv: list[str] | None = None) -> int:
  """`python -m zoo.convert {build-mclip,to-mclip} ...` ("build" is build-mclip)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "build":
    argv[0] = "build-mclip"
  return cli.main(argv)


__all__ = [
    "DEMO_TOKENIZER", "MultilingualCLIP", "MultilingualCLIPConfig", "MultilingualFields",
    "MultilingualTextConfig", "MultilingualTextTransformer", "PostNormBlock", "Settings",
    "TEXT_MODELS", "babel_zeroshot_language", "build_demo_tokenizer", "build_model",
    "config_from_clip", "default_settings", "demo_corpus", "eval_babel_zeroshot", "from_clip",
    "from_hf_text", "list_text_models", "main", "settings", "student_only", "text_config",
    "text_config_from_hf", "to_hf_text", "tokenizer_for", "train_sentencepiece",
]


if __name__ == "__main__":  # python -m zoo.multilingual build ... (the old command line)
  raise SystemExit(main())
