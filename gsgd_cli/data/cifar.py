"""CIFAR-10/100 "python version" batches, read without running code from them.

The batches are pickles by format: a dict with `data` (uint8 `[N, 3072]`, the three 32x32
colour planes of each image) and `labels` (CIFAR-10) or `fine_labels` (CIFAR-100). Plain
`pickle.load` (what torchvision does) runs whatever a crafted file asks for, so they are read
here with an unpickler that builds only numpy arrays, dtypes and Python's own containers,
numbers and strings; any other object in the file stops the load with one line naming it.

With `data.download=true` torchvision downloads the archive (md5-checked) and every batch is
checked against torchvision's md5 list before it is read; files under a user's `data.root`
(copied or generated) are read without the md5 check but through the same restricted reader.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import shlex
from pathlib import Path

import numpy as np
import torch

from gsgd_cli import safe_files
from gsgd_cli.errors import DataNotFoundError, UserError

from . import fingerprint
from .common import check_labels

MAX_BATCH_BYTES = 1 << 30   # CIFAR-100's training file, the largest, is 155 MB

LAYOUT = {   # folder, training files, test files, label key, classes
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}
LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as found   # numpy >= 2
    except ImportError:   # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as found
    return found


def _frombuffer():
    try:
        from numpy._core.numeric import _frombuffer as found
    except ImportError:   # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer as found
    return found


def _latin1_encode(text, encoding="utf-8"):
    """`_codecs.encode` as protocol-2 pickles use it for bytes, for the latin-1 codec only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin-1")


def _empty_bytes(*args):
    """`bytes()` as protocol-2 pickles write an empty byte string (e.g. an empty array's data);
    nothing else (`bytes(n)` would allocate n bytes)."""
    if args:
        raise pickle.UnpicklingError("bytes(...) with arguments is not allowed")
    return b""


# What numpy arrays pickle into (protocols 2 to 5, numpy 1 and 2 module names).
_ALLOWED = {
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class NotAllowed(pickle.UnpicklingError):
    pass


class BatchUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain Python values only; any other global is refused."""

    def find_class(self, module: str, name: str):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise NotAllowed(f"{module}.{name}")
        return make()


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 `[N, 3, 32, 32]` and labels int64 `[N]` in [0, num_classes) of one batch."""
    fix = ("replace it with the original file (data.download=true downloads the originals and "
           "checks their md5)")
    try:
        stored = safe_files.read_bytes(path, MAX_BATCH_BYTES, follow_links=True)
    except OSError as exc:
        reason = exc if isinstance(exc, safe_files.UnsafeFileError) else exc.strerror
        raise UserError(f"cannot read {path}: {reason}; {fix}.") from None
    fingerprint.note(path, stored)
    try:
        entry = BatchUnpickler(io.BytesIO(stored), encoding="latin1").load()
    except NotAllowed as exc:
        raise UserError(f"refusing to read {path}: it contains objects that are not allowed in "
                        f"a CIFAR batch ({exc}), which could run code when loaded; {fix}.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path}: the file is corrupt or truncated ({reason[:150]}); "
                        f"{fix}.") from None
    if isinstance(entry, dict):
        entry = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get(label_key) if isinstance(entry, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise UserError(f"{path} is not a CIFAR batch (a dict with 'data' and '{label_key}'); "
                        f"{fix}.")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path} holds 'data' of shape {list(data.shape)} and type {data.dtype}, "
                        f"not uint8 [N, 3072] (N images of 3x32x32); {fix}.")
    if not _integer_labels(labels):
        raise UserError(f"{path}: '{label_key}' is not a list of integers (found "
                        f"{_first_odd(labels)}); {fix}.")
    try:
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: '{label_key}' is not a list of integers; {fix}.") from None
    if len(y) != len(data):
        raise UserError(f"{path} holds {len(data)} images but {len(y)} labels; {fix}.")
    check_labels(y, num_classes, path, fix)
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32)
    return x, y


def _integer_labels(labels) -> bool:
    """A list of Python ints (not bools, floats or strings) or an integer numpy array."""
    if isinstance(labels, np.ndarray):
        return labels.dtype.kind in "iu"
    return isinstance(labels, list) and all(type(v) is int or isinstance(v, np.integer)
                                            for v in labels)


def _first_odd(labels) -> str:
    if not isinstance(labels, (list, np.ndarray)):
        return f"a {type(labels).__name__}"
    if isinstance(labels, np.ndarray):
        return f"an array of {labels.dtype}"
    odd = next(v for v in labels if not (type(v) is int or isinstance(v, np.integer)))
    return f"{odd!r}"


def _download(name: str, root: Path) -> None:
    """torchvision's download: the md5-checked archive, unless every batch is already intact;
    afterwards every batch must match torchvision's md5 list."""
    import torchvision
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder

    def intact() -> bool:
        return all(check_integrity(str(folder / f), md5) for f, md5 in cls.train_list + cls.test_list)

    if intact():
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # keep our output to one line
            download_and_extract_archive(cls.url, str(root), filename=cls.filename,
                                         md5=cls.tgz_md5)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataNotFoundError(
            f"Downloading {LABELS[name]} into {folder} failed ({type(exc).__name__}: {first}); "
            "check the network, or place the python-version batches there and drop "
            "data.download=true.") from None
    if not intact():
        raise DataNotFoundError(
            f"Downloading {LABELS[name]} into {folder} gave corrupted files; delete them and "
            "try again, or place the python-version batches there and drop data.download=true.")


def load_cifar(name: str, root: Path, download: bool):
    """`(train_x, train_y, test_x, test_y)` from `<root>/<folder>/`, images uint8 [N,3,32,32]."""
    folder_name, train_files, test_files, key, num_classes = LAYOUT[name]
    folder = root / folder_name
    if download:
        _download(name, root)
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        quoted = shlex.quote(str(root))
        raise DataNotFoundError(
            f"{LABELS[name]} not found in {folder} (needs {', '.join(train_files + test_files)}). "
            f"Fix: `gsgd train data={name} data.root={quoted} data.download=true` (or `python -m "
            f"gsgd_cli.data.fetch {name} --root {quoted}`).")
    out = []
    for files in (train_files, test_files):
        parts = [read_batch(folder / f, key, num_classes) for f in files]
        out += [torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])]
    return tuple(out)
