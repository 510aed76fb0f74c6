"""Every file the project reads or writes on a user-given path goes through here, local paths and URLs alike.

Built on `etils.epath`, the layer orbax uses for checkpoints, so a workdir like gs://BUCKET/run means one place to
the trainer's files and to orbax. With TensorFlow installed (a dependency here) epath hands gs:// to tf.io.gfile, the
client tf.data and TensorBoard use; with EPATH_USE_TF=false it uses fsspec (gcsfs), which is how the tests point it
at a local GCS emulator. Python's open/os functions must not see a URL: os.makedirs("gs://b/run") makes a local
folder named "gs:".
"""
from __future__ import annotations

import io
import json
import os
import time

from etils import epath

Path = epath.Path


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def absolute(path) -> str:
    """A local path made absolute (orbax needs that); a URL as it is."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def join(path, *parts) -> str:
    return os.fspath(Path(path).joinpath(*parts))


def walk(top):
    """(folder, subfolders, files) as strings under `top`, like os.walk; local folders follow symlinks."""
    if not is_url(top):
        yield from os.walk(top, followlinks=True)
        return
    scheme = os.fspath(top).split("://")[0] + "://"
    for root, dirs, files in Path(top).walk():
        root = os.fspath(root)  # fsspec drops the scheme (bucket/dir), tf.io.gfile keeps it
        yield (root if is_url(root) else scheme + root.lstrip("/")), list(dirs), list(files)


def makedirs(path):
    Path(path).mkdir(parents=True, exist_ok=True)


def makedirs_for(path):
    """The folder that will hold the file `path`."""
    makedirs(Path(absolute(path)).parent)


def write_json(path, obj, **kwargs):
    write_bytes(path, json.dumps(obj, **kwargs).encode())


def write_bytes(path, data: bytes):
    """Whole or not at all: an object store replaces an object atomically; a local file is renamed into place."""
    makedirs_for(path)
    if is_url(path):
        Path(path).write_bytes(data)
    else:
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def savefig(fig, path, **kwargs):
    """matplotlib's savefig on any filesystem (rendered in memory, then written)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1][1:] or "png", **kwargs)
    write_bytes(path, buf.getvalue())


def open_image(path):
    """A PIL image, fully read; FileNotFoundError names the path."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    im = Image.open(io.BytesIO(Path(path).read_bytes()))
    im.load()
    return im


def torch_save(obj, path):
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def torch_load(path, **kwargs):
    import torch

    return torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", **kwargs)


def check_writable(folder, name: str):
    """Create `folder` and write a probe file there: a clear error now instead of one at the first checkpoint."""
    probe = Path(folder) / ".write_test"
    try:
        makedirs(folder)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 (each filesystem raises its own types: OSError, tf.errors, HTTP errors)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OSError(f"cannot write to {name} ({reason}); choose a folder or bucket you can write to") from e


class GrowingFile:
    """A file that only grows (metrics.jsonl, TensorBoard events, log.txt), on any filesystem.

    Object stores cannot append, so on a URL the whole file is kept in memory and rewritten at most every
    `every_seconds` and at flush()/close(); the lines already there when it was opened are kept (a resumed run
    continues the file). A local file is appended to and flushed at every write, so readers see each line at once.
    """

    def __init__(self, path, every_seconds: float = 120.0):  # tf.summary's default flush interval
        self.path, self.every_seconds = Path(path), every_seconds
        makedirs_for(path)
        if is_url(path):
            self._file = None
            self._data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
            self._dirty, self._last = False, time.monotonic()
        else:
            self._file = self.path.open("ab")

    def write(self, data: bytes):
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
            return
        self._data += data
        self._dirty = True
        if time.monotonic() - self._last >= self.every_seconds:
            self.flush()

    def flush(self):
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            self.path.write_bytes(bytes(self._data))
            self._dirty, self._last = False, time.monotonic()

    def close(self):
        """Idempotent: the trainer closes on every way out."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        elif self._file is None:
            self.flush()
