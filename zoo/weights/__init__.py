"""Weights on disk and on the hub (the conversion of external layouts is zoo.convert).

model_dir.py  zoo.save / zoo.load: a model directory (Orbax weights + config record, atomic)
layout.py     what model directories and train checkpoints share (errors, markers, JSON)
hub.py        huggingface_hub downloads, offline mode, the converted-model cache
pretrained.py the pretrained table: `create(name, pretrained=tag)`, export to open_clip
adapters.py   LoRA adapter files and `config.peft`
"""
