"""A WebDataset shard with a truncated JPEG and an empty caption trains through, 2 skipped."""

import json

import grain
import numpy as np

from tests.train_utils import tiny_config
from zoo.data import demo, webdataset as wds


def test_train_through_corrupt_webdataset_samples(tmp_path):
  samples = [demo.make_sample(demo.SPLIT_SEEDS["test"], i, 32) for i in range(10)]
  image = wds.encode_image(samples[2]["image"])
  samples[2] = dict(samples[2], image=image[: len(image) // 2])  # truncated JPEG
  samples[7] = dict(samples[7], caption="")  # empty caption
  paths = wds.write_shards(samples, str(tmp_path / "shards"), samples_per_shard=5)

  # One step of batch 8 reads the whole 10-sample epoch when its last position is usable.
  valid = np.array([i not in (2, 7) for i in range(10)])
  seed = next(s for s in range(50) if valid[grain.MapDataset.range(10).shuffle(seed=s)[9]])
  config = tiny_config(seed=seed, batch_size=8, total_steps=1)
  config.data.name = "webdataset"
  config.data.shards = ",".join(paths)
  from zoo.train import loop

  result = loop.train(config, str(tmp_path / "run"))
  assert result["step"] == 1 and np.isfinite(result["losses"][0])
  assert result["skipped"] == 2
  with open(tmp_path / "run" / "train_log.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records[-1]["skipped_samples"] == 2
