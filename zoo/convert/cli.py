"""`python -m zoo.convert <subcommand>`: PyTorch weights <-> zoo, one subcommand per layout.
  python -m zoo.convert from-open-clip --model ViT-B-32 --input open_clip.safetensors --output DIR
  python -m zoo.convert to-open-clip --input DIR --output open_clip.safetensors
  python -m zoo.convert from-hf --input hf_dir/model.safetensors [--model NAME|config.json] --output DIR
  python -m zoo.convert to-hf --input DIR --output hf_dir/    (model.safetensors + config.json)
  python -m zoo.convert from-long-clip --model ViT-B-16-quickgelu --input longclip-B.pt --output DIR
  python -m zoo.convert to-long-clip --input DIR --output longclip.pt|.safetensors
  python -m zoo.convert from-clip-moe --model ViT-L-14-quickgelu --input clip_moe.safetensors --output DIR
  python -m zoo.convert to-clip-moe --input DIR --output clip_moe.safetensors
  python -m zoo.convert build-mclip --teacher CLIP_DIR --text HF_DIR --tokenizer X.model --output DIR
      [--encoder-config ENCODER/config.json]
  python -m zoo.convert to-mclip --input DIR --output mclip_dir/  (model.safetensors + config.json)
  python -m zoo.convert push --input DIR --repo ORG/NAME [--dry-run]   (hub upload; push --help)

Inputs: safetensors, or `.pt` / `.pth` / `.bin` read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from zoo import convert, errors
from zoo.convert import clip_moe, common, long_clip, mclip, push
from zoo.convert.io import read_state_dict, write_safetensors
from zoo.weights import model_dir


def _hf_config_arg(model: str | None, input_path: str) -> Any:
  """--model for from-hf: a zoo name, an HF config.json, or the config.json next to the input."""
  candidate = model
  if candidate is None:
    beside = os.path.join(os.path.dirname(os.path.abspath(input_path)), "config.json")
    if not os.path.isfile(beside):
      raise ValueError("from-hf needs --model NAME or --model config.json (no config.json "
                       f"beside {input_path})")
    candidate = beside
  if candidate.endswith(".json"):
    with open(candidate) as f:
      return json.load(f)
  return candidate


_LAYOUTS = {
    "from-long-clip": long_clip.run_from_long_clip, "to-long-clip": long_clip.run_to_long_clip,
    "from-clip-moe": clip_moe.run_from_clip_moe, "to-clip-moe": clip_moe.run_to_clip_moe,
    "build-mclip": mclip.run_build, "to-mclip": mclip.run_to_mclip,
}
COMMANDS = ("from-open-clip", "to-open-clip", "from-hf", "to-hf", *_LAYOUTS)


def _open_clip_or_hf(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
  if args.command.startswith("from-"):
    if args.command == "from-open-clip" and args.model:
      common.resolve_config(args.model)  # an unknown name fails before a large file is read
    state_dict = read_state_dict(args.input)
    if args.command == "from-open-clip":
      if not args.model:
        parser.error("from-open-clip needs --model (e.g. ViT-B-32, or ViT-B-32-quickgelu for "
                     "OpenAI weights)")
      model = convert.from_open_clip(state_dict, args.model)
    else:
      model = convert.from_hf(state_dict, _hf_config_arg(args.model, args.input))
    out = model_dir.save(model, args.output, {"converted_from": args.input,
                                               "layout": args.command[5:]},
                          overwrite=args.overwrite)
    print(f"wrote zoo checkpoint {out}")
    return 0

  model, _, _ = model_dir.load(args.input)
  if args.command == "to-open-clip":
    state_dict, hf_config = convert.to_open_clip(model), None
  else:
    state_dict, hf_config = convert.to_hf(model), convert.config_to_hf(model.config)
  out = args.output
  if hf_config is not None and not out.endswith(".safetensors"):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    out = os.path.join(out, "model.safetensors")
  elif not out.endswith(".safetensors"):
    raise errors.UserError(f"--output {out!r} must be a .safetensors file (e.g. "
                           "open_clip_model.safetensors)")
  if os.path.exists(out) and not args.overwrite:
    raise errors.UserError(f"--output {out} exists; pass --overwrite or pick a new file")
  write_safetensors(state_dict, out, {"format": "pt"})
  print(f"wrote {len(state_dict)} tensors to {out}")
  return 0


def run(argv: list[str] | None = None) -> int:
  """Runs one subcommand; a bad input is one line on stderr and exit code 2."""
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["push"]:  # publishing a zoo / open_clip directory to the hub: convert/push.py
    return push.cli(argv[1:])
  parser = errors.ArgumentParser(prog="python -m zoo.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=COMMANDS)
  parser.add_argument("--model", help="architecture name (from-*); for from-hf also an HF "
                      "config.json; to-* read it from the zoo checkpoint")
  parser.add_argument("--input", help="weights file (from-*) or zoo checkpoint directory (to-*)")
  parser.add_argument("--output", required=True, help="zoo checkpoint directory (from-*, "
                      "build-mclip) or weights file / directory (to-*)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  parser.add_argument("--teacher", help="build-mclip: zoo.save directory of the English CLIP")
  parser.add_argument("--text", help="build-mclip: HF model directory (config.json + weights) of "
                      "XLM-R / BERT or M-CLIP")
  parser.add_argument("--tokenizer", help="build-mclip: the encoder's sentencepiece .model")
  parser.add_argument("--seed", type=int, default=0, help="build-mclip: seed of a fresh projection")
  parser.add_argument("--encoder-config", help="build-mclip: the encoder's transformers "
                      "config.json, for an M-CLIP whose modelBase zoo does not know (LaBSE, mBERT)")
  try:
    args = parser.parse_args(argv)
    if args.command != "build-mclip" and not args.input:
      parser.error(f"{args.command} needs --input")
    if args.command in _LAYOUTS:
      return _LAYOUTS[args.command](args)
    return _open_clip_or_hf(args, parser)
  except (OSError, *errors.USER_ERRORS) as e:
    return errors.report(e, parser.prog)

