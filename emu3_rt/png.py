"""PNG output: atomic writes (temp file + rename, so no partial PNG ever looks finished) with text metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def output_paths(path: Path, n: int) -> list[Path]:
    """One path for one image; STEM-0.png, STEM-1.png, ... for several."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def save_png(image: Image.Image, path: Path, metadata: dict) -> None:
    """Write `image` to `path` atomically, with `metadata` as a JSON "parameters" text chunk plus one chunk a key."""
    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(Path(tmp))
        raise


def remove_quietly(path: Path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
