"""Writing images: the last stage of generate-image, owned by the CLI (the library returns PIL images).

Rules: a target is a new name or an existing regular file (never a FIFO, device, directory or symlink), checked
with its directory before the first decode step; a batch is staged as temp files and renamed into place only
when every image encoded (all or nothing); a file this run did not create is never removed; previews
(STEM.partial.png) exist only while the run does. Every failure is one `OutputError` line naming the path.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# the text chunk that marks a preview as written by emu3-rt, so a later run may replace it
PREVIEW_KEY = "emu3_rt_preview"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IMAGE_DESCRIPTION = 0x010E


class OutputError(ValueError):
    """An output path that cannot or must not be written. The message is one line and names the path."""


def output_paths(path: Path, n: int) -> list[Path]:
    """One path for one image; STEM-0.EXT, STEM-1.EXT, ... for several."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def preview_path(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.png")


def check_target(path: Path) -> None:
    """Refuse, before any work, a path whose directory is missing or unwritable or that names a non-regular file."""
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output directory does not exist" if not parent.exists()
                          else f"{parent}: is not a directory")
    try:  # a real probe: os.access says yes to root on read-only mounts, and names no reason
        fd, probe = tempfile.mkstemp(prefix=".emu3-rt-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{parent}: output directory is not writable ({e.strerror})") from None
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: exists and is {_kind(mode)}, not a regular file; refusing to replace it")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _is_our_preview(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and PREVIEW_KEY in getattr(im, "text", {})
    except Exception:  # noqa: BLE001 - unreadable or not an image: certainly not ours
        return False


def save_image(image: Image.Image, path: Path, metadata: dict) -> None:
    """Write `image` to `path` atomically, in the format its extension names, with `metadata` (_save_options)."""
    path = Path(path)
    tmp = _stage(image, path, metadata)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def image_format(path: Path) -> str:
    """Pillow's format name for the path's extension; anything else is refused (never PNG bytes under .jpg)."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: unknown image extension {Path(path).suffix!r}; use one of "
                          f"{', '.join(sorted(FORMATS))}")
    return fmt


def _save_options(fmt: str, metadata: dict) -> dict:
    """Metadata where the format carries it: PNG text chunks ("parameters" = all of it as JSON, plus one chunk a
    key); JPEG and WebP get the same JSON as the EXIF ImageDescription (and a JPEG comment)."""
    params = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("parameters", params)
        for key, value in metadata.items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        return {"pnginfo": info}
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = params
    if fmt == "JPEG":
        return {"exif": exif, "comment": params.encode("utf-8"), "quality": 95}
    return {"exif": exif, "lossless": True}


def _stage(image: Image.Image, path: Path, metadata: dict) -> Path:
    """Encode into a hidden temp file next to `path` (same filesystem, so the rename is atomic)."""
    fmt = image_format(path)
    options = _save_options(fmt, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    except OSError as e:
        remove_quietly(Path(tmp))
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        remove_quietly(Path(tmp))
        raise
    return Path(tmp)


class ImageOutputs:
    """The files of one generate-image run: checked up front, previews while it runs, the batch at the end.

    Use as a context manager: on every exit path (error, Ctrl-C, SIGTERM turned into an exception by the CLI)
    the previews this run wrote are removed; files it did not write are never touched.
    """

    def __init__(self, path: Path, n: int, previews: bool):
        self.paths = output_paths(path, n)
        self.previews = [preview_path(p) for p in self.paths] if previews else []
        if len(set(self.paths + self.previews)) != len(self.paths) + len(self.previews):
            raise OutputError(f"{path}: the output names of this batch collide")
        for p in self.paths + self.previews:
            image_format(p)
            check_target(p)
        for p in self.previews:
            if p.exists() and not _is_our_preview(p):
                raise OutputError(f"{p}: exists and is not an emu3-rt preview; refusing to overwrite it "
                                  f"(move it or choose another -o)")
        self._written: list[Path] = []   # previews this run wrote

    def __enter__(self) -> ImageOutputs:
        return self

    def __exit__(self, *exc) -> None:
        for p in self._written:
            remove_quietly(p)

    def preview(self, row: int, image: Image.Image, rows_done: int) -> None:
        save_image(image, self.previews[row], {PREVIEW_KEY: "1", "partial_rows": rows_done})
        if self.previews[row] not in self._written:
            self._written.append(self.previews[row])

    def commit(self, images: list[Image.Image], metadata: list[dict]) -> list[Path]:
        """Write the batch: every image is encoded to a temp file first, then all are renamed into place."""
        staged: list[Path] = []
        placed: list[Path] = []
        try:
            for image, path, meta in zip(images, self.paths, metadata):
                staged.append(_stage(image, path, meta))
            for tmp, path in zip(staged, self.paths):
                os.replace(tmp, path)
                placed.append(path)
        except BaseException:
            for p in staged[len(placed):] + placed:
                remove_quietly(p)
            raise
        return self.paths


# what `generate-image --from` reads back: key -> the types a recorded value may have
_REQUEST = {"prompt": (str,), "negative_prompt": (str, type(None)), "cfg_scale": (int, float),
            "seed": (int, type(None)), "ratio": (str, type(None)), "image_area": (int, type(None)),
            "grid": (list, type(None)), "bundle_sha256": (str, type(None))}
_SAMPLING = {"greedy": (bool,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float)}


def read_request(path: Path) -> dict:
    """The request an image written by emu3-rt records (its `parameters` PNG chunk, or the EXIF ImageDescription of
    a JPEG or WebP), with every value's type checked: the file may come from anywhere."""
    from .image import load_image  # bounded: regular files only, at most MAX_IMAGE_BYTES

    image = load_image(path)
    text = (getattr(image, "text", None) or {}).get("parameters")
    if text is None:
        text = image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    if not text:
        raise OutputError(f"{path}: records no request (no emu3-rt 'parameters' metadata)")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        raise OutputError(f"{path}: its recorded request is not valid JSON") from None
    if not isinstance(meta, dict) or "prompt" not in meta or "sampling" not in meta:
        kind = "a preview (.partial.png)" if isinstance(meta, dict) and PREVIEW_KEY in meta else "not emu3-rt's"
        raise OutputError(f"{path}: its metadata is {kind}, not a finished image's request")
    for fields, where in ((_REQUEST, meta), (_SAMPLING, meta["sampling"] if isinstance(meta["sampling"], dict)
                                             else {})):
        for key, types in fields.items():
            value = where.get(key)
            if key not in where and type(None) in types:
                continue
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise OutputError(f"{path}: its recorded {key} is {json.dumps(value)[:40]}, not "
                                  f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
    return meta


def remove_quietly(path: Path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
