"""Finding weights offline: an explicit path, else a registry name in the search folders
(``$DINOV3GEO_WEIGHTS``, then the cache), else a download only when allowed; and checking an
official Meta file's SHA-256 against the prefix in its name (once per file)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import WeightsError, WeightsNotFoundError, short_message
from . import registry
from .identity import file_sha256


def cache_dir() -> Path:
    """Where dinov3-geo looks for weights by name: ``$DINOV3GEO_CACHE`` or ``~/.cache/dinov3-geo``."""
    env = os.environ.get("DINOV3GEO_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dinov3-geo"


def search_dirs() -> list[Path]:
    """The folders searched for weights by name, in order: ``$DINOV3GEO_WEIGHTS``, the cache."""
    dirs = []
    if os.environ.get("DINOV3GEO_WEIGHTS"):
        dirs.append(Path(os.environ["DINOV3GEO_WEIGHTS"]))
    dirs.append(cache_dir())
    return dirs


def resolve_weights(name_or_path: os.PathLike | str, allow_download: Optional[bool] = None) -> Path:
    """A local path for the weights: the path itself, or a registry name found in the search dirs.

    Downloads (through ``huggingface_hub``, gated repos need a token) happen only when
    ``allow_download`` is true or ``DINOV3GEO_ALLOW_DOWNLOAD=1``.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    info = registry.find_by_name(str(name_or_path))
    if info is None:
        raise WeightsError(path, "file not found" if _looks_like_path(str(name_or_path)) else
                           f"unknown weights name; known: {', '.join(registry.BACKBONES)}")
    for folder in search_dirs():
        for candidate in (folder / info.filename, folder / info.hf_repo.split("/")[1]):
            if candidate.exists():
                return candidate
    if allow_download is None:
        allow_download = os.environ.get("DINOV3GEO_ALLOW_DOWNLOAD") == "1"
    if allow_download:
        return _download(info)
    raise WeightsNotFoundError(
        info.name,
        f"weights not found. Request the gated weights at {registry.GATED_WEIGHTS_URL} (Meta file "
        f"{info.filename}) or https://huggingface.co/{info.hf_repo}, then put the file or the HF folder "
        f"in {search_dirs()[0]} (or set DINOV3GEO_WEIGHTS), or pass its path")


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.endswith((".pth", ".pt", ".safetensors", ".bin"))


def _download(info: registry.WeightsInfo) -> Path:
    from huggingface_hub import snapshot_download

    target = cache_dir() / info.hf_repo.split("/")[1]
    try:
        snapshot_download(info.hf_repo, local_dir=str(target))
    except Exception as exc:  # network, authorisation: all one message
        raise WeightsNotFoundError(info.name, f"download from {info.hf_repo} failed: {short_message(exc)}") from exc
    return target


def verify_official_hash(path: os.PathLike | str) -> bool:
    """Check a Meta file's SHA-256 against the prefix in its name; False if the name has none.

    A verified file is remembered (by size and mtime) in the cache dir, so a 27 GB file is hashed once.
    """
    path = Path(path)
    expected = registry.official_hash_prefix(path.name)
    if expected is None or path.is_dir():
        return False
    stat = path.stat()
    stamp = cache_dir() / "verified" / f"{path.name}.{stat.st_size}.{int(stat.st_mtime)}"
    if stamp.exists():
        return True
    actual = file_sha256(path)
    if not actual.startswith(expected):
        raise WeightsError(path, f"SHA-256 {actual[:8]}… does not match the {expected} in the file name "
                                 "(damaged or renamed download); pass `verify=False` to load it anyway")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:
        pass
    return True
