"""Generates zoo/assets/pretrained.json and docs/pretrained.md from open_clip's own table.

  python scripts/gen_pretrained_table.py           # rewrite both files
  python scripts/gen_pretrained_table.py --check   # exit 1 if either is out of date

Reads the installed open_clip_torch (`list_pretrained`, `get_pretrained_cfg`,
`get_model_config`); an (arch, tag) is kept when zoo's registry has the architecture (tags
trained with QuickGELU map to the `-quickgelu` form) and open_clip's model config maps onto
it field by field (`zoo.weights.pretrained.config_from_open_clip_cfg`). The variants' releases
(Long-CLIP, CLIP-MoE, M-CLIP) are declared below. zoo itself never imports open_clip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import open_clip  # noqa: E402

from zoo.convert import open_clip_config
from zoo.models import configs
from zoo.weights import hub, pretrained

TABLE = os.path.join(ROOT, "zoo", "assets", "pretrained.json")
DOCS = os.path.join(ROOT, "docs", "pretrained.md")
OPENAI_PP = {"mean": list(configs.OPENAI_MEAN), "std": list(configs.OPENAI_STD),
             "interpolation": "bicubic", "resize_mode": "shortest"}


def _weights(hf_hub: str) -> tuple[str, list[str]]:
  """(repo id, weight file candidates) of an open_clip `hf_hub` field, in open_clip's order
  (a safetensors alternative first)."""
  repo, filename = os.path.split(hf_hub)
  if not filename:
    return repo, list(pretrained.OPEN_CLIP_WEIGHTS)
  if filename.endswith((".bin", ".pth")):
    return repo, [filename[:-4] + ".safetensors", filename]
  return repo, [filename]


def _url_sha(url: str) -> str | None:
  """The digest open_clip checks for a direct URL download (OpenAI: full; releases: prefix)."""
  if "openaipublic" in url:
    return url.split("/")[-2]
  if "mlfoundations" in url:
    return os.path.splitext(os.path.basename(url))[0].split("-")[-1]
  return None


def _tokenizer(model_cfg: dict) -> dict:
  return open_clip_config.tokenizer_entry(model_cfg)


def open_clip_entries() -> tuple[dict, dict, int]:
  """({name: {tag: entry}}, {name: {'tags', 'reason'}}, open_clip's number of pairs)."""
  models: dict[str, dict] = {}
  unsupported: dict[str, dict] = {}
  pairs = open_clip.list_pretrained()
  for name, tag in pairs:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    # QuickGELU from the tag, or from the model config itself (roberta-ViT-B-32).
    built_quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    quick = bool(cfg.get("quick_gelu", False)) or built_quick
    arch = name if name.endswith("-quickgelu") or not quick or built_quick else f"{name}-quickgelu"
    model_cfg = dict(open_clip.get_model_config(name) or {}, quick_gelu=quick)
    reason = None
    try:
      config = open_clip_config.config_from_open_clip_cfg(model_cfg)
    except hub.PretrainedError as e:
      reason = str(e).replace("open_clip config ", "")
    if reason is None and arch not in configs.list_architectures():
      reason = f"architecture {arch} is not implemented in zoo"
    if reason is None and not open_clip_config.same_towers(config, configs.get_model_config(arch)):
      reason = f"open_clip's {name} config differs from zoo's {arch}"
    if reason is not None:
      unsupported.setdefault(name, {"tags": [], "reason": reason})["tags"].append(tag)
      continue
    repo, weights = _weights(cfg["hf_hub"])
    entry = {"hf_hub": repo, "weights": weights, "layout": "open_clip", "architecture": arch,
             "quick_gelu": quick, "sha256": None,
             "preprocess": {"mean": list(cfg["mean"]), "std": list(cfg["std"]),
                            "interpolation": cfg["interpolation"],
                            "resize_mode": cfg["resize_mode"]},
             "tokenizer": _tokenizer(model_cfg)}
    if cfg.get("url"):
      entry["url"], entry["url_sha256"] = cfg["url"], _url_sha(cfg["url"])
    models.setdefault(name, {})[tag] = entry
  return models, unsupported, len(pairs)


def variant_entries(models: dict) -> dict:
  """The variants' releases (facts from their repos' own loading code)."""
  clip_tok = {"kind": "clip"}
  out = {
      "LongCLIP-ViT-B-16": {"sharegpt4v": {
          "hf_hub": "BeichenZhang/LongCLIP-B", "weights": ["longclip-B.pt"], "layout": "long_clip",
          "architecture": "LongCLIP-ViT-B-16", "quick_gelu": True, "sha256": None,
          "preprocess": OPENAI_PP, "tokenizer": clip_tok}},
      "LongCLIP-ViT-L-14": {"sharegpt4v": {
          "hf_hub": "BeichenZhang/LongCLIP-L", "weights": ["longclip-L.pt"], "layout": "long_clip",
          "architecture": "LongCLIP-ViT-L-14", "quick_gelu": True, "sha256": None,
          "preprocess": OPENAI_PP, "tokenizer": clip_tok}},
      # 4 experts, top-2, every block of both towers (clipmoe.loadMoE(..., moe_layers=24)).
      "CLIP-MoE-ViT-L-14": {
          tag: {"hf_hub": "MajorDavidZhang/CLIP-MoE", "weights": [], "weights_glob": [pattern],
                "layout": "clip_moe", "architecture": "ViT-L-14-quickgelu", "quick_gelu": True,
                "num_experts": 4, "top_k": 2, "sha256": None, "preprocess": OPENAI_PP,
                "tokenizer": clip_tok}
          for tag, pattern in (("sharegpt4v", "*sharegpt4v*.pt"),
                               ("recap_datacomp", "*recap*.pt"))},
  }
  # M-CLIP: XLM-R large student text towers over OpenAI CLIP's image towers.
  for arch, teacher in (("ViT-B-32", "XLM-Roberta-Large-Vit-B-32"),
                        ("ViT-L-14", "XLM-Roberta-Large-Vit-L-14")):
    image = models[arch]["openai"]
    out[f"xlm-roberta-large-{arch}"] = {"mclip": {
        "hf_hub": f"M-CLIP/{teacher}", "weights": list(pretrained.HF_WEIGHTS),
        "config_file": "config.json", "layout": "mclip", "architecture": "xlm-roberta-large",
        "sha256": None, "preprocess": image["preprocess"],
        "image": {k: image[k] for k in ("hf_hub", "weights", "layout", "architecture", "sha256")},
        "tokenizer": {"kind": "xlmr", "file": "sentencepiece.bpe.model"}}}
  # LLM2CLIP: OpenAI CLIP image towers tuned against LLM2CLIP-Llama-3-8B-Instruct-CC (LLM2Vec
  # mean pooling, Llama 3 Instruct template); image repo = vision_model + text_adapter.
  llm = {"hf_hub": "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned",
         "template": "llama3-instruct"}
  for arch, repo in (("ViT-B-16-quickgelu", "LLM2CLIP-Openai-B-16"),
                     ("ViT-L-14-quickgelu", "LLM2CLIP-Openai-L-14-224"),
                     ("ViT-L-14-336-quickgelu", "LLM2CLIP-Openai-L-14-336")):
    out[repo] = {"llama3_8b_cc": {
        "hf_hub": f"microsoft/{repo}", "weights": list(pretrained.HF_WEIGHTS),
        "config_file": "config.json", "layout": "llm2clip", "architecture": arch,
        "sha256": None, "preprocess": OPENAI_PP, "tokenizer": {"kind": "model"}, "llm": llm}}
  # LLM2CLIP EVA02: one EVA-CLIP CustomCLIP state dict (visual.* + text.text_adaptor.*), no
  # config.json; file <repo>.pt (as loader scripts over llm2clip/eva_clip download it).
  for arch, repo in (("EVA02-B-16", "LLM2CLIP-EVA02-B-16"),
                     ("EVA02-L-14-336", "LLM2CLIP-EVA02-L-14-336")):
    out[repo] = {"llama3_8b_cc": {
        "hf_hub": f"microsoft/{repo}", "weights": [f"{repo}.pt"], "layout": "llm2clip",
        "architecture": arch, "sha256": None, "preprocess": OPENAI_PP,
        "tokenizer": {"kind": "model"}, "llm": llm}}
  return out


def build() -> dict:
  models, unsupported, total = open_clip_entries()
  served = sum(len(t) for t in models.values())
  models.update(variant_entries(models))
  return {"generated_by": "scripts/gen_pretrained_table.py",
          "source": f"open_clip_torch {open_clip.__version__} pretrained.py",
          "open_clip_pairs": total, "open_clip_pairs_served": served,
          "models": models, "unsupported": unsupported}


# open_clip's table by family (name patterns, first match wins), for the per-family count.
FAMILIES = (("SigLIP 2", ("SigLIP2",)), ("SigLIP", ("SigLIP",)), ("NLLB-CLIP", ("nllb",)),
            ("CLIPA", ("CLIPA",)), ("EVA", ("EVA",)), ("PE-Core", ("PE-Core",)),
            ("MetaCLIP 2 worldwide", ("worldwide",)), ("ViTamin", ("ViTamin",)),
            ("MobileCLIP", ("MobileCLIP",)), ("ConvNeXt", ("convnext",)), ("CoCa", ("coca",)),
            ("HF text towers", ("roberta",)), ("ModifiedResNet", ("RN",)), ("ViT", ("ViT-",)))


def family_of(name: str) -> str:
  return next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")


def family_counts(data: dict) -> list[tuple[str, int, int]]:
  """(family, pairs zoo serves, open_clip's pairs) in FAMILIES order."""
  served = {(n, t) for n, tags in data["models"].items() for t in tags}
  counts: dict[str, list[int]] = {f: [0, 0] for f, _ in FAMILIES}
  for name, tag in open_clip.list_pretrained():
    c = counts.setdefault(family_of(name), [0, 0])
    c[0] += (name, tag) in served
    c[1] += 1
  return [(f, a, b) for f, (a, b) in counts.items() if b]


def _short(values: list[float]) -> str:
  known = {tuple(configs.OPENAI_MEAN): "OpenAI", tuple(configs.OPENAI_STD): "OpenAI",
           (0.5, 0.5, 0.5): "0.5"}
  return known.get(tuple(values), "/".join(f"{v:g}" for v in values))


def render_docs(data: dict) -> str:
  lines = [
      "# Pretrained weights",
      "",
      "Generated by `python scripts/gen_pretrained_table.py` from open_clip's pretrained table "
      f"({data['source']}); do not edit by hand.",
      "",
      "```python",
      "import zoo",
      "model, tokenizer, preprocess = zoo.create_model_and_transforms(",
      "    \"ViT-B-32\", pretrained=\"laion2b_s34b_b79k\")",
      "```",
      "",
      f"zoo serves {data['open_clip_pairs_served']} of open_clip's {data['open_clip_pairs']} "
      "(name, tag) pairs, plus the variants' releases at the end of the table. Tags trained "
      "with QuickGELU are built with the `-quickgelu` architecture. `hf-hub:ORG/REPO` loads "
      "any open_clip-format or transformers CLIP repo.",
      "",
      "| family | zoo serves | open_clip's pairs |",
      "|---|---|---|",
      *(f"| {f} | {a} | {b} |" for f, a, b in family_counts(data)),
      "",
      "| name | tag | hub repo | weights | mean / std | resize | tokenizer |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, tags in data["models"].items():
    for tag, e in tags.items():
      files = ", ".join(e["weights"] or e.get("weights_glob", []))
      pp = e["preprocess"]
      tok = e["tokenizer"]["kind"]
      lines.append(f"| {name} | {tag} | {e['hf_hub']} | {files} | {_short(pp['mean'])} / "
                   f"{_short(pp['std'])} | {pp['resize_mode']}, {pp['interpolation']} | {tok} |")
  lines += ["", "## open_clip weights zoo does not serve", "",
            "| name | tags | why |", "|---|---|---|"]
  for name, u in data["unsupported"].items():
    lines.append(f"| {name} | {len(u['tags'])} | {u['reason']} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="fail if the files are out of date")
  args = parser.parse_args(argv)
  data = build()
  outputs = {TABLE: json.dumps(data, indent=1) + "\n", DOCS: render_docs(data)}
  stale = []
  for path, text in outputs.items():
    old = None
    if os.path.isfile(path):
      with open(path) as f:
        old = f.read()
    if old != text:
      stale.append(path)
      if not args.check:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
          f.write(text)
  served = sum(len(t) for t in data["models"].values())
  print(f"{data['open_clip_pairs_served']} of {data['open_clip_pairs']} open_clip pairs, "
        f"{served} entries in all")
  if args.check and stale:
    print(f"out of date: {', '.join(os.path.relpath(p, ROOT) for p in stale)}; run "
          "python scripts/gen_pretrained_table.py", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
