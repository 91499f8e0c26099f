"""python -m zoo.convert push: publish a model to the Hugging Face hub in open_clip's layout.

  python -m zoo.convert push --input DIR --repo ORG/NAME [--private] [--revision main] [--dry-run]

DIR is a zoo.save directory (exported first with zoo.export_pretrained) or a directory that
already holds open_clip_config.json + open_clip_model.safetensors. The upload is
`huggingface_hub.HfApi().create_repo(ORG/NAME, exist_ok=True)` then `upload_folder(...)`
(log in with `hf auth login` or set HF_TOKEN); afterwards
`open_clip.create_model_and_transforms("hf-hub:ORG/NAME")` and `zoo.create("hf-hub:ORG/NAME")`
load it. `--dry-run` prints the plan and uploads nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from zoo import errors

LAYOUT_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def _staged(directory: str, workdir: str) -> str:
  """`directory` if it already has the open_clip layout, else its export into `workdir`."""
  if all(os.path.isfile(os.path.join(directory, f)) for f in LAYOUT_FILES):
    return directory
  from zoo.weights import model_dir, pretrained

  if not os.path.isfile(os.path.join(directory, model_dir.CONFIG_FILE)):
    raise ValueError(f"{directory} holds neither {' + '.join(LAYOUT_FILES)} nor a zoo.save "
                     f"checkpoint ({model_dir.CONFIG_FILE})")
  model, _, preprocess = model_dir.load(directory)
  return pretrained.export_pretrained(model, workdir, preprocess=preprocess)


def run_push(argv: list[str] | None = None) -> int:
  parser = errors.ArgumentParser(prog="python -m zoo.convert push", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="zoo.save dir or open_clip layout dir")
  parser.add_argument("--repo", required=True, help="hub repo id, ORG/NAME")
  parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
  parser.add_argument("--private", action="store_true", help="create the repo as private")
  parser.add_argument("--message", default="Upload zoo model (open_clip layout)")
  parser.add_argument("--dry-run", action="store_true", help="print the plan, upload nothing")
  args = parser.parse_args(argv)
  if args.repo.count("/") != 1:
    parser.error(f"--repo {args.repo!r} must be ORG/NAME")
  if not os.path.isdir(args.input):
    raise FileNotFoundError(f"--input {args.input}: no such directory")
  with tempfile.TemporaryDirectory() as tmp:
    folder = _staged(os.path.abspath(args.input), tmp)
    files = sorted(os.listdir(folder))
    plan = (f"upload {', '.join(files)} from {folder} to hf-hub:{args.repo}"
            f"@{args.revision or 'main'}{' (private)' if args.private else ''}")
    if args.dry_run:
      print(f"dry run: would {plan}")
      return 0
    import huggingface_hub

    api = huggingface_hub.HfApi()
    api.create_repo(args.repo, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=args.repo, folder_path=folder, revision=args.revision,
                             commit_message=args.message)
    print(f"done: {plan} ({getattr(info, 'commit_url', info)})")
  return 0


def cli(argv: list[str] | None = None) -> int:
  """run_push() with input errors as one line on stderr and exit code 2."""
  try:
    return run_push(argv)
  except errors.USER_ERRORS as e:
    return errors.report(e, "python -m zoo.convert push")
