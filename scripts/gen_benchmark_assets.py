"""Writes zoo/assets/benchmark_{classnames,templates,languages}.json and nllb_languages.json
from CLIP_benchmark's files.

Usage: pip download clip-benchmark==1.6.2 --no-deps && unzip clip_benchmark-1.6.2-*.whl -d cb
       python scripts/gen_benchmark_assets.py cb/clip_benchmark
Values are copied unchanged: <lang>_classnames.json, <lang>_zeroshot_classification_templates.json,
the ImageNet-A / -R / -O WordNet-id subsets and VOC2007's categories (datasets/builder.py,
datasets/voc2007.py), each multilingual retrieval set's SUPPORTED_LANGUAGES, and the language
code -> NLLB (FLORES-200) source-language token map its NLLB-CLIP evaluation sets
(models/nllb_clip.py `lang_map`).
"""

import ast
import json
import os
import sys

SOURCE = ("CLIP_benchmark 1.6.2 (https://github.com/LAION-AI/CLIP_benchmark, PyPI clip-benchmark"
          "==1.6.2), clip_benchmark/datasets/: {files}; written by scripts/gen_benchmark_assets.py")
NLLB_SOURCE = SOURCE.replace("clip_benchmark/datasets/: {files}",
                             "clip_benchmark/models/nllb_clip.py (lang_map)")
# torchvision reads CIFAR-10's names from the dataset's batches.meta (label_names), in this order.
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _assignments(path):
  out = {}
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
      try:
        out[node.targets[0].id] = ast.literal_eval(node.value)
      except ValueError:
        pass
  return out


def main(root):
  ds = os.path.join(root, "datasets")
  langs = sorted(f.split("_")[0] for f in os.listdir(ds) if f.endswith("_classnames.json"))
  classnames, templates = {}, {}
  for lang in langs:
    classnames[lang] = json.load(open(os.path.join(ds, f"{lang}_classnames.json"), encoding="utf-8"))
    templates[lang] = json.load(open(os.path.join(ds, f"{lang}_zeroshot_classification_templates.json"),
                                     encoding="utf-8"))
  builder = _assignments(os.path.join(ds, "builder.py"))
  wnids = builder["all_imagenet_wordnet_ids"]
  en = classnames["en"]
  en["imagenet1k_wnids"] = wnids
  for sub in ("imagenet_a", "imagenet_r", "imagenet_o"):
    keep = set(builder[f"{sub}_wnids"])
    en[sub.replace("_", "-")] = [c for c, w in zip(en["imagenet1k"], wnids) if w in keep]
    en[sub.replace("_", "-") + "_wnids"] = [w for w in wnids if w in keep]
  en["voc2007"] = _assignments(os.path.join(ds, "voc2007.py"))["object_categories"]
  en["cifar10"] = CIFAR10
  flores = _assignments(os.path.join(ds, "flores_langs.py"))["flores_languages"]
  languages = {}
  for name, module in [("multilingual_mscoco_captions", "multilingual_mscoco"),
                       ("crossmodal3600", "crossmodal3600"), ("xtd10", "xtd10"),
                       ("xtd200", "xtd200"), ("flickr30k-200", "flickr30k_200")]:
    found = _assignments(os.path.join(ds, module + ".py")).get("SUPPORTED_LANGUAGES", flores)
    languages[name] = list(found)
  languages["imagenet1k"] = langs
  out = os.path.join(os.path.dirname(__file__), "..", "zoo", "assets")
  for fname, files, data in [
      ("benchmark_classnames.json", "<lang>_classnames.json, builder.py, voc2007.py "
       "(cifar10: the dataset's batches.meta)", classnames),
      ("benchmark_templates.json", "<lang>_zeroshot_classification_templates.json", templates),
      ("benchmark_languages.json", "multilingual_mscoco.py, crossmodal3600.py, xtd10.py, "
       "xtd200.py, flickr30k_200.py, flores_langs.py (SUPPORTED_LANGUAGES)", languages)]:
    with open(os.path.join(out, fname), "w", encoding="utf-8") as f:
      json.dump({"_source": SOURCE.format(files=files), **data}, f, ensure_ascii=False, indent=0)
      f.write("\n")
  nllb = _assignments(os.path.join(root, "models", "nllb_clip.py"))["lang_map"]
  with open(os.path.join(out, "nllb_languages.json"), "w", encoding="utf-8") as f:
    json.dump({"_source": NLLB_SOURCE, **nllb}, f, ensure_ascii=False, indent=0)
    f.write("\n")


if __name__ == "__main__":
  main(sys.argv[1])
