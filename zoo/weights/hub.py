"""Hugging Face Hub access for pretrained weights: huggingface_hub's cache (HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE, revisions), zoo's converted-model cache beside it ($ZOO_CACHE),
downloads and repo listings that work offline from the cache, and weight files read without
pickle and checked against a SHA-256 (the table's, or else the hub's LFS object id).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import re
import socket
import urllib.parse
from typing import Any, Mapping

import huggingface_hub
from huggingface_hub import constants, errors

from zoo.convert import io
from zoo.errors import UserError
from zoo.version import __version__

log = logging.getLogger("zoo.weights.pretrained")


class PretrainedError(UserError, ValueError):
  """Unknown name or tag, a file that cannot be fetched, or weights that do not fit."""


def hub_cache_dir() -> str:
  """huggingface_hub's cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
  return constants.HF_HUB_CACHE


def zoo_cache_dir() -> str:
  """Where converted checkpoints live: $ZOO_CACHE, else `zoo/` beside the hub cache."""
  if os.environ.get("ZOO_CACHE"):
    return os.path.expanduser(os.environ["ZOO_CACHE"])
  return os.path.join(os.path.dirname(os.path.abspath(hub_cache_dir())), "zoo")


def offline() -> bool:
  value = os.environ.get("HF_HUB_OFFLINE")
  if value is not None:
    return value.strip().lower() in ("1", "true", "yes", "on")

  return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def _endpoint_answers(host: str, port: int, timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def hub_reachable() -> bool:
  """Whether the hub endpoint takes a TCP connection (probed once per process, 3 s at most), so
  a machine without network fails at once instead of after huggingface_hub's retries. Behind
  a proxy (HTTPS_PROXY / ALL_PROXY) the probe is skipped: the proxy decides."""
  if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return True
  url = urllib.parse.urlparse(constants.ENDPOINT)
  return _endpoint_answers(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))


def local_only() -> bool:
  """Read only the cache: HF_HUB_OFFLINE is set, or the hub cannot be reached."""
  return offline() or not hub_reachable()


def not_cached_error(what: str) -> PretrainedError:
  """The one line for a file or repo that is neither cached nor reachable."""
  why = "HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached (no network?)"
  return PretrainedError(
      f"{what} is not in the Hugging Face cache {hub_cache_dir()} and {why}; download it once "
      "online (or point HF_HOME at a cache that holds it), set HF_HUB_OFFLINE=1 to skip the "
      "network, or pass pretrained='/path/to/weights.safetensors' (a local file)")


def download(repo_id: str, filename: str, revision: str | None = None) -> str:
  """Local path of `repo_id/filename` through huggingface_hub (cached; offline-aware)."""
  try:
    return huggingface_hub.hf_hub_download(
        repo_id, filename, revision=revision, cache_dir=hub_cache_dir(),
        local_files_only=local_only(), library_name="zoo", library_version=__version__)
  except errors.LocalEntryNotFoundError:
    raise not_cached_error(f"{repo_id}/{filename}") from None
  except (errors.EntryNotFoundError, errors.RepositoryNotFoundError,
          errors.RevisionNotFoundError) as e:
    raise FileNotFoundError(f"{repo_id}/{filename}@{revision or 'main'} not found on the hub "
                            f"({type(e).__name__})") from None
  except errors.HfHubHTTPError as e:
    raise PretrainedError(f"downloading {repo_id}/{filename} failed: {str(e).splitlines()[0]}"
                          ) from None


def download_first(repo_id: str, filenames: tuple[str, ...] | list[str],
                   revision: str | None = None) -> str:
  """The first of `filenames` the repo (or the offline cache) has."""
  misses = []
  for name in filenames:
    try:
      return download(repo_id, name, revision)
    except (FileNotFoundError, PretrainedError) as e:
      misses.append(e)
  if len(misses) == 1 or all(isinstance(e, PretrainedError) for e in misses):
    raise misses[-1]
  raise PretrainedError(f"{repo_id} has none of {', '.join(filenames)}")


def repo_files(repo_id: str, revision: str | None = None) -> list[str]:
  """File names of a hub repo: listed online, or read from the cached snapshot offline."""
  if not local_only():
    try:
      return list(huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision))
    except Exception as e:  # unreachable hub: fall back to what the cache holds
      log.info("listing %s failed (%s); reading the cache", repo_id, e)
  base = os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
  rev = revision or "main"
  ref = os.path.join(base, "refs", rev)
  if os.path.isfile(ref):
    with open(ref) as f:
      rev = f.read().strip()
  snap = os.path.join(base, "snapshots", rev)
  if not os.path.isdir(snap):
    raise not_cached_error(f"{repo_id}@{revision or 'main'}")
  return sorted(os.path.relpath(os.path.join(d, n), snap).replace(os.sep, "/")
                for d, _, names in os.walk(snap) for n in names)


def weight_names(entry: Mapping[str, Any], revision: str | None = None) -> list[str]:
  """The entry's weight file candidates; `weights_glob` patterns matched against the repo."""
  if entry.get("weights"):
    return list(entry["weights"])
  files = repo_files(entry["hf_hub"], revision)
  found = [f for pattern in entry.get("weights_glob", ())
           for f in files if fnmatch.fnmatch(f.lower(), pattern.lower())]
  if not found:
    raise PretrainedError(f"{entry['hf_hub']} has no file matching "
                          f"{', '.join(entry.get('weights_glob', ()))} (files: {', '.join(files)})")
  return found[:1]


def revision_of(path: str) -> str:
  """The commit hash of a file in huggingface_hub's cache (…/snapshots/<rev>/<file>)."""
  parts = os.path.normpath(path).split(os.sep)
  if "snapshots" in parts:
    return parts[parts.index("snapshots") + 1]
  return "local"


def verify_file(path: str, sha256: str | None = None) -> None:
  """The table's SHA-256 when given, else the hub's LFS object id (the blob's file name)."""
  label = path
  if not sha256:
    blob = os.path.basename(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", blob):
      sha256, label = blob, f"{path} (hub LFS object {blob[:12]}...)"
  if sha256:
    try:
      io.check_sha256(path, sha256, label=label)
    except io.WeightFileError as e:
      raise PretrainedError(str(e)) from None


def read_weights(path: str, sha256: str | None = None) -> dict[str, Any]:
  verify_file(path, sha256)
  try:
    return io.read_state_dict(path)
  except io.WeightFileError as e:
    raise PretrainedError(str(e)) from None


def model_directory(repo_id: str, revision: str | None = None) -> str:
  """A transformers model repo's snapshot directory with config.json, tokenizer.json (and
  tokenizer_config.json when the repo has one) and its safetensors: model.safetensors, or the
  index and every shard it names (each file through `download`, so offline reads the cache)."""
  config = download(repo_id, "config.json", revision)
  download(repo_id, "tokenizer.json", revision)
  try:
    download(repo_id, "tokenizer_config.json", revision)
  except (FileNotFoundError, PretrainedError):
    pass
  try:
    index = download(repo_id, "model.safetensors.index.json", revision)
  except (FileNotFoundError, PretrainedError):
    download(repo_id, "model.safetensors", revision)
    return os.path.dirname(config)
  with open(index) as f:
    shards = sorted(set((json.load(f).get("weight_map") or {}).values()))
  for name in shards:
    download(repo_id, name, revision)
  return os.path.dirname(config)
