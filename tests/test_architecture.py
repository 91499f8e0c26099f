"""Architecture rules over the import graph (ast), the family seam with a toy family defined
here alone and trained through the public loop, configs as pure data, and ruff."""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from tests import source_ast
from tests.train_utils import tiny_config
from zoo import families, losses
from zoo.families import clip as clip_family
from zoo.train import loop as train_lib, trainer as trainer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo"
MODEL_SIDE = ("zoo.models",)
LOOP_SIDE = ("zoo.train", "zoo.eval", "zoo.data", "zoo.weights", "zoo.convert", "zoo.families",
             "absl", "ml_collections")
FAMILY_MODULE_NAMES = ("zoo.families", "zoo.models")
# Files the architecture work owns: docstring length, top-level imports, private calls, size.
OWNED = [*sorted((ZOO / "models").glob("*.py")), *sorted((ZOO / "families").rglob("*.py")),
         *sorted((ZOO / "data").glob("*.py")),
         *[ZOO / "convert" / f for f in ("cli.py", "io.py", "long_clip.py", "clip_moe.py",
                                         "mclip.py", "__main__.py")],
         *sorted((ZOO / "train").glob("*.py")), *sorted((ZOO / "eval").glob("*.py")),
         *sorted((ZOO / "weights").glob("*.py"))]
OPTIONAL_DEPS = ("torch", "open_clip", "transformers", "tensorflow", "tensorflow_datasets", "zoo.data.tfds")


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def zoo_files() -> list[pathlib.Path]:
  return sorted(p for p in ZOO.rglob("*.py") if "assets" not in p.parts)


MODULES = {module_name(p): p for p in zoo_files()}


def imports_of(path: pathlib.Path) -> list[tuple[str, bool]]:
  """(imported module, at top level) for every import in the file; `from a import b` names
  the submodule a.b when that is a module."""
  tree = source_ast.parse(path)
  top = {id(n) for n in tree.body}
  package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, id(node) in top) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - node.level + 1]
        mod = ".".join(parent + ([mod] if mod else []))
      for a in node.names:
        sub = f"{mod}.{a.name}"
        out.append((sub if sub in MODULES else mod, id(node) in top))
  return out


def is_under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_model_code_imports_no_loop_data_convert_family_or_config():
  bad = [(m, dep) for m, p in MODULES.items() if is_under(m, MODEL_SIDE)
         for dep, _ in imports_of(p) if is_under(dep, LOOP_SIDE)]
  assert not bad, bad


def test_data_imports_no_eval_train_or_families_and_families_never_the_loop():
  bad = [(m, dep) for m, p in MODULES.items() if is_under(m, ("zoo.data",))
         for dep, _ in imports_of(p)
         if is_under(dep, ("zoo.eval", "zoo.train", "zoo.families"))]
  bad += [(m, dep) for m, p in MODULES.items() if is_under(m, ("zoo.families",))
          for dep, _ in imports_of(p) if is_under(dep, ("zoo.train",))]
  assert not bad, bad


def test_no_import_cycles_among_zoo_modules():
  """Every import (top level or not) is an edge; a package's own submodules importing their
  parent package implicitly is not (Python runs the parent first)."""
  graph = {m: {d for d, _ in imports_of(p) if d in MODULES and d != m}
           for m, p in MODULES.items()}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m: str) -> None:
    state[m] = 1
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


# The dynamic imports left: zoo.__getattr__ imports zoo.convert lazily; zoo.weights.model_dir rebuilds
# the class a checkpoint names (restricted to zoo). Neither looks up a family.
ALLOWED_DYNAMIC_IMPORTS = {("zoo", "zoo.convert"), ("zoo.weights.model_dir", "<dynamic>")}


def test_no_importlib_lookups_of_family_modules():
  found, tables = set(), []
  for path in zoo_files():
    for node in ast.walk(source_ast.parse(path)):
      if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name in ("import_module", "__import__"):
          arg = node.args[0] if node.args else None
          found.add((module_name(path), arg.value if isinstance(arg, ast.Constant)
                     else "<dynamic>"))
      if isinstance(node, (ast.Dict, ast.Tuple, ast.List, ast.Set)):
        values = node.values if isinstance(node, ast.Dict) else node.elts
        tables += [(module_name(path), v.value) for v in values
                   if isinstance(v, ast.Constant) and isinstance(v.value, str)
                   and is_under(v.value, FAMILY_MODULE_NAMES)]
  assert found <= ALLOWED_DYNAMIC_IMPORTS, found
  # The one table of module names: the loader's old -> new rename of classes recorded by model
  # directories written before the layout move (it maps names; it looks up no family).
  tables = [(m, v) for m, v in tables if m != "zoo.weights.model_dir"]
  assert not tables, f"module-name tables (lookups by name): {tables}"


TEST_EXTRAS = ("torch", "open_clip", "open_clip_train", "transformers", "timm", "tensorflow")


def test_test_files_import_extras_only_through_importorskip():
  """CI's Python 3.12 stage collects every test file without torch: a bare top-level import of
  an extra there is a collection error, not a skip (use pytest.importorskip)."""
  bare = []
  for path in sorted((ROOT / "tests").glob("*.py")):
    for node in source_ast.parse(path).body:
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      bare += [f"{path.name}: {n}" for n in names if is_under(n, TEST_EXTRAS)]
  assert not bare, bare


def test_configs_import_only_base_and_ml_collections():
  """Experiment files import only configs.base; base reads the defaults zoo defines once."""
  for path in sorted((ROOT / "configs").glob("*.py")):
    for node in ast.walk(source_ast.parse(path)):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module if node.module != "configs" else f"configs.{a.name}"
                 for a in node.names]
      else:
        continue
      allowed = ("configs.base", "ml_collections", "__future__")
      if path.name == "base.py":
        allowed += ("zoo.families", "zoo.families.moe", "zoo.families.region", "zoo.weights")
      assert all(n in allowed for n in names), (path.name, names)


@pytest.mark.parametrize("path", OWNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_owned_modules_docstring_imports_size_and_private_calls(path):
  source = path.read_text()
  tree = source_ast.parse(path)
  doc = ast.get_docstring(tree, clean=False) or ""
  assert doc and len(doc.strip().splitlines()) <= 15, "module docstring missing or > 15 lines"
  assert len(source.splitlines()) <= 470, "module over ~450 lines"
  nested = [d for d, top in imports_of(path) if not top and not is_under(d, OPTIONAL_DEPS)]
  assert not nested, f"imports inside functions: {nested}"
  aliases = {}
  for node in tree.body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      for a in node.names:
        aliases[a.asname or a.name.split(".")[0]] = a.name
  private = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
             and n.value.id in aliases and n.attr.startswith("_") and not n.attr.startswith("__")]
  assert not private, f"cross-module private access: {private}"


def test_auto_values_resolve_for_the_backend():
  c = base.base_config()
  assert c.dtype == "auto" and c.loss.impl == "auto"
  cpu = jax.default_backend() == "cpu"
  assert families.base.resolve_dtype("auto") == ("float32" if cpu else "bfloat16")
  assert losses.resolve_impl("auto") == ("xla" if cpu else "pallas")
  assert losses.resolve_impl("reference") == "reference"
  # Per platform compiled for (what the loss itself picks when lowering, from any host).
  assert losses.resolve_impl("auto", "tpu") == "pallas"
  assert losses.resolve_impl("auto", "cpu") == "xla"


# ----------------------------------------------------------------------------- toy family


@dataclasses.dataclass(frozen=True)
class LengthSettings:
  weight: float = 0.5
  max_words: int = 32


class CaptionLengthFields:
  """Field hook: `caption_words` (float32, the caption's word count / max_words)."""

  fields = {"caption_words": "float32 [b], caption word count / max_words"}

  def __init__(self, max_words: int):
    self.max_words = max_words

  def __call__(self, sample, view):
    if "caption_words" not in view.fields:
      return {}
    return {"caption_words": np.float32(len(sample["caption"].split()) / self.max_words)}


class CaptionLengthFamily(clip_family.ClipFamily):
  """CLIP plus a probe loss: the first text-feature dimension regresses the caption length."""

  name = "toy_caption_length"
  fields = ("image", "tokens", "caption_words")

  def settings(self, config):
    return families.base.parse_section(config, "caption_length", LengthSettings)

  def field_hook(self, config, settings, model):
    return CaptionLengthFields(settings.max_words)

  def forward(self, model, batch, rng, settings):
    out = dict(super().forward(model, batch, rng, settings))
    out["length_pred"] = out["text_features"][:, 0]
    return out

  def loss(self, outputs, batch, ctx):
    clip, metrics = super().loss(outputs, batch, ctx)
    length = jnp.mean(jnp.square(outputs["length_pred"] - batch["caption_words"]))
    total = clip + ctx.settings.weight * length
    return total, {**metrics, "clip_loss": clip, "length_loss": length, "loss": total}

  def evaluate(self, model, config, settings, tokenizer, mesh):
    return {"toy/max_words": float(settings.max_words)}


def test_a_family_defined_in_this_file_trains_through_the_public_seam(tmp_path):
  families.register(CaptionLengthFamily(), overwrite=True)
  config = tiny_config(family="toy_caption_length", total_steps=3, batch_size=8, eval_every=3)
  config.data.size = 64
  config.data.eval_size = 16
  config.data.eval_sets = "retrieval"
  config.caption_length = ml_collections.ConfigDict(dict(weight=2.0, max_words=16))
  summary = train_lib.train(config, str(tmp_path / "run"))
  assert summary["step"] == 3 and np.all(np.isfinite(summary["losses"]))
  m = summary["metrics"]
  assert m["length_loss"] > 0 and m["loss"] == pytest.approx(m["clip_loss"] + 2.0 * m["length_loss"],
                                                             rel=1e-5)
  assert summary["eval"]["toy/max_words"] == 16.0 and "retrieval/text_retrieval_recall@1" in summary["eval"]
  assert os.path.isdir(tmp_path / "run" / "model")
  config.caption_length.bogus = 1
  with pytest.raises(ValueError, match="unknown config.caption_length key 'bogus'"):
    trainer_lib.build_trainer(config)


# ----------------------------------------------------------------------------- ruff


def test_ruff_clean():
  cmd = ["ruff", "check", "zoo", "kernels", "configs", "tests", "bench", "train.py", "eval.py"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_convert_cli_lists_every_layout():
  result = subprocess.run([sys.executable, "-m", "zoo.convert", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0
  for command in ("from-open-clip", "to-hf", "from-long-clip", "to-clip-moe", "build-mclip",
                  "to-mclip"):
    assert command in result.stdout
  bad = subprocess.run([sys.executable, "-m", "zoo.convert", "to-mclip", "--input",
                        str(ROOT / "missing"), "--output", str(ROOT / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_list_models_and_list_pretrained_agree():
  """Every pretrained name is a model name; a release name (weights fix its architecture)
  asks for `pretrained=` in one line; an architecture builds."""
  import zoo
  from zoo.models import configs
  from zoo.weights import hub

  names = set(zoo.list_models())
  assert {n for n, _ in zoo.list_pretrained()} <= names
  releases = sorted(names - set(configs.list_architectures()))
  assert releases, "the table has releases (CLIP-MoE, M-CLIP) that are not plain architectures"
  for name in releases:
    with pytest.raises(hub.PretrainedError, match="pretrained="):
      zoo.create(name)
