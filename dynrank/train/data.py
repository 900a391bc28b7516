"""Image data sets in the formats users have, decoded once into uint8 tensors.

Accepted layouts (``--data-dir`` may point at the folder that holds them or at
the data set folder itself):

CIFAR-10 / CIFAR-100
    - the pickled "python version": ``cifar-10-batches-py/`` (``data_batch_1..5``,
      ``test_batch``) or ``cifar-100-python/`` (``train``, ``test``, ``meta``),
      or the unextracted ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``;
    - an image-folder tree ``train/<class>/*.png|jpg`` and ``test/<class>/*``
      (``val/`` is accepted in place of ``test/``; a tree with images in both is
      refused, as a run evaluates on one held-out split), extracted or inside a
      ``.tar``/``.tar.gz`` whose name holds the data set's (``cifar10-images.tar.gz``;
      a CIFAR-10 one's must not say ``cifar100``).  Hidden files and folders
      (names starting with a dot, e.g. macOS's ``._0.png``) are skipped.  A tar
      reads as its extraction would: hard and symbolic links are read from their
      targets in it, and of members with one name (``tar -u``) the last counts.
Tiny ImageNet
    - ``tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
      ``val/images/*.JPEG`` and ``val/val_annotations.txt``, or ``tiny-imagenet-200.zip``.

Folders may be symbolic links (a link back to a folder it sits in, a cycle,
is not entered).  Where a data folder holds several of these, the data set's
own folders (pickled, or named like ``cifar100/``), official archive and
image-tree archives named after it are read before an image-folder tree at its
top level, which may be another data set's.

Image files are decoded with pillow (the optional ``vision`` extra); the
pickled CIFAR archives need nothing beyond numpy.  Augmentation and
normalization run in torch on the training device (see :mod:`.augment`).

Decoding rules: every image becomes 8-bit RGB.  16-bit images (pillow modes
``I;16*`` and ``I``, e.g. 16-bit grey PNGs) are scaled to 8 bits as
``round(v * 255 / 65535)``; values outside 0..65535 are refused.  Transparent
pixels (RGBA, LA, PA, or a palette/grey/RGB image with a transparency entry)
are composited onto black, i.e. each channel is multiplied by alpha/255, so
their hidden colour never shows.  16-bit colour PNGs (RGB, RGBA, grey with
alpha) are read by pillow at 8 bits per channel, keeping each value's high
byte ``v >> 8`` (one above or below ``round(v * 255 / 65535)`` for a quarter
of the values); the transparent colour of a 16-bit RGB PNG is matched on these
high bytes, so every pixel whose channels lie in the same blocks of 256 values
as its own is composited onto black with it.  An image whose size is not the
data set's (32x32 for CIFAR, 64x64 for Tiny ImageNet) is resized to it, bilinear, without
keeping the aspect ratio (a 64x32 image is squashed, not cropped); one
warning per split says how many were resized.  An unreadable image, a damaged
archive, more classes than the data set has, or a label out of its range
raise :class:`DataError` naming the file.

Decode cache (``cache_dir``): one file per data set source, keyed by the
source's path and, for every file under it, its relative path, size and
modification time in nanoseconds (for an archive: its size and mtime); the
cache folder is left out where it sits inside the source (its cache files, where it is the source).  A
change that keeps a file's size and nanosecond mtime is not noticed (contents
are not hashed); delete the cache file then.  An unreadable cache file is
decoded again and overwritten, with a warning; a cache folder that cannot be
written is warned about and the run goes on without it.  Writing a source's cache
removes that source's older versions (and caches of the same data set in the
layout before source ids), and the partial writes (``.tmp``) of runs killed
while writing it, once unchanged for 10 minutes; an interrupted write (Ctrl-C)
removes its own.
"""

import hashlib
import io
import os
import pickle
import re
import tarfile
import threading
import time
import urllib.request
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["DataError", "DATASETS", "load_vision", "download", "layouts_help"]


class DataError(Exception):
    """A data set is missing, unreadable or in an unknown layout (message says what to do)."""


DATASETS = {
    "cifar10": dict(classes=10, size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    pickled="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": dict(classes=100, size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     pickled="cifar-100-python", archive="cifar-100-python.tar.gz",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85"),
    "tiny-imagenet": dict(classes=200, size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          pickled=None, archive="tiny-imagenet-200.zip", folder="tiny-imagenet-200",
                          url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                          md5="90528d7ca1a48142e341f4ef8d21d0de"),
}

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def layouts_help(name, root):
    """The message for a data set that is not where it was looked for."""
    spec = DATASETS[name]
    where = f"--data-dir {root}" if root else "--data-dir DIR"
    if name == "tiny-imagenet":
        layouts = ("  tiny-imagenet-200/  (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG,\n"
                   "                      val/val_annotations.txt)\n"
                   "  tiny-imagenet-200.zip  (the official archive, read without extracting)")
    else:
        layouts = (f"  {spec['pickled']}/  (the pickled \"python version\" from {spec['url']})\n"
                   f"  {spec['archive']}  (the same, not extracted)\n"
                   f"  train/<class>/*.png|jpg and test/<class>/*  (an image-folder tree; also inside a\n"
                   f"  .tar/.tar.gz named after the data set, e.g. {name}-images.tar.gz)")
    return (f"{name} not found ({where}). Put one of these in that folder:\n{layouts}\n"
            f"or pass --download to fetch the official archive into it.")


# -- decoding helpers ---------------------------------------------------------------
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs pillow: pip install pillow "
                        "(or pip install dynrank[vision])") from None
    return Image


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _png_bit_depth(blob):
    """Bits per channel of a PNG file (its header comes first), or None for other formats."""
    if blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR" and len(blob) > 24:
        return blob[24]
    return None


def _rgb_array(image, name, bit_depth=None):
    """A pillow image → (H, W, 3) uint8: 16-bit scaled, transparency composited onto black.

    ``bit_depth``: bits per channel of the file (:func:`_png_bit_depth`); pillow reads 16-bit colour PNGs
    as 8-bit RGB/RGBA, each value's high byte, and keeps their transparent colour in 16 bits.
    """
    Image = _pil()
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{name}: a {image.mode} image with values {values.min()}..{values.max()}; "
                            "expected 8-bit or 16-bit (0..65535) pixels")
        grey = ((values + 128) // 257).astype(np.uint8)         # round(v * 255 / 65535)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):
            rgb[values == transparent] = 0
        return rgb
    transparent = image.info.get("transparency")
    if image.mode == "RGB" and bit_depth == 16 and isinstance(transparent, tuple):
        # pillow's convert() would match the 16-bit colour's low bytes against the high bytes it read
        rgb = np.array(image, dtype=np.uint8)
        rgb[(rgb == np.asarray(transparent, dtype=np.int64) >> 8).all(axis=2)] = 0
        return rgb
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparent is not None:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _decode(blob, size, name="image"):
    """bytes of one image file → ((3, size, size) uint8 array, whether it was resized)."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            rgb = _rgb_array(image, name, _png_bit_depth(blob))
            resized = rgb.shape[:2] != (size, size)
            if resized:
                rgb = np.asarray(Image.fromarray(rgb, "RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    return rgb.transpose(2, 0, 1), resized


def _decode_all(blobs, size, names=None, source=None):
    if not blobs:
        return np.zeros((0, 3, size, size), np.uint8)
    names = names if names is not None else [f"image {i}" for i in range(len(blobs))]
    # pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda item: _decode(item[0], size, item[1]), zip(blobs, names), chunksize=256))
    resized = sum(r for _, r in decoded)
    if resized:
        warnings.warn(f"{source or 'data'}: {resized} of {len(decoded)} images were not {size}x{size} and were "
                      f"resized to it (bilinear, aspect ratio not kept)", stacklevel=2)
    return np.stack([a for a, _ in decoded])


def _to_tensors(x, y):
    return torch.from_numpy(np.ascontiguousarray(x)), torch.as_tensor(np.asarray(y), dtype=torch.long)


# -- pickled CIFAR ----------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and plain containers (no arbitrary code)."""

    _ALLOWED = frozenset({"_reconstruct", "ndarray", "dtype", "scalar"})

    def find_class(self, module, name):
        # _codecs.encode rebuilds bytes in protocol-2 pickles written by Python 3.
        if (module.split(".")[0] == "numpy" and name in self._ALLOWED) or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: a CIFAR archive holds only numpy arrays")


def _unpickle(blob):
    try:
        return _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"not a CIFAR pickle ({err})") from None


def _class_names(read, member, key):
    try:
        meta = _unpickle(read(member))
    except DataError:
        return []  # the names are optional; labels are what training needs
    return [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(key, [])]


def _cifar_from_pickles(read, name):
    """``read(member)`` → bytes; members named as in the official archive's folder."""
    if name == "cifar10":
        train, test = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        label_key = b"labels"
        classes = _class_names(read, "batches.meta", b"label_names")
    else:
        train, test = ["train"], ["test"]
        label_key = b"fine_labels"
        classes = _class_names(read, "meta", b"fine_label_names")
    out = []
    for members in (train, test):
        images, labels = zip(*(_cifar_batch(_unpickle(read(m)), m, name, label_key) for m in members))
        out.extend(_to_tensors(np.concatenate(images), np.concatenate(labels)))
    return (*out, classes)


def _cifar_batch(batch, member, name, label_key):
    """One batch file's (images N×3×32×32 uint8, labels N int64), refused unless it holds what the official
    archive's does: 8-bit pixels, 3,072 of them per image, one label per image."""
    missing = [key for key in (b"data", label_key) if not isinstance(batch, dict) or key not in batch]
    if missing:
        raise DataError(f"{name} pickle {member} is missing the entry {missing[0]!r}; is this the {name} "
                        f"archive?")
    data, labels = batch[b"data"], batch[label_key]
    data, labels = np.asarray(data), np.asarray(labels)
    if data.dtype.kind not in "ui" or data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{name} pickle {member}: expected 8-bit pixels (integers 0..255) in b'data', got "
                        f"{data.dtype} values" + (f" in [{data.min()}, {data.max()}]" if data.size else ""))
    if data.size % 3072:
        raise DataError(f"{name} pickle {member}: expected rows of 3,072 pixels (3×32×32 per image) in "
                        f"b'data', got shape {data.shape}")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32)
    if labels.dtype.kind not in "ui" or labels.shape != (len(images),):
        raise DataError(f"{name} pickle {member}: expected one integer label per image ({len(images)}) in "
                        f"{label_key!r}, got {labels.dtype} labels of shape {labels.shape}")
    return images, labels.astype(np.int64)


def _read_pickled_dir(folder, name):
    def read(member):
        path = os.path.join(folder, member)
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing: the pickled {name} folder is incomplete")
        with open(path, "rb") as handle:
            return handle.read()
    return _cifar_from_pickles(read, name)


def _read_pickled_tar(path, name):
    try:
        with tarfile.open(path) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

            def read(member):
                if member not in members:
                    raise DataError(f"{path} has no member {member}: is this the {name} archive?")
                return tar.extractfile(members[member]).read()
            return _cifar_from_pickles(read, name)
    except _ARCHIVE_ERRORS as err:
        raise _damaged(path, err) from None


# -- image folders ---------------------------------------------------------------------
def _split_of(parts):
    """(split folder's name, its path, class) of a path split in parts, or None; the name is 'train',
    'test' or 'val' (the held-out split under its other name)."""
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] in ("train", "test", "val"):
            return parts[i - 1], "/".join(parts[:i]), parts[i]
    return None


def _hidden(parts):
    """Whether a path (split in parts) is hidden: a part starts with a dot, as macOS's ``._name``
    companions and folders like ``.thumbnails/`` do."""
    return any(part.startswith(".") and part != "." for part in parts)


def _gather_tree(items, size, source, name_of=None):
    """items: iterable of (path parts, loader) → tensors; classes from the train split.

    Hidden files and folders (a part of the path starts with a dot) are skipped.
    ``name_of(path)`` names a file in error messages (default: ``source/path``).
    The held-out split is ``test/`` or ``val/``; images in both raise :class:`DataError` naming the two
    folders (a run evaluates on one held-out split, and merging them would mix two).
    """
    name_of = name_of or (lambda path: os.path.join(source, *path.split("/")))
    found = {"train": [], "test": []}
    held_out = {}                               # 'test' / 'val' → a folder of that name holding images
    for parts, load in items:
        if not parts[-1].lower().endswith(_IMAGE_EXT) or len(parts) < 3 or _hidden(parts):
            continue
        split = _split_of(parts)
        if split is not None:
            name, folder, label = split
            if name != "train":
                held_out.setdefault(name, folder)
            found["train" if name == "train" else "test"].append((label, "/".join(parts), load))
    if len(held_out) > 1:
        raise DataError(f"{source}: both {name_of(held_out['test'])} and {name_of(held_out['val'])} hold "
                        f"images; a run evaluates on one held-out split, so keep one of them (rename or move "
                        f"the other out of the data folder)")
    if not found["train"] or not found["test"]:
        return None
    classes = sorted({c for c, _, _ in found["train"]})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c, _, _ in found["test"]} - set(index))
    if unknown:
        raise DataError(f"{source}: test classes {unknown[:5]} have no train folder")
    out = []
    for split in ("train", "test"):
        entries = sorted(found[split], key=lambda e: e[1])
        x = _decode_all([load() for _, _, load in entries], size, [name_of(p) for _, p, _ in entries],
                        f"{source} ({split})")
        out.extend(_to_tensors(x, [index[c] for c, _, _ in entries]))
    return (*out, classes)


def _read_file(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        if os.path.islink(path):        # listed, so it exists as a link: its target does not
            raise DataError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                            f"restore the image or remove the link") from None
        raise


def _walk(top):
    """``os.walk(top)`` that also enters linked folders; a link to a folder on its own path (a cycle) is
    not entered, as that folder is walked already."""
    chains = {top: {os.path.realpath(top)}}      # folder → real paths of it and the folders above it
    for folder, dirs, files in os.walk(top, followlinks=True):
        chain = chains.pop(folder)
        kept = []
        for d in dirs:
            real = os.path.realpath(os.path.join(folder, d))
            if real not in chain:
                chains[os.path.join(folder, d)] = chain | {real}
                kept.append(d)
        dirs[:] = kept
        yield folder, dirs, files


def _read_tree_dir(root, size):
    def items():
        for folder, _, files in _walk(root):
            rel = os.path.relpath(folder, root).split(os.sep)
            for f in files:
                path = os.path.join(folder, f)
                yield rel + [f], (lambda p=path: _read_file(p))
    return _gather_tree(items(), size, root)


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


def _damaged(path, err):
    return DataError(f"{path}: the archive is damaged or truncated ({type(err).__name__}: {err}); delete "
                     f"{path} and put an intact copy there, or rerun with --download to fetch the official archive")


def _read_tree_tar(path, size):
    """An image-folder tree inside a tar, read as its extraction would be: of members with one name the
    last counts (``tar -u`` appends a changed file), and a hard or symbolic link is read from its target
    in the archive.  A link to a file that the archive does not hold, or to a folder in it (a class
    folder linked to another: its images would be left out), raises :class:`DataError`."""
    try:
        with tarfile.open(path) as tar:
            last = {m.name: m for m in tar.getmembers()}
            blobs = []
            for name, m in last.items():
                if m.issym() or m.islnk():
                    target = m.linkname if m.islnk() else os.path.normpath(
                        os.path.join(os.path.dirname(name), m.linkname)).replace(os.sep, "/")
                    if (target in last and last[target].isdir()) or any(n.startswith(target + "/") for n in last):
                        raise DataError(f"{path}:{name} links to the folder {m.linkname}, whose images a tar "
                                        f"holds only once; archive the linked folder itself (tar --dereference)")
                if not (m.isfile() or m.islnk() or m.issym()) or not name.lower().endswith(_IMAGE_EXT):
                    continue
                try:
                    handle = tar.extractfile(m)     # a link: its target's contents
                except (KeyError, RecursionError):  # the target is missing, or links form a cycle
                    raise DataError(f"{path}:{name} links to {m.linkname}, which is not a file in the "
                                    f"archive; archive the linked images themselves (tar --dereference)") from None
                if handle is not None:
                    blobs.append((name.split("/"), handle.read()))
    except _ARCHIVE_ERRORS as err:
        raise _damaged(path, err) from None
    return _gather_tree(((parts, (lambda b=blob: b)) for parts, blob in blobs), size, path,
                        name_of=lambda member: f"{path}:{member}")


# -- Tiny ImageNet ---------------------------------------------------------------------
def _tiny_imagenet(listing, read, source, name_of=None):
    """``listing``: member names relative to tiny-imagenet-200/; ``read(name)`` → bytes."""
    name_of = name_of or (lambda member: os.path.join(source, *member.split("/")))
    names = {n for n in listing if not _hidden(n.split("/"))}
    if "wnids.txt" not in names or "val/val_annotations.txt" not in names:
        return None
    wnids = read("wnids.txt").decode().split()
    index = {w: i for i, w in enumerate(wnids)}
    train = sorted(n for n in names if n.startswith("train/") and n.lower().endswith(".jpeg"))
    unknown = sorted({n.split("/")[1] for n in train} - set(index))
    if unknown:
        raise DataError(f"{source}: train folders {unknown[:5]} are not listed in wnids.txt")
    train_labels = [index[n.split("/")[1]] for n in train]
    annotations = {}
    for line in read("val/val_annotations.txt").decode().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            if fields[1] not in index:
                raise DataError(f"{name_of('val/val_annotations.txt')}: class {fields[1]!r} of {fields[0]} "
                                "is not listed in wnids.txt")
            annotations[fields[0]] = index[fields[1]]
    val = sorted(n for n in names if n.startswith("val/images/") and os.path.basename(n) in annotations)
    if not train or not val:
        raise DataError(f"{source}: Tiny ImageNet layout found but train or val images are missing")
    out = []
    for files, labels in ((train, train_labels), (val, [annotations[os.path.basename(n)] for n in val])):
        out.extend(_to_tensors(_decode_all([read(n) for n in files], 64, [name_of(n) for n in files],
                                           f"{source} ({files[0].split('/')[0]})"), labels))
    return (*out, wnids)


def _read_tiny_dir(root):
    listing = []
    for folder, _, files in _walk(root):
        rel = os.path.relpath(folder, root)
        listing.extend(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}" for f in files)

    def read(name):
        with open(os.path.join(root, name), "rb") as handle:
            return handle.read()
    return _tiny_imagenet(listing, read, root)


def _read_tiny_zip(path):
    prefix = "tiny-imagenet-200/"
    try:
        with zipfile.ZipFile(path) as archive:
            listing = [n[len(prefix):] for n in archive.namelist() if n.startswith(prefix) and not n.endswith("/")]
            return _tiny_imagenet(listing, lambda name: archive.read(prefix + name), path,
                                  name_of=lambda member: f"{path}:{prefix}{member}")
    except _ARCHIVE_ERRORS as err:
        raise _damaged(path, err) from None


# -- entry point ------------------------------------------------------------------------
def _candidates(root, name):
    """Folders that may hold the data set: root itself and its usual subfolders."""
    spec = DATASETS[name]
    subfolders = [spec.get("pickled"), spec.get("folder"), name, name.replace("cifar", "cifar-")]
    return [root] + [os.path.join(root, s) for s in subfolders if s]


def _sources(root, name):
    """``(path, read, settled)`` for each place that may hold the data set, in order; ``read()`` → result
    or None.  ``settled``: the data set is there as it is, no fetch would change it (not its official
    archive, whose MD5 :func:`download` checks, nor the tree at ``root``, which may be another data set's).

    The order: a pickled folder at ``root``, the data set's named subfolders, its official archive, the
    ``.tar``/``.tar.gz`` trees named after it, then an image-folder tree at ``root`` itself (last, as it
    may be another data set's).
    """
    spec = DATASETS[name]
    tree_at_root = None
    for folder in _candidates(root, name):
        if not os.path.isdir(folder):
            continue
        if name == "tiny-imagenet":
            if os.path.isfile(os.path.join(folder, "wnids.txt")):
                yield folder, (lambda f=folder: _read_tiny_dir(f)), True
            continue
        marker = "data_batch_1" if name == "cifar10" else "train"
        if os.path.isfile(os.path.join(folder, marker)):
            yield folder, (lambda f=folder: _read_pickled_dir(f, name)), True
            return
        if os.path.isdir(os.path.join(folder, "train")) and any(
                os.path.isdir(os.path.join(folder, s)) for s in ("test", "val")):
            read = (lambda f=folder: _read_tree_dir(f, spec["size"]))
            if folder == root:
                tree_at_root = folder, read, False
            else:
                yield folder, read, True
    archive = os.path.join(root, spec["archive"])
    if os.path.isfile(archive):
        yield archive, (lambda: _read_tiny_zip(archive) if name == "tiny-imagenet" else _read_pickled_tar(archive, name)), \
            False
        return
    if name != "tiny-imagenet":
        for f in sorted(os.listdir(root)):
            token = f.lower().replace("-", "").replace("_", "")
            named = "cifar100" in token if name == "cifar100" else ("cifar10" in token and "cifar100" not in token)
            if named and f.endswith((".tar", ".tar.gz", ".tgz")):
                path = os.path.join(root, f)
                yield path, (lambda p=path: _read_tree_tar(p, spec["size"])), True
    if tree_at_root is not None:
        yield tree_at_root


def _cache_name(source, name, cache_dir):
    """``(prefix, file name)`` of ``source``'s decode cache: ``<name>-<source id>-<stamp>.pt``.

    The source id hashes the source's absolute path and the data set's name; the stamp every file
    under the source but those in ``cache_dir`` (which may sit inside it): relative path, size and
    mtime in ns.  The prefix (up to the stamp) is the same for every version of one source.
    """
    stamp = []
    if os.path.isfile(source):
        st = os.stat(source)
        stamp.append(("", st.st_size, st.st_mtime_ns))
    else:
        cache_real = os.path.realpath(cache_dir)
        for folder, dirs, files in _walk(source):
            dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != cache_real)
            if os.path.realpath(folder) == cache_real:        # the cache folder is the source itself
                files = [f for f in files if not (f.startswith(f"{name}-") and f.endswith((".pt", ".tmp")))]
            for f in sorted(files):
                path = os.path.join(folder, f)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                stamp.append((os.path.relpath(path, source), st.st_size, st.st_mtime_ns))
    digest = hashlib.sha1()
    for entry in stamp:
        digest.update(repr(entry).encode())
    source_id = hashlib.sha1(repr(("v3", os.path.abspath(source), name)).encode()).hexdigest()[:12]
    prefix = f"{name}-{source_id}-"
    return prefix, f"{prefix}{digest.hexdigest()[:12]}.pt"


_STALE_TMP_S = 600      # a cache write in progress keeps changing its file; one unchanged this long is dead


def _prune_cache(cache_dir, name, prefix, keep):
    """Remove the decode caches that ``keep`` replaces: other versions of its source (``prefix``), and
    caches of ``name`` in the layout before source ids (``<name>-<16 hex>.pt``), whose source is unknown
    (a source still in use is decoded once more); and partial writes of its source (``.tmp``) left by a
    killed run, unchanged for 10 minutes."""
    old_layout = re.compile(re.escape(name) + r"-[0-9a-f]{16}\.pt")
    for entry in os.listdir(cache_dir):
        stale = (entry.startswith(prefix) and entry.endswith(".pt")) or old_layout.fullmatch(entry)
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            try:
                stale = time.time() - os.stat(os.path.join(cache_dir, entry)).st_mtime > _STALE_TMP_S
            except OSError:     # renamed or removed since the listing
                continue
        if stale and entry != keep:
            try:
                os.remove(os.path.join(cache_dir, entry))
            except OSError:     # removed by a run started beside this one, or not ours to remove
                pass


_CACHED = ("train_x", "train_y", "test_x", "test_y", "classes")


def _load_cache(path):
    """The cached tensors, or None when the file is missing or unreadable (warned about)."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path)
        result = tuple(saved[k] for k in _CACHED)
        if not all(isinstance(t, torch.Tensor) for t in result[:4]) or not isinstance(result[4], list):
            raise ValueError("unexpected contents")
    except FileNotFoundError:   # removed since the check by a run beside this one (a newer version's prune)
        return None
    except Exception as err:    # any damage: decode again and overwrite it
        reason = (str(err).splitlines() or [""])[0][:80]
        warnings.warn(f"decode cache {path} is unreadable ({type(err).__name__}: {reason}); decoding the data "
                      "set again", stacklevel=3)
        return None
    return result


def _reason(err):
    """``err`` in one line, for a message: ``"<type>: <first line of its message>"``."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _save_cache(path, tensors):
    """Write a decode cache file; returns whether it was written.  One that cannot be written is warned
    about and skipped: the cache only saves time."""
    # A temporary name of this process's own: runs started together may all decode and write at once;
    # each rename is atomic and they write the same tensors.
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(tensors, tmp)        # a folder it may not write: RuntimeError from torch's file writer
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as err:
        warnings.warn(f"decode cache {os.path.dirname(path)} is not writable ({_reason(err)}); "
                      "continuing without it", stacklevel=3)
        return False
    finally:                            # a failed or interrupted (Ctrl-C) write leaves no partial file
        try:
            os.remove(tmp)
        except OSError:                 # renamed into place, or never made
            pass


def _check_classes(name, source, result):
    """More classes than the data set has, or labels outside 0..classes-1: DataError."""
    limit = DATASETS[name]["classes"]
    train_x, train_y, test_x, test_y, classes = result
    if len(classes) > limit:
        shown = ", ".join(map(str, classes[:12])) + (", ..." if len(classes) > 12 else "")
        raise DataError(f"{source}: {name} has {limit} classes, found {len(classes)} ({shown})")
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= limit):
            raise DataError(f"{source}: {name} labels must be in 0..{limit - 1}, the {split} split has "
                            f"labels {int(y.min())}..{int(y.max())}")


def load_vision(name, root, cache_dir=None):
    """Load ``name`` from ``root``: returns ``(train_x, train_y, test_x, test_y, classes)``.

    ``*_x`` are uint8 tensors (N, 3, H, W), ``*_y`` int64 (N,).  With
    ``cache_dir`` the decoded tensors are kept there (keyed by each file's
    relative path, size and mtime, see the module docstring), so image trees
    are decoded once.  Images are converted to 8-bit RGB and resized to the
    data set's size as the module docstring describes.

    Raises:
        DataError: unknown name, missing folder (or a file in its place), or no
            accepted layout found (the message lists the layouts); an unreadable image or damaged
            archive (the message names it); more classes than the data set
            has or labels out of its range.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    if not root:
        raise DataError(layouts_help(name, None))
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise DataError(f"data folder {os.path.abspath(root)} {what}.\n" + layouts_help(name, root))
    for source, read, _ in _sources(root, name):
        prefix, entry = _cache_name(source, name, cache_dir) if cache_dir else (None, None)
        cache = os.path.join(cache_dir, entry) if cache_dir else None
        if cache:
            saved = _load_cache(cache)
            if saved is not None:
                return saved
        result = read()
        if result is None:
            continue
        _check_classes(name, source, result)
        train_x, train_y, test_x, test_y, classes = result
        if cache:
            if _save_cache(cache, dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                                       classes=classes)):
                _prune_cache(cache_dir, name, prefix, entry)
        return train_x, train_y, test_x, test_y, classes
    raise DataError(layouts_help(name, root))


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name, root):
    """Fetch the official archive of ``name`` into ``root`` (checked by MD5); returns its path.

    An archive already there is kept when its MD5 is the official one, and fetched again (with a
    warning) when it is not, e.g. a damaged or truncated copy.

    Raises:
        DataError: ``root`` is no folder and cannot be made one, the network is unreachable or the file
            is corrupt.
    """
    spec = DATASETS[name]
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"data folder {os.path.abspath(root)} is not a directory; --download puts "
                        f"{spec['archive']} into a folder")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:          # a file above it, no permission, ...
        raise DataError(f"could not make the data folder {os.path.abspath(root)} for --download ({err})") from None
    target = os.path.join(root, spec["archive"])
    if os.path.isfile(target):
        found = _md5(target)
        if found == spec["md5"]:
            return target
        warnings.warn(f"{target} has MD5 {found}, expected {spec['md5']} (damaged or not the official archive); "
                      f"downloading it again", stacklevel=2)
    partial = target + ".part"
    try:
        with urllib.request.urlopen(spec["url"], timeout=30) as response, open(partial, "wb") as out:
            digest = hashlib.md5()
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
    except OSError as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise DataError(f"could not download {spec['url']} ({err}). Download it by hand and put "
                        f"{spec['archive']} into {root}.") from None
    if digest.hexdigest() != spec["md5"]:
        os.remove(partial)
        raise DataError(f"{spec['url']} downloaded with MD5 {digest.hexdigest()}, expected {spec['md5']}")
    os.replace(partial, target)
    return target
