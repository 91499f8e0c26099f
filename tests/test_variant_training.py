"""The SigLIP / SigLIP 2 (NaFlex) / CLIPA / MetaCLIP 2 towers in training: unknown names answered
with the nearest known one."""

from __future__ import annotations

import json

import pytest

import zoo
from tests.cli_run import lines, run
from zoo.weights import hub, model_dir


def test_unknown_architecture_names_the_nearest_one(tmp_path):
  with pytest.raises(ValueError) as e:
    zoo.create("ViT-B-16-SigLIP2-999")
  assert str(e.value) == ("Unknown model 'ViT-B-16-SigLIP2-999' (did you mean "
                          "'ViT-B-16-SigLIP2'?); see zoo.list_models()")
  with pytest.raises(ValueError, match=r"did you mean 'ViT-B-32'\?"):
    zoo.create("vit-b-32")  # case-insensitive
  with pytest.raises(hub.PretrainedError, match=r"did you mean 'ViT-SO400M-14-SigLIP2'\?"):
    zoo.create("ViT-SO400M-14-SigLIP-2", pretrained="webli")
  # a checkpoint written by a zoo that has an architecture class this one lacks
  saved = model_dir.save(zoo.create("test-tiny"), tmp_path / "ckpt")
  record_path = tmp_path / "ckpt" / model_dir.CONFIG_FILE
  record = json.loads(record_path.read_text())
  record["model_class"] = "zoo.models.clip.CLIPP"
  record_path.write_text(json.dumps(record))
  with pytest.raises(ValueError) as e:
    zoo.load(saved)
  assert "\n" not in str(e.value)
  assert "'zoo.models.clip.CLIPP'" in str(e.value) and "did you mean 'CLIP'?" in str(e.value)
  # at the command line: one line, exit 2, before the (here empty) weight file is read
  (tmp_path / "w.safetensors").write_bytes(b"")
  proc = run("-m", "zoo.convert", "from-open-clip", "--model", "ViT-B-16-SigLIP2-999",
             "--input", str(tmp_path / "w.safetensors"), "--output", str(tmp_path / "out"))
  err = lines(proc.stderr)
  assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
  assert "Unknown model 'ViT-B-16-SigLIP2-999' (did you mean 'ViT-B-16-SigLIP2'?)" in err[0]
