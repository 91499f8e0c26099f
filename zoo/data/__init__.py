"""zoo data: grain pipelines over the embedded demo data, WebDataset tar shards and TFDS.

Train loops call `build_train_pipeline` (host-local batches, exact resume via get_state /
set_state, skipped-sample count in `.skipped`; a family's extra fields through its
`FieldHook`); evaluation calls `build_eval_sets`.
"""

from zoo.data import babel, demo, webdataset
from zoo.data.pipeline import (
    ALL_DEMO_EVAL_SETS,
    FIELDS,
    DataIterator,
    FieldHook,
    HostSliceMapDataset,
    SampleProcessor,
    SampleView,
    Skipped,
    build_eval_sets,
    build_train_pipeline,
    demo_eval_sets,
    webdataset_retrieval_set,
)
from zoo.data.webdataset import SkipSample, TarShardSource, decode_sample, write_shards

__all__ = [
    "ALL_DEMO_EVAL_SETS", "FIELDS", "DataIterator", "FieldHook", "HostSliceMapDataset",
    "SampleProcessor", "SampleView", "SkipSample", "Skipped", "TarShardSource", "babel",
    "build_eval_sets", "build_train_pipeline", "decode_sample", "demo", "demo_eval_sets",
    "webdataset", "webdataset_retrieval_set", "write_shards",
]
