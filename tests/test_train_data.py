"""Loaders of dynrank-train on small archives written here, the corpus, and device-side augmentation."""

import hashlib
import io
import math
import os
import pickle
import re
import shutil
import tarfile
import threading
import zipfile
import zlib

import numpy as np
import pytest
import torch

from dynrank.train.augment import VisionData, hsv_jitter, pad_crop_flip, resized_crop
from dynrank.train.corpus import (
    STDLIB_MODULES,
    TextData,
    load_stdlib_corpus,
    stdlib_files,
)
from dynrank.train import cli
from dynrank.train import data as data_module
from dynrank.train.data import DataError, load_vision

from _helpers import REL_TOL, rel_err

PIL = pytest.importorskip("PIL.Image")



# -- writers of the official formats -------------------------------------------------------
def _images(n, size, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8), rng.integers(0, 10, size=n)


def _smooth_image(size, seed):
    """A smooth (3, size, size) uint8 image, so that JPEG keeps it close to the original."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    a, b, c = rng.uniform(40, 200, size=3)
    image = np.stack([a * np.add.outer(ramp, ramp) / 2, b * np.outer(ramp, 1 - ramp) + 30,
                      np.full((size, size), c)])
    return np.clip(image, 0, 255).astype(np.uint8)


def _pickled(x, y, label_key):
    return pickle.dumps({b"data": x.reshape(len(x), -1), label_key: [int(v) for v in y],
                         b"batch_label": b"test"}, protocol=2)


def write_cifar10_pickles(folder, per_batch=4, test=6):
    """cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta; returns the arrays."""
    os.makedirs(folder, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(per_batch, 32, i)
        xs.append(x)
        ys.append(y)
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            f.write(_pickled(x, y, b"labels"))
    tx, ty = _images(test, 32, 99)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(_pickled(tx, ty, b"labels"))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f, protocol=2)
    return np.concatenate(xs), np.concatenate(ys), tx, ty


def write_cifar100_pickles(folder):
    os.makedirs(folder, exist_ok=True)
    x, y = _images(8, 32, 1)
    tx, ty = _images(3, 32, 2)
    for name, (a, b) in (("train", (x, y * 7)), ("test", (tx, ty * 7))):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(_pickled(a, b, b"fine_labels"))
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    return x, y * 7, tx, ty * 7


def _encode(array, fmt):
    buffer = io.BytesIO()
    PIL.fromarray(array.transpose(1, 2, 0)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image_tree(root, fmt="PNG", classes=("cat", "dog", "frog"), per_class=2, size=32):
    """root/train/<class>/i.png and root/test/<class>/i.png; returns {split: [(class, array)]}."""
    written = {"train": [], "test": []}
    ext = "png" if fmt == "PNG" else "jpg"
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                x = _smooth_image(size, 100 * c + 10 * i + (split == "test"))
                with open(os.path.join(root, split, name, f"{i:04d}.{ext}"), "wb") as f:
                    f.write(_encode(x, fmt))
                written[split].append((name, x))
    return written


# -- CIFAR pickles -----------------------------------------------------------------------------
def test_cifar10_pickled_folder(tmp_path):
    x, y, tx, ty = write_cifar10_pickles(str(tmp_path / "cifar-10-batches-py"))
    train_x, train_y, test_x, test_y, classes = load_vision("cifar10", str(tmp_path))
    assert train_x.dtype == torch.uint8 and tuple(train_x.shape) == (20, 3, 32, 32)
    assert torch.equal(train_x, torch.from_numpy(x)) and torch.equal(train_y, torch.from_numpy(y).long())
    assert torch.equal(test_x, torch.from_numpy(tx)) and torch.equal(test_y, torch.from_numpy(ty).long())
    assert classes == [f"class{i}" for i in range(10)]


def test_cifar10_pickled_tar_gz_and_folder_itself(tmp_path):
    folder = tmp_path / "build" / "cifar-10-batches-py"
    x, y, _, _ = write_cifar10_pickles(str(folder))
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_tar = load_vision("cifar10", str(archive.parent))
    from_dir = load_vision("cifar10", str(folder))     # --data-dir pointing at the folder itself
    assert torch.equal(from_tar[0], torch.from_numpy(x)) and torch.equal(from_dir[1], torch.from_numpy(y).long())


def test_cifar100_pickles_use_fine_labels(tmp_path):
    x, y, _, ty = write_cifar100_pickles(str(tmp_path / "cifar-100-python"))
    train_x, train_y, _, test_y, classes = load_vision("cifar100", str(tmp_path))
    assert torch.equal(train_x, torch.from_numpy(x)) and torch.equal(train_y, torch.from_numpy(y).long())
    assert torch.equal(test_y, torch.from_numpy(ty).long()) and len(classes) == 100


@pytest.mark.parametrize("archive", [False, True])
def test_the_data_sets_own_folder_comes_before_a_tree_at_the_top(tmp_path, archive):
    """A CIFAR-10 image tree beside cifar-100-python/ (or its archive) is not read as CIFAR-100."""
    write_image_tree(str(tmp_path / "data"), "PNG", classes=("airplane", "automobile"), per_class=1)
    assert load_vision("cifar100", str(tmp_path / "data"))[4] == ["airplane", "automobile"]    # the tree alone
    x, y, _, ty = write_cifar100_pickles(str(tmp_path / "build" / "cifar-100-python"))
    if archive:
        with tarfile.open(tmp_path / "data" / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "build" / "cifar-100-python", arcname="cifar-100-python")
    else:
        os.rename(tmp_path / "build" / "cifar-100-python", tmp_path / "data" / "cifar-100-python")
    train_x, train_y, _, test_y, classes = load_vision("cifar100", str(tmp_path / "data"))
    assert torch.equal(train_x, torch.from_numpy(x)) and torch.equal(train_y, torch.from_numpy(y).long())
    assert torch.equal(test_y, torch.from_numpy(ty).long()) and classes == [f"c{i}" for i in range(100)]


@pytest.mark.parametrize("name, other", [("cifar100", "cifar10"), ("cifar10", "cifar100")])
def test_the_data_sets_named_image_archive_comes_before_a_tree_at_the_top(tmp_path, name, other):
    """Another data set's tree at the top of the data folder is not read in place of this data set's
    image archive beside it (CIFAR-10 read as CIFAR-100, or CIFAR-10 refused for 12 classes)."""
    root = tmp_path / "data"
    top_classes = [f"{other}_{i:02d}" for i in range(12)]
    write_image_tree(str(root), "PNG", classes=top_classes, per_class=1)
    tree = tmp_path / "src" / name
    written = write_image_tree(str(tree), "PNG", classes=("bird", "cat"), per_class=1)
    with tarfile.open(root / f"{name}-images.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname=name)
    train_x, train_y, _, test_y, classes = load_vision(name, str(root))
    assert classes == ["bird", "cat"] and train_y.tolist() == [0, 1] and test_y.tolist() == [0, 1]
    assert torch.equal(train_x[1], torch.from_numpy(dict(written["train"])["cat"]))


@pytest.mark.parametrize("archive", ["cifar100-images.tar", "CIFAR-100_png.tar.gz"])
def test_a_cifar100_image_archive_alone_is_not_read_as_cifar10(tmp_path, archive):
    """A CIFAR-10 load refuses a folder whose only archive is named after CIFAR-100 (the name holds
    "cifar10" too), which CIFAR-100 reads."""
    tree = tmp_path / "src" / "cifar100"
    write_image_tree(str(tree), "PNG", classes=("apple", "aquarium_fish"), per_class=1)
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / archive, "w:gz" if archive.endswith(".gz") else "w") as tar:
        tar.add(tree, arcname="cifar100")
    assert load_vision("cifar100", str(root))[4] == ["apple", "aquarium_fish"]
    with pytest.raises(DataError, match=re.escape(f"cifar10 not found (--data-dir {root})")):
        load_vision("cifar10", str(root))


def test_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_pickles(str(folder))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    refused = f"refusing to unpickle {os.system.__module__}.system: a CIFAR archive holds only numpy arrays"
    with pytest.raises(DataError, match=re.escape(refused)):
        load_vision("cifar10", str(tmp_path))


@pytest.mark.parametrize("damage, message", [
    (lambda x, y: (x, [*y, 0, 0]), "data_batch_1: expected one integer label per image (4) in b'labels', got "
                                   "int64 labels of shape (6,)"),
    (lambda x, y: (x.astype(np.float32) / 255, y), "data_batch_1: expected 8-bit pixels (integers 0..255) in "
                                                   "b'data', got float32 values"),
    (lambda x, y: (x[:, :1], y), "data_batch_1: expected rows of 3,072 pixels (3×32×32 per image) in b'data', "
                                 "got shape (4, 1, 32, 32)"),
    (lambda x, y: (x, [float(v) for v in y]), "expected one integer label per image (4) in b'labels', got float64"),
])
def test_damaged_cifar_batch_is_refused_by_name(tmp_path, damage, message):
    # Shifted labels or black images would train without a word: each batch file is checked on its own.
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_pickles(str(folder))
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    x, y = batch[b"data"].reshape(-1, 3, 32, 32), batch[b"labels"]
    x, y = damage(x, y)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": x, b"labels": y}, protocol=2))
    with pytest.raises(DataError, match=re.escape(message)):
        load_vision("cifar10", str(tmp_path))


def test_cifar_test_batch_label_count_is_checked(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_pickles(str(folder))
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"] = [*batch[b"labels"], 1]
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=re.escape("test_batch: expected one integer label per image (6)")):
        load_vision("cifar10", str(tmp_path))


# -- image folders -----------------------------------------------------------------------------
def test_png_tree_is_lossless_with_classes_sorted(tmp_path):
    written = write_image_tree(str(tmp_path / "cifar10"), "PNG")
    train_x, train_y, test_x, _, classes = load_vision("cifar10", str(tmp_path))
    assert classes == ["cat", "dog", "frog"]
    assert tuple(train_x.shape) == (6, 3, 32, 32) and tuple(test_x.shape) == (6, 3, 32, 32)
    expected = sorted(written["train"], key=lambda e: e[0])     # files sorted by path: class, then index
    for i, (name, array) in enumerate(expected):
        assert classes[int(train_y[i])] == name
        assert torch.equal(train_x[i], torch.from_numpy(array))


def test_jpeg_tree_inside_tar_gz(tmp_path):
    tree = tmp_path / "src" / "cifar10"
    written = write_image_tree(str(tree), "JPEG", per_class=3)
    archive = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="cifar10")
    train_x, _, test_x, _, classes = load_vision("cifar10", str(archive.parent))
    assert classes == ["cat", "dog", "frog"] and len(train_x) == 9 and len(test_x) == 9
    # JPEG is lossy: each decode must be close to what was written, and closer than to other images.
    expected = [torch.from_numpy(a).float() for _, a in sorted(written["test"], key=lambda e: e[0])]
    for i, reference in enumerate(expected):
        error = (test_x[i].float() - reference).abs().mean()
        assert error < 4
        assert all(error < (test_x[i].float() - other).abs().mean() for j, other in enumerate(expected) if j != i)


def test_a_tar_reads_links_and_a_names_last_member_as_extraction_does(tmp_path):
    """Hard-linked and symlinked images are read from their targets, and of two members with one name
    (an archive updated with tar -u) the last counts: the same tensors as the extracted archive."""
    tree = tmp_path / "src"
    images = {n: _smooth_image(32, n) for n in range(6)}
    for path, n in (("train/cat/0.png", 0), ("train/cat/1.png", 1), ("train/dog/0.png", 2),
                    ("test/cat/0.png", 3), ("test/dog/0.png", 4)):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(_encode(images[n], "PNG"))
    os.link(tree / "train/cat/0.png", tree / "train/dog/a.png")              # one picture in two classes
    os.symlink("../cat/1.png", tree / "train/dog/b.png")
    archive = tmp_path / "data" / "cifar10-images.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    with tarfile.open(archive) as tar:
        kinds = {m.name: m.type for m in tar.getmembers()}
    assert tarfile.LNKTYPE in kinds.values() and kinds["train/dog/b.png"] == tarfile.SYMTYPE
    (tree / "train/cat/1.png").unlink()                                     # a fixed image, appended
    (tree / "train/cat/1.png").write_bytes(_encode(images[5], "PNG"))
    with tarfile.open(archive, "a") as tar:
        tar.add(tree / "train/cat/1.png", arcname="train/cat/1.png")
    train_x, train_y, test_x, _, classes = load_vision("cifar10", str(archive.parent))
    # sorted by path: cat/0, cat/1 (the appended copy), dog/0, dog/a (-> cat/0), dog/b (-> cat/1)
    expected = np.stack([images[0], images[5], images[2], images[0], images[5]])
    assert classes == ["cat", "dog"] and train_y.tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(train_x, torch.from_numpy(expected)) and len(test_x) == 2
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    extracted = load_vision("cifar10", str(tmp_path / "extracted"))
    assert all(torch.equal(a, b) for a, b in zip(extracted[:4], (train_x, train_y, test_x)))


def _tar_tree_with_link(tmp_path, name, target):
    """A CIFAR-10 image tree in data/cifar10-images.tar.gz with a symbolic link ``name`` → ``target``
    added; the archive's path.

    The archive holds the image files and no folder members (as ``tar czf`` given a list of files
    writes it): a link to a folder is then known by the members under it.
    """
    tree = tmp_path / "src" / "cifar10"
    write_image_tree(str(tree), "PNG", classes=("cat", "dog"), per_class=1)
    archive = tmp_path / "data" / "cifar10-images.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(tree.rglob("*.png")):
            tar.add(path, arcname=f"cifar10/{path.relative_to(tree).as_posix()}")
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.SYMTYPE, target
        tar.addfile(link)
    return archive


def test_a_tar_link_to_a_file_it_does_not_hold_is_named(tmp_path):
    archive = _tar_tree_with_link(tmp_path, "cifar10/train/dog/1.png", "../../../elsewhere/1.png")
    with pytest.raises(DataError, match=re.escape(f"{archive}:cifar10/train/dog/1.png links to "
                                                  "../../../elsewhere/1.png, which is not a file in the archive")):
        load_vision("cifar10", str(archive.parent))


def test_a_tar_link_to_a_class_folder_is_named(tmp_path):
    """A class folder archived as a link to another (without --dereference) held none of its images in the tar:
    the class was left out, where the extracted tree has it."""
    archive = _tar_tree_with_link(tmp_path, "cifar10/train/bird", "dog")
    with pytest.raises(DataError, match=re.escape(f"{archive}:cifar10/train/bird links to the folder dog, whose "
                                                  "images a tar holds only once")):
        load_vision("cifar10", str(archive.parent))


def test_a_dangling_image_link_in_a_folder_is_named(tmp_path):
    """A symbolic link to an image that is gone raised a bare FileNotFoundError out of the loader."""
    tree = tmp_path / "cifar10"
    write_image_tree(str(tree), "PNG", classes=("cat", "dog"), per_class=1)
    link = tree / "train" / "cat" / "0009.png"
    os.symlink(tmp_path / "gone.png", link)
    with pytest.raises(DataError, match=re.escape(f"{link} is a symbolic link to {tmp_path / 'gone.png'}, which "
                                                  f"does not exist; restore the image or remove the link")):
        load_vision("cifar10", str(tree))


_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 66


@pytest.mark.parametrize("layout", ["folder", "tar.gz"])
def test_hidden_files_and_folders_are_skipped(tmp_path, layout):
    """macOS's ._name companions (not images) and a hidden folder under train/ (not a class)."""
    tree = tmp_path / "src" / "cifar10"
    write_image_tree(str(tree), "PNG", classes=("cat", "dog"), per_class=1)
    expected = load_vision("cifar10", str(tree))
    (tree / "train" / "cat" / "._0000.png").write_bytes(_APPLE_DOUBLE)
    (tree / "test" / "._dog").mkdir()
    (tree / "test" / "._dog" / "0000.png").write_bytes(_APPLE_DOUBLE)
    (tree / "train" / ".thumbnails").mkdir()
    (tree / "train" / ".thumbnails" / "0000.png").write_bytes(_encode(_smooth_image(32, 9), "PNG"))
    (tree / ".trash" / "train" / "bird").mkdir(parents=True)
    (tree / ".trash" / "train" / "bird" / "0000.png").write_bytes(_encode(_smooth_image(32, 8), "PNG"))
    if layout == "tar.gz":
        (tmp_path / "data").mkdir()
        with tarfile.open(tmp_path / "data" / "cifar10-images.tar.gz", "w:gz") as tar:
            tar.add(tree, arcname=".")                   # members ./train/..., as tar -C dir . writes them
        source = tmp_path / "data"
    else:
        source = tree
    loaded = load_vision("cifar10", str(source))
    assert loaded[4] == ["cat", "dog"]
    assert all(torch.equal(a, b) for a, b in zip(loaded[:4], expected[:4]))


@pytest.mark.parametrize("layout", ["folder", "tar.gz"])
def test_a_tree_with_both_val_and_test_is_refused_naming_both(tmp_path, layout):
    """val/ stands in for test/; a tree holding both is refused instead of evaluating on the two merged."""
    tree = tmp_path / "src" / "cifar10"
    write_image_tree(str(tree), per_class=1)
    os.rename(tree / "test", tree / "val")                   # val/ alone is the held-out split
    assert len(load_vision("cifar10", str(tmp_path / "src"))[2]) == 3
    write_image_tree(str(tree), per_class=1)                 # now test/ beside it
    root, test, val = tmp_path / "src", f"{tree}/test", f"{tree}/val"
    if layout == "tar.gz":
        root = tmp_path / "data"
        root.mkdir()
        with tarfile.open(root / "cifar10-tree.tar.gz", "w:gz") as tar:
            tar.add(tree, arcname="cifar10")
        test, val = (f"{root / 'cifar10-tree.tar.gz'}:cifar10/{split}" for split in ("test", "val"))
    with pytest.raises(DataError) as info:
        load_vision("cifar10", str(root))
    assert str(info.value).endswith(f"both {test} and {val} hold images; a run evaluates on one held-out split, "
                                    f"so keep one of them (rename or move the other out of the data folder)")


@pytest.mark.parametrize("linked", ["class folders", "split folders"])
def test_folders_reached_through_links_are_read(tmp_path, linked):
    """A tree assembled from links loads as its plain copy does; a link back up the tree is not followed."""
    store = tmp_path / "store"
    write_image_tree(str(store), "PNG")
    expected = load_vision("cifar10", str(store))
    root = tmp_path / "data"
    for split in ("train", "test"):
        if linked == "split folders":
            root.mkdir(exist_ok=True)
            os.symlink(store / split, root / split)
        else:                                   # a copy of one class, links to the others
            shutil.copytree(store / split / "cat", root / split / "cat")
            for name in ("dog", "frog"):
                os.symlink(store / split / name, root / split / name)
    os.symlink(root, store / "train" / "dog" / "loop")                # a cycle, whichever way it is entered
    loaded = load_vision("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert loaded[4] == expected[4] == ["cat", "dog", "frog"]
    assert all(torch.equal(a, b) for a, b in zip(loaded[:4], expected[:4]))
    # The cache key sees files under links: a changed image is decoded again.
    changed = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    _write_png(str(store / "train" / "frog" / "0001.png"), changed)
    again = load_vision("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again[0][5], torch.from_numpy(changed.transpose(2, 0, 1).copy()))


def _triangle_downscale(array, n):
    """float64 antialiased bilinear downscale of axis 0 to n: triangle filter widened by the scale."""
    m = array.shape[0]
    scale = m / n
    source = np.arange(m) + 0.5
    out = []
    for i in range(n):
        w = np.clip(1.0 - np.abs((source - (i + 0.5) * scale) / scale), 0.0, None)
        out.append(np.tensordot(w / w.sum(), array, axes=(0, 0)))
    return np.stack(out)


@pytest.mark.filterwarnings("ignore:.*were resized to it")
def test_tree_images_of_other_size_are_resized(tmp_path):
    written = write_image_tree(str(tmp_path), "PNG", per_class=1, size=40)
    train_x, _, test_x, _, _ = load_vision("cifar10", str(tmp_path))
    assert tuple(train_x.shape) == (3, 3, 32, 32) and train_x.dtype == torch.uint8
    for split, loaded in (("train", train_x), ("test", test_x)):
        for i, (_, array) in enumerate(sorted(written[split], key=lambda e: e[0])):
            hwc = np.ascontiguousarray(array.transpose(1, 2, 0))
            # The loader's documented step: PIL bilinear resize of the RGB image. PNG is lossless,
            # so the loaded values equal the same resize of the array that was written.
            expected = np.asarray(PIL.fromarray(hwc).resize((32, 32), PIL.BILINEAR)).transpose(2, 0, 1)
            assert torch.equal(loaded[i], torch.from_numpy(np.ascontiguousarray(expected)))
            # Independently of PIL: a float64 triangle-filter downscale (rows, then columns). PIL
            # rounds to uint8 after each of its two passes, each at most 0.5 off (the second pass
            # is a convex combination, so the first rounding stays within 0.5): at most 1 level.
            reference = _triangle_downscale(_triangle_downscale(hwc.astype(np.float64), 32).transpose(1, 0, 2), 32)
            reference = reference.transpose(2, 1, 0)                         # (c, rows, cols)
            assert np.abs(loaded[i].numpy().astype(np.float64) - reference).max() <= 1.0 + 1e-9


def test_cache_returns_the_same_tensors(tmp_path):
    write_image_tree(str(tmp_path / "data"), "PNG", per_class=1)
    first = load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 1
    second = load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert all(torch.equal(a, b) for a, b in zip(first[:4], second[:4]))


@pytest.mark.parametrize("inside", [".cache", "."])
def test_cache_inside_the_data_folder_is_not_part_of_its_key(tmp_path, monkeypatch, inside):
    # --cache-dir under (or equal to) --data-dir, the tree at the top: the cache file must not change the
    # source's stamp, or every run decodes again and replaces the cache it has just written.
    root = tmp_path / "data"
    write_image_tree(str(root), "PNG", per_class=1)
    cache = root / inside
    first = load_vision("cifar10", str(root), cache_dir=str(cache))
    entries = os.listdir(cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")
    monkeypatch.setattr(data_module, "_decode_all", no_decoding)
    second = load_vision("cifar10", str(root), cache_dir=str(cache))
    assert os.listdir(cache) == entries
    assert all(torch.equal(a, b) for a, b in zip(first[:4], second[:4]))


def test_runs_started_together_share_one_cache(tmp_path, monkeypatch):
    # Every loader decodes and writes before any renames: each needs a temporary file of its own.
    write_image_tree(str(tmp_path / "data"), "PNG", per_class=1)
    loaders = 3
    barrier = threading.Barrier(loaders, timeout=30)
    save = torch.save

    def save_then_wait(obj, path):
        save(obj, path)
        barrier.wait()
    monkeypatch.setattr(torch, "save", save_then_wait)
    results, errors = [], []

    def load():
        try:
            results.append(load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache")))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=load) for _ in range(loaders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == loaders
    assert os.listdir(tmp_path / "cache") == [next(iter(os.listdir(tmp_path / "cache")))]
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(r[:4], results[0][:4]))


def test_an_interrupted_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    write_image_tree(str(tmp_path / "data"), "PNG", classes=("a", "b"), per_class=1)
    save = torch.save

    def save_then_interrupt(obj, path):
        save(obj, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


def test_a_new_cache_removes_its_sources_partial_writes_left_by_killed_runs(tmp_path):
    """.tmp files of the source unchanged for over 10 minutes go; a recent one (a run writing beside this
    one) and another source's stay."""
    write_image_tree(str(tmp_path / "data"), "PNG", classes=("a", "b"), per_class=1)
    cache = tmp_path / "cache"
    cache.mkdir()
    prefix, entry = data_module._cache_name(str(tmp_path / "data"), "cifar10", str(cache))
    dead, writing = cache / f"{prefix}0123456789ab.pt.1234-5.tmp", cache / f"{entry}.999-9.tmp"
    other = cache / "cifar10-0123456789ab-0123456789ab.pt.1234-5.tmp"
    for path in (dead, writing, other):
        path.write_bytes(b"x" * 100)
    hour_ago = os.stat(dead).st_mtime - 3600
    for path in (dead, other):
        os.utime(path, (hour_ago, hour_ago))
    load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(cache))
    assert sorted(os.listdir(cache)) == sorted([entry, writing.name, other.name])


# -- decoding rules and the decode cache -------------------------------------------------------
def _write_png(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.fromarray(array, **kwargs).save(path, format="PNG")


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    write_image_tree(str(tmp_path), "PNG", classes=("a",), per_class=1)
    rng = np.random.default_rng(5)
    values = rng.integers(0, 65536, size=(32, 32)).astype(np.uint16)
    values[0, :4] = [0, 32768, 65535, 128]
    _write_png(str(tmp_path / "train" / "a" / "0000.png"), values)
    assert PIL.open(tmp_path / "train" / "a" / "0000.png").mode in ("I;16", "I")
    train_x, _, _, _, _ = load_vision("cifar10", str(tmp_path))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert expected[0, :4].tolist() == [0, 128, 255, 0]
    for channel in range(3):
        assert torch.equal(train_x[0, channel], torch.from_numpy(expected))


def test_transparent_pixels_are_composited_onto_black(tmp_path):
    write_image_tree(str(tmp_path), "PNG", classes=("a",), per_class=1)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = _smooth_image(32, 3).transpose(1, 2, 0)
    rgba[..., 3] = np.tile(np.array([0, 255, 128, 1], np.uint8), (32, 8))
    _write_png(str(tmp_path / "train" / "a" / "0000.png"), rgba)
    palette = PIL.fromarray(np.tile(np.array([0, 1], np.uint8), (32, 16)), "L").convert("P")
    palette.putpalette([255, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "test" / "a" / "0000.png", format="PNG", transparency=0)    # index 0: hidden red
    train_x, _, test_x, _, _ = load_vision("cifar10", str(tmp_path))
    alpha = rgba[..., 3:].astype(np.float64)
    expected = np.round(rgba[..., :3] * alpha / 255).astype(np.uint8).transpose(2, 0, 1)
    assert torch.equal(train_x[0], torch.from_numpy(expected))
    assert test_x[0, :, 0, 0].tolist() == [0, 0, 0] and test_x[0, :, 0, 1].tolist() == [10, 20, 30]


def _png16(array, color_type, trns=None):
    """A 16-bit PNG written by hand (pillow writes no 16-bit colour): (H, W, C) values 0..65535."""
    height, width = array.shape[:2]
    raw = b"".join(b"\0" + np.ascontiguousarray(array[y]).astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, color_type, 0, 0, 0])
    extra = chunk(b"tRNS", b"".join(int(v).to_bytes(2, "big") for v in trns)) if trns else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("key", [(1000, 2000, 3000), (100, 200, 50)])
def test_16bit_rgb_png_transparent_colour_is_matched_on_the_bytes_read(tmp_path, key):
    """pillow reads 16-bit colour as each value's high byte; the transparent colour (tRNS) is matched on
    those bytes, so its pixels are black and opaque pixels keep their colour (also one whose high bytes
    equal the key's low bytes, and one whose 8-bit values equal a key below 256)."""
    write_image_tree(str(tmp_path), "PNG", classes=("a",), per_class=1)
    values = np.random.default_rng(6).integers(0, 65536, size=(32, 32, 3))
    values[0, 0] = key                                               # transparent
    values[0, 1] = [59400, 53300, 47200]                             # high bytes = (1000, 2000, 3000)'s low bytes
    values[0, 2] = [(k % 256) * 256 + 7 for k in key]                # 8-bit values = the key's low bytes
    values[0, 3] = [k | 0xFF for k in key]                           # the key's block of 256: composited too
    (tmp_path / "train" / "a" / "0000.png").write_bytes(_png16(values, 2, trns=key))
    with PIL.open(tmp_path / "train" / "a" / "0000.png") as image:
        assert image.mode == "RGB" and image.info["transparency"] == key
    train_x, _, _, _, _ = load_vision("cifar10", str(tmp_path))
    expected = values >> 8
    expected[(expected == np.array(key) >> 8).all(axis=2)] = 0
    assert expected[0, :4].tolist() == [[0, 0, 0], [232, 208, 184], [k % 256 for k in key], [0, 0, 0]]
    assert torch.equal(train_x[0], torch.from_numpy(expected.astype(np.uint8).transpose(2, 0, 1)))


def test_other_sizes_are_squashed_with_one_warning(tmp_path):
    written = write_image_tree(str(tmp_path), "PNG", classes=("a",), per_class=2)
    wide = np.ascontiguousarray(np.concatenate([written["train"][0][1], written["train"][1][1]], axis=2))   # 32x64
    _write_png(str(tmp_path / "train" / "a" / "0001.png"), wide.transpose(1, 2, 0))
    with pytest.warns(UserWarning, match=re.escape("(train): 1 of 2 images were not 32x32 and were resized to it "
                                                   "(bilinear, aspect ratio not kept)")) as record:
        train_x, _, test_x, _, _ = load_vision("cifar10", str(tmp_path))
    assert len([w for w in record if "resized" in str(w.message)]) == 1      # the test split needed none
    squashed = PIL.fromarray(wide.transpose(1, 2, 0)).resize((32, 32), PIL.BILINEAR)
    assert torch.equal(train_x[1], torch.from_numpy(np.asarray(squashed).transpose(2, 0, 1).copy()))
    assert torch.equal(train_x[0], torch.from_numpy(written["train"][0][1]))


def _same_times(root, ns=1_600_000_000_000_000_000):
    for folder, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(folder, f), ns=(ns, ns))


def test_cache_sees_swapped_files_with_equal_timestamps(tmp_path):
    root = tmp_path / "data"
    write_image_tree(str(root), "PNG", classes=("a", "b"), per_class=1)
    noisy = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)     # another file size
    _write_png(str(root / "train" / "b" / "0000.png"), noisy)
    _same_times(root)                                    # as extracted from an archive
    first = load_vision("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    a, b = root / "train" / "a" / "0000.png", root / "train" / "b" / "0000.png"
    blob_a, blob_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(blob_b)
    b.write_bytes(blob_a)
    _same_times(root)
    second = load_vision("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(second[0][0], first[0][1]) and torch.equal(second[0][1], first[0][0])
    assert torch.equal(second[0][0], torch.from_numpy(noisy.transpose(2, 0, 1).copy()))
    assert len(os.listdir(tmp_path / "cache")) == 1      # the first version's cache removed


def _write_bmp(path, array):
    """An uncompressed BMP of the (H, W, 3) uint8 ``array``: its file size depends on the shape only."""
    PIL.fromarray(array).save(path, format="BMP")


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_cache_sees_an_image_rewritten_at_its_size(tmp_path, layout):
    """Other pixels at the same file size and a new mtime: the new pixels are decoded, not the cached ones."""
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tree / split / name).mkdir(parents=True)
            _write_bmp(str(tree / split / name / "0000.bmp"), np.zeros((32, 32, 3), np.uint8))
    root = tmp_path / "data"
    root.mkdir()

    def publish():
        if layout == "tar":                      # same member sizes and member times: the same archive size
            with tarfile.open(root / "cifar10-images.tar", "w") as tar:
                for folder, _, files in sorted(os.walk(tree)):
                    for f in sorted(files):
                        info = tar.gettarinfo(os.path.join(folder, f), os.path.relpath(os.path.join(folder, f), tree))
                        info.mtime = 0
                        with open(os.path.join(folder, f), "rb") as blob:
                            tar.addfile(info, blob)
        else:
            shutil.copytree(tree, root, dirs_exist_ok=True)

    publish()
    _same_times(root)
    sizes = {f: os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files}
    first = load_vision("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(first[0][0], torch.zeros(3, 32, 32, dtype=torch.uint8))
    changed = np.random.default_rng(4).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    _write_bmp(str(tree / "train" / "a" / "0000.bmp"), changed)
    publish()
    _same_times(root, ns=1_600_000_001_000_000_000)
    assert {f: os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files} == sizes
    second = load_vision("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(second[0][0], torch.from_numpy(changed.transpose(2, 0, 1).copy()))
    assert torch.equal(second[0][1], first[0][1])
    assert len(os.listdir(tmp_path / "cache")) == 1      # the first version's cache removed


def test_a_new_cache_removes_only_its_own_sources_older_versions(tmp_path):
    """Of a source's caches only the newest stays; another source's cache, other data sets' files and the
    layout before source ids (one file per data set name, source unknown) are told apart."""
    cache = tmp_path / "cache"
    cache.mkdir()
    old_layout = cache / "cifar10-0123456789abcdef.pt"
    kept = [cache / "cifar100-0123456789abcdef.pt", cache / "notes.txt", cache / "cifar10-0123456789abcdef.pt.bak"]
    for path in (old_layout, *kept):
        path.write_bytes(b"x")
    roots = [tmp_path / "one", tmp_path / "two"]
    for root in roots:
        write_image_tree(str(root), "PNG", classes=("a", "b"), per_class=1)
        load_vision("cifar10", str(root), cache_dir=str(cache))
    ours = sorted(p for p in os.listdir(cache) if p.startswith("cifar10-") and p.endswith(".pt") and len(p) > 30)
    assert len(ours) == 2 and not old_layout.exists() and all(p.exists() for p in kept)
    first = roots[0] / "train" / "a" / "0000.png"                     # a new version of the first source
    first.with_name("0001.png").write_bytes(first.read_bytes())
    again = load_vision("cifar10", str(roots[0]), cache_dir=str(cache))
    now = sorted(p for p in os.listdir(cache) if p.startswith("cifar10-") and p.endswith(".pt") and len(p) > 30)
    assert len(now) == 2 and len(set(now) & set(ours)) == 1 and len(again[0]) == 3
    assert all(p.exists() for p in kept)


def test_a_cache_removed_while_it_is_read_is_decoded_again_quietly(tmp_path, monkeypatch, recwarn):
    """A run beside this one may prune the file between the existence check and the load: that is a
    missing cache, not a damaged one (no warning)."""
    write_image_tree(str(tmp_path / "data"), "PNG", classes=("a", "b"), per_class=1)
    expected = load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    loaded = torch.load

    def pruned_meanwhile(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "cache")):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return loaded(path, *args, **kwargs)
    monkeypatch.setattr(torch, "load", pruned_meanwhile)
    again = load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert all(torch.equal(a, e) for a, e in zip(again[:4], expected[:4])) and again[4] == expected[4]
    assert not [w for w in recwarn if "decode cache" in str(w.message)]


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    write_image_tree(str(tmp_path / "data"), "PNG")
    cache_dir = tmp_path / "cache"
    expected = load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(cache_dir))
    (entry,) = os.listdir(cache_dir)
    (cache_dir / entry).write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match=re.escape(f"decode cache {cache_dir / entry} is unreadable")):
        again = load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(cache_dir))
    assert all(torch.equal(a, b) for a, b in zip(again[:4], expected[:4])) and again[4] == expected[4]
    assert os.listdir(cache_dir) == [entry]
    saved = torch.load(cache_dir / entry)            # overwritten with good tensors
    assert torch.equal(saved["train_x"], expected[0])


@pytest.mark.parametrize("failure", ["a file in its place", "the writer fails"])
def test_a_cache_that_cannot_be_written_is_warned_about_and_skipped(tmp_path, monkeypatch, failure):
    write_image_tree(str(tmp_path / "data"), "PNG", per_class=1)
    expected = load_vision("cifar10", str(tmp_path / "data"))
    cache = tmp_path / "cache"
    if failure == "a file in its place":
        cache.write_bytes(b"")
        reason = f"FileExistsError: [Errno 17] File exists: '{cache}'"
    else:
        cache.mkdir()
        reason = "RuntimeError: open file failed with strerror: Permission denied"

        def refused(obj, path):                  # torch's writer on a folder it may not write
            open(path, "wb").close()
            raise RuntimeError("open file failed with strerror: Permission denied\nException raised from ...")
        monkeypatch.setattr(torch, "save", refused)
    with pytest.warns(UserWarning, match=re.escape(f"decode cache {cache} is not writable ({reason}); "
                                                   "continuing without it")):
        loaded = load_vision("cifar10", str(tmp_path / "data"), cache_dir=str(cache))
    assert all(torch.equal(a, b) for a, b in zip(loaded[:4], expected[:4])) and loaded[4] == expected[4]
    assert cache.is_file() if failure == "a file in its place" else os.listdir(cache) == []


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_unreadable_image_names_the_file(tmp_path, damage):
    write_image_tree(str(tmp_path), "PNG")
    bad = tmp_path / "train" / "dog" / "0001.png"
    if damage == "not an image":
        bad.write_bytes(b"this is no image")
        reason = "UnidentifiedImageError"
    else:
        _write_png(str(bad), np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
        bad.write_bytes(bad.read_bytes()[:400])
        reason = "image file is truncated"
    with pytest.raises(DataError, match=re.escape(f"{bad}: not a readable image (")) as err:
        load_vision("cifar10", str(tmp_path))
    assert reason in str(err.value)


@pytest.mark.parametrize("layout", ["pickled", "tree"])
def test_truncated_tar_gz_names_the_archive(tmp_path, layout):
    src = tmp_path / "src"
    if layout == "pickled":
        write_cifar10_pickles(str(src / "cifar-10-batches-py"))
        archive, member = tmp_path / "data" / "cifar-10-python.tar.gz", "cifar-10-batches-py"
    else:
        write_image_tree(str(src / "cifar10"), "PNG")
        archive, member = tmp_path / "data" / "cifar10-png.tar.gz", "cifar10"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / member, arcname=member)
    archive.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(f"{archive}: the archive is damaged or truncated (")):
        load_vision("cifar10", str(archive.parent))


def test_more_classes_than_the_data_set_is_refused_at_load(tmp_path):
    write_image_tree(str(tmp_path / "tree"), "PNG", classes=[f"c{i:02d}" for i in range(12)], per_class=1)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'tree'}: cifar10 has 10 classes, found 12 (c00, ")):
        load_vision("cifar10", str(tmp_path / "tree"))
    folder = tmp_path / "pickled" / "cifar-10-batches-py"
    x, y, _, _ = write_cifar10_pickles(str(folder))
    y[3] = 10
    (folder / "data_batch_1").write_bytes(_pickled(x[:4], y[:4], b"labels"))
    with pytest.raises(DataError, match=re.escape(f"{folder}: cifar10 labels must be in 0..9, the train split has "
                                                  "labels 0..10")):
        load_vision("cifar10", str(tmp_path / "pickled"))


# -- Tiny ImageNet -------------------------------------------------------------------------
def _tiny_files(wnids=("n01443537", "n01629819")):
    wnids = list(wnids)
    files = {"wnids.txt": "\n".join(wnids).encode()}
    lines = []
    for c, w in enumerate(wnids):
        for i in range(2):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = _encode(_smooth_image(64, 10 * c + i), "JPEG")
            files[f"train/{w}/{w}_boxes.txt"] = b""
        files[f"val/images/val_{c}.JPEG"] = _encode(_smooth_image(64, 50 + c), "JPEG")
        lines.append(f"val_{c}.JPEG\t{wnids[1 - c]}\t0\t0\t63\t63")
    files["val/val_annotations.txt"] = "\n".join(lines).encode()
    return wnids, files


def test_tiny_imagenet_folder_and_zip(tmp_path):
    wnids, files = _tiny_files()
    root = tmp_path / "folder" / "tiny-imagenet-200"
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    (tmp_path / "zip").mkdir()
    with zipfile.ZipFile(tmp_path / "zip" / "tiny-imagenet-200.zip", "w") as archive:
        for name, blob in files.items():
            archive.writestr("tiny-imagenet-200/" + name, blob)
    for where in ("folder", "zip"):
        train_x, train_y, _, test_y, classes = load_vision("tiny-imagenet", str(tmp_path / where))
        assert classes == wnids
        assert tuple(train_x.shape) == (4, 3, 64, 64) and train_y.tolist() == [0, 0, 1, 1]
        assert test_y.tolist() == [1, 0]      # labels from val_annotations.txt, not the file order


def test_tiny_imagenet_train_folder_through_a_link(tmp_path):
    wnids, files = _tiny_files()
    for name, blob in files.items():
        for top in ("plain", "linked"):
            path = tmp_path / top / "tiny-imagenet-200" / name
            if top == "linked" and name.startswith(f"train/{wnids[1]}/"):
                path = tmp_path / "store" / name                    # this class lives elsewhere, linked in
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
    os.symlink(tmp_path / "store" / "train" / wnids[1], tmp_path / "linked" / "tiny-imagenet-200" / "train" / wnids[1])
    expected = load_vision("tiny-imagenet", str(tmp_path / "plain"))
    loaded = load_vision("tiny-imagenet", str(tmp_path / "linked"))
    assert loaded[1].tolist() == [0, 0, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(loaded[:4], expected[:4])) and loaded[4] == expected[4]

def test_tiny_imagenet_labels_are_positions_in_an_unsorted_wnids_txt(tmp_path):
    """The official wnids.txt is not sorted: the classes come in its order and classes[label] is each
    training image's folder and each validation image's annotated class."""
    wnids, files = _tiny_files(wnids=("n01629819", "n01443537"))
    root = tmp_path / "tiny-imagenet-200"
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    annotated = dict(line.split("\t")[:2] for line in files["val/val_annotations.txt"].decode().splitlines())
    owners = {"train": [], "test": []}                # (pillow's decode of a file, the class it belongs to)
    for name, blob in files.items():
        if name.endswith(".JPEG"):
            decoded = torch.from_numpy(np.asarray(PIL.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1).copy())
            split, owner = ("train", name.split("/")[1]) if name.startswith("train/") else \
                ("test", annotated[name.split("/")[-1]])
            owners[split].append((decoded, owner))
    train_x, train_y, test_x, test_y, classes = load_vision("tiny-imagenet", str(tmp_path))
    assert classes == wnids and sorted(set(train_y.tolist())) == [0, 1]
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        assert len(images) == len(owners[split])
        for image, label in zip(images, labels.tolist()):
            (owner,) = [o for decoded, o in owners[split] if torch.equal(decoded, image)]
            assert classes[label] == owner


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_tiny_imagenet_hidden_files_are_skipped(tmp_path, layout):
    wnids, files = _tiny_files()
    hidden = dict(files)
    hidden[f"train/{wnids[0]}/images/._{wnids[0]}_0.JPEG"] = _APPLE_DOUBLE
    hidden[f"train/.{wnids[1]}/images/{wnids[1]}_0.JPEG"] = files[f"train/{wnids[1]}/images/{wnids[1]}_0.JPEG"]
    for top, contents in (("plain", files), ("hidden", hidden)):
        if layout == "folder":
            for name, blob in contents.items():
                path = tmp_path / top / "tiny-imagenet-200" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)
        else:
            (tmp_path / top).mkdir()
            with zipfile.ZipFile(tmp_path / top / "tiny-imagenet-200.zip", "w") as archive:
                for name, blob in contents.items():
                    archive.writestr("tiny-imagenet-200/" + name, blob)
    expected = load_vision("tiny-imagenet", str(tmp_path / "plain"))
    loaded = load_vision("tiny-imagenet", str(tmp_path / "hidden"))
    assert loaded[1].tolist() == [0, 0, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(loaded[:4], expected[:4])) and loaded[4] == expected[4]


# -- clear messages ----------------------------------------------------------------------------
def test_missing_folder_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_vision("cifar10", str(tmp_path / "nowhere"))
    text = str(err.value)
    assert f"data folder {tmp_path / 'nowhere'} does not exist" in text
    assert f"cifar10 not found (--data-dir {tmp_path / 'nowhere'})" in text
    assert "cifar-10-batches-py" in text and "train/<class>" in text
    assert "--download" in text


def test_a_file_given_as_the_data_folder_is_named_as_one(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"an archive, given in place of its folder")
    with pytest.raises(DataError) as err:
        load_vision("cifar10", str(path))
    assert f"data folder {path} is not a directory." in str(err.value) and "does not exist" not in str(err.value)
    # --download into it (or under it) is refused before any network access.
    for root, message in [(path, f"data folder {path} is not a directory; --download puts cifar-10-python.tar.gz "
                                 f"into a folder"),
                          (path / "sub", f"could not make the data folder {path / 'sub'} for --download")]:
        with pytest.raises(DataError, match=re.escape(message)):
            data_module.download("cifar10", str(root))
    assert path.read_bytes() == b"an archive, given in place of its folder"


def test_folder_without_layout_message(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError) as err:
        load_vision("tiny-imagenet", str(tmp_path))
    assert f"tiny-imagenet not found (--data-dir {tmp_path})" in str(err.value) and "wnids.txt" in str(err.value)


def test_incomplete_pickled_folder_message(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_pickles(str(folder))
    os.remove(folder / "data_batch_3")
    with pytest.raises(DataError, match=re.escape(f"{folder / 'data_batch_3'} is missing: "
                                                  "the pickled cifar10 folder is incomplete")):
        load_vision("cifar10", str(tmp_path))


# -- augmentation ----------------------------------------------------------------------------
def test_pad_crop_flip_matches_a_loop():
    images = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8)
    rows = torch.tensor([0, 8, 3, 4, 1])
    cols = torch.tensor([8, 0, 2, 4, 5])
    flip = torch.tensor([False, True, True, False, True])
    out = pad_crop_flip(images, rows, cols, flip)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(5):
        crop = padded[i, :, rows[i]:rows[i] + 7, cols[i]:cols[i] + 9]
        expected = crop.flip(-1) if flip[i] else crop
        assert torch.equal(out[i], expected)
    assert not torch.equal(out[1], images[1])     # the crop really moved the image


def _resized_crop_reference(image, scale, aspect, center_x, center_y, flip, size):
    """float64 reference of one documented crop of ``image`` (C, H, W): a box of half-sides scale·√aspect
    (width) and scale/√aspect (height), each at most 1, in [-1, 1] coordinates, its centre moved so that the
    box lies inside the image, sampled bilinearly at the centres of size×size pixels, mirrored if ``flip``."""
    image = np.asarray(image, dtype=np.float64)
    _, height, width = image.shape
    half_w, half_h = min(scale * math.sqrt(aspect), 1.0), min(scale / math.sqrt(aspect), 1.0)
    center_x = min(max(center_x, -1.0 + half_w), 1.0 - half_w)
    center_y = min(max(center_y, -1.0 + half_h), 1.0 - half_h)

    def weights(center, half, n):
        """(size, n): the bilinear weights of the n input pixels for each output pixel along one axis."""
        position = center + half * ((2 * np.arange(size) + 1) / size - 1)
        source = np.clip(((position + 1) * n - 1) / 2, 0, n - 1)       # in input pixels, centres at 0..n-1
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, n - 1)
        out = np.zeros((size, n))
        np.add.at(out, (np.arange(size), low), 1 - (source - low))
        np.add.at(out, (np.arange(size), high), source - low)
        return out
    out = np.einsum("ih,chw,jw->cij", weights(center_y, half_h, height), image, weights(center_x, half_w, width))
    return out[:, :, ::-1].copy() if flip else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale, aspect, center_x, center_y, flip", [
    (0.8, 1.0, 0.1, 0.0, False),
    (0.8, 1.0, 0.1, 0.0, True),
    (224 / 384, 1.25, 0.3, -0.6, True),
    (0.5, 0.8, 1.0, -1.0, True),            # a centre in a corner: the box is moved inside the image
    (0.6, 1.25, -1.0, 1.0, False),
    (1.0, 1.25, 0.5, 0.9, False),           # the box's width reaches the image's
])
def test_resized_crop_matches_a_float64_reference(dtype, scale, aspect, center_x, center_y, flip):
    image = torch.rand(3, 13, 11, dtype=torch.float64)
    out = resized_crop(image[None].to(dtype), torch.tensor([scale], dtype=dtype), torch.tensor([aspect], dtype=dtype),
                       torch.tensor([center_x], dtype=dtype), torch.tensor([center_y], dtype=dtype),
                       torch.tensor([flip]), 9)
    expected = torch.from_numpy(_resized_crop_reference(image.numpy(), scale, aspect, center_x, center_y, flip, 9))
    assert out.dtype == dtype and tuple(out.shape) == (1, 3, 9, 9)
    assert rel_err(out[0], expected) < REL_TOL[dtype]


def test_resized_crop_mirrors_the_box_and_keeps_it_inside_the_image():
    images = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    centers = torch.tensor([0.1, -0.3, 1.0, -1.0], dtype=torch.float64)
    plain = resized_crop(images, ones * 0.7, ones * 1.1, centers, -centers, torch.zeros(4, dtype=torch.bool), 16)
    mirrored = resized_crop(images, ones * 0.7, ones * 1.1, centers, -centers, torch.ones(4, dtype=torch.bool), 16)
    assert rel_err(mirrored, plain.flip(-1)) < REL_TOL[torch.float64]
    assert rel_err(mirrored, plain) > 0.1                       # the mirror is another image
    # A centre at the edge gives the crop of the centre that puts the box's side on the image's edge.
    half = torch.tensor([0.5, 0.4], dtype=torch.float64)        # square boxes: half-side = scale
    edge = resized_crop(images[:2], half, ones[:2], torch.tensor([1.0, -1.0]).double(),
                        torch.tensor([-1.0, 1.0]).double(), torch.zeros(2, dtype=torch.bool), 16)
    inside = resized_crop(images[:2], half, ones[:2], torch.stack([1 - half[0], -1 + half[1]]),
                          torch.stack([-1 + half[0], 1 - half[1]]), torch.zeros(2, dtype=torch.bool), 16)
    assert rel_err(edge, inside) < REL_TOL[torch.float64]


def test_hsv_jitter_identity_and_hue_turn():
    images = torch.rand(3, 3, 5, 5)
    ones = torch.ones(3)
    assert torch.allclose(hsv_jitter(images, torch.zeros(3), ones, ones), images, atol=1e-5)
    # A hue shift of one third of a turn maps pure red to pure green.
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1.0
    green = hsv_jitter(red, torch.tensor([1 / 3]), torch.ones(1), torch.ones(1))
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


@pytest.mark.parametrize("recipe", ["cifar", "tiny-imagenet"])
def test_vision_data_epochs_are_reproducible_and_normalized(recipe):
    size = 32 if recipe == "cifar" else 16
    x = torch.randint(0, 256, (20, 3, size, size), dtype=torch.uint8)
    y = torch.arange(20) % 4
    data = VisionData(x, y, x[:6], y[:6], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), batch_size=8, recipe=recipe, seed=3)
    assert len(data) == 2 and data.num_classes == 4
    first = list(data.train_batches(1))
    again = list(data.train_batches(1))
    other = list(data.train_batches(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    resumed = list(data.train_batches(1, start=1))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], first[1][0])
    images, _ = first[0]
    assert images.dtype == torch.float32 and tuple(images.shape) == (8, 3, size, size)
    val = list(data.val_batches())
    expected = (x[:6].float() - 127.5) / 63.75
    if recipe == "cifar":
        assert torch.allclose(val[0][0], expected, atol=1e-4)
    assert sum(len(b[1]) for b in val) == 6


def test_training_labels_follow_their_images_through_the_shuffle():
    """Image i is filled with the value 5·i, which survives the crop at the centre pixel: each batch's labels
    are those of the images in it, every image comes once an epoch, and the order is shuffled."""
    n = 40
    y = torch.randperm(n, generator=torch.Generator().manual_seed(1)) % 7
    x = (torch.arange(n) * 5).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()
    data = VisionData(x, y, x[:4], y[:4], (0.0,) * 3, (1 / 255,) * 3, batch_size=8, seed=2)
    for epoch in range(2):
        shown = []
        for images, labels in data.train_batches(epoch):
            index = (images[:, 0, 8, 8] / 5).round().long()
            assert torch.equal(labels, y[index])
            shown.append(index)
        shown = torch.cat(shown)
        assert sorted(shown.tolist()) == list(range(n)) and not torch.equal(shown, torch.arange(n))


def test_cifar_epochs_mirror_half_the_images_and_draw_every_crop_offset():
    """The cifar recipe crops at offsets 0..2·pad = 0..8 in each axis (shifts of up to 4 pixels either
    way) and mirrors with probability one half: each augmented image is found among the 162 crops and
    mirrors of the zero-padded image, whose pixels are distinct and nonzero."""
    size = 8
    image = (torch.arange(3 * size * size) + 1).view(3, size, size).to(torch.uint8)
    x = image.expand(64, -1, -1, -1).contiguous()
    y = torch.arange(64) % 2
    data = VisionData(x, y, x[:2], y[:2], (0.0,) * 3, (1 / 255,) * 3, batch_size=32, seed=5)
    padded = torch.nn.functional.pad(image.double(), (4, 4, 4, 4))
    candidates = [(row, col, flip) for row in range(9) for col in range(9) for flip in (False, True)]
    crops = torch.stack([padded[:, row:row + size, col:col + size].flip(-1) if flip
                         else padded[:, row:row + size, col:col + size] for row, col, flip in candidates])
    found = []
    for epoch in range(4):
        for images, _ in data.train_batches(epoch):
            match = (images.double().round()[:, None] == crops[None]).flatten(2).all(-1)      # (batch, 162)
            assert match.sum(1).tolist() == [1] * len(images)
            found += [candidates[i] for i in match.int().argmax(1).tolist()]
    rows, cols, flips = zip(*found)
    assert set(rows) == set(cols) == set(range(9))
    assert 0.4 < sum(flips) / len(flips) < 0.6


def test_tiny_imagenet_draws_span_the_documented_ranges():
    """Aspect ratio in [0.8, 1.25], crop side 224/[256, 384] of the image's, hue ±0.1 turn (±36°),
    saturation and value ×[0.6, 1.4]: every draw inside, and some near each end."""
    n = 2000
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    y = torch.zeros(n, dtype=torch.long)
    data = VisionData(x, y, x[:1], y[:1], (0.5,) * 3, (0.25,) * 3, batch_size=n, recipe="tiny-imagenet")
    draws = data._epoch_draws(0)
    for name, low, high in (("aspect", 0.8, 1.25), ("scale", 224 / 384, 224 / 256), ("hue", -0.1, 0.1),
                            ("sat", 0.6, 1.4), ("val", 0.6, 1.4)):
        values = draws[name].double()
        near = 0.02 * (high - low)
        assert low - 1e-6 <= values.min() < low + near and high - near < values.max() <= high + 1e-6, name
    assert 0.4 < draws["flip"].double().mean() < 0.6


def test_tiny_imagenet_validation_is_the_central_crop_resized():
    """Validation images are the central 224/256 of the side, resized bilinearly to the data set's size."""
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2])
    data = VisionData(x, y, x, y, (0.5,) * 3, (0.25,) * 3, batch_size=2, recipe="tiny-imagenet")
    (images, labels), = data.val_batches()
    expected = np.stack([_resized_crop_reference(image.numpy(), 224 / 256, 1.0, 0.0, 0.0, False, 16) for image in x])
    expected = torch.from_numpy((expected / 255 - 0.5) / 0.25)
    assert torch.equal(labels, y) and tuple(images.shape) == (3, 3, 16, 16)
    assert rel_err(images, expected) < REL_TOL[torch.float32]


def test_vision_data_evaluates_in_batches_of_twice_the_training_batch_by_default():
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(10) % 4
    default = VisionData(x, y, x, y, (0.5,) * 3, (0.25,) * 3, batch_size=3)
    given = VisionData(x, y, x, y, (0.5,) * 3, (0.25,) * 3, batch_size=3, eval_batch_size=4)
    assert default.eval_batch_size == 6 and given.eval_batch_size == 4
    for data, sizes in ((default, [6, 4]), (given, [4, 4, 2])):
        batches = list(data.val_batches())
        assert [len(labels) for _, labels in batches] == sizes
        assert torch.equal(torch.cat([labels for _, labels in batches]), y)


# The per-channel mean and standard deviation of each training set's pixels (CIFAR-10, CIFAR-100), and the
# ImageNet statistics (torchvision's) for Tiny ImageNet.
PUBLISHED_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def test_normalization_constants_are_the_published_ones():
    assert {name: (spec["mean"], spec["std"]) for name, spec in data_module.DATASETS.items()} == PUBLISHED_NORMALIZATION


@pytest.mark.parametrize("name", sorted(PUBLISHED_NORMALIZATION))
def test_the_cli_normalizes_each_data_set_with_its_constants(tmp_path, monkeypatch, name):
    """The VisionData that ``cli.load_data`` builds maps a pixel v of channel c to (v/255 − mean_c) / std_c."""
    size = data_module.DATASETS[name]["size"]
    levels = torch.tensor([10, 128, 240], dtype=torch.uint8)
    images = levels.view(1, 3, 1, 1).expand(4, 3, size, size).contiguous()      # one level per channel
    labels = torch.tensor([0, 1, 0, 1])
    monkeypatch.setattr(data_module, "load_vision", lambda *args, **kwargs: (images, labels, images[:2],
                                                                              labels[:2], ["a", "b"]))
    cfg = dict(data=name, data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), batch_size=2, device="cpu",
               channels_last=False, seed=0)
    data = cli.load_data(cfg, log=lambda line: None)
    assert data.recipe == ("tiny-imagenet" if name == "tiny-imagenet" else "cifar")    # and its augmentation
    (normalized, _), = data.val_batches()
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in PUBLISHED_NORMALIZATION[name])
    expected = ((levels.double().view(1, 3, 1, 1) / 255 - mean) / std).expand(2, 3, size, size)
    assert tuple(normalized.shape) == (2, 3, size, size)
    assert (normalized.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("change,error,message", [
    (dict(batch_size=0), ValueError, "batch_size must be a positive int, got 0"),
    (dict(batch_size=4.0), TypeError, "batch_size must be a positive int, got float (4.0)"),
    (dict(eval_batch_size=-1), ValueError, "eval_batch_size must be a positive int or None, got -1"),
    (dict(test=(0, 0)), ValueError, "test_x must hold at least one image, got an empty test split"),
    (dict(test=(6, 5)), ValueError, "test_y must hold one label per image of test_x (6), got 5"),
    (dict(mean=(0.5,)), ValueError, "mean must hold 3 values (one per channel), got [0.5]"),
    (dict(std=(0.25,) * 4), ValueError, "std must hold 3 values (one per channel), got [0.25, 0.25, 0.25, 0.25]"),
])
def test_vision_data_refuses_what_it_cannot_batch_or_evaluate(change, error, message):
    """These failed late (ZeroDivisionError, a view() or max() RuntimeError), or an empty test split
    evaluated to loss 0.0 and accuracy 0.0."""
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(8) % 4
    images, labels = change.pop("test", (6, 6))
    kwargs = dict(mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4, num_classes=4)
    kwargs.update(change)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        VisionData(x, y, x[:images], y[:labels], **kwargs)


def test_epoch_draws_take_every_allowed_seed_and_keep_the_smaller_seeds_draws():
    """--seed accepts [0, 2**63); seed * 100_003 + epoch is taken modulo 2**63 for the generator, which
    leaves the draws of a seed whose product fits as they were."""
    from dynrank.train.augment import epoch_generator
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8) % 2
    stream = (torch.arange(400) % 251).to(torch.uint8)
    for seed in (2 ** 63 - 1, 2 ** 62 + 12345):
        vision = VisionData(x, y, x[:2], y[:2], (0.5,) * 3, (0.25,) * 3, batch_size=4, seed=seed)
        text = TextData(stream, stream, context=16, batch_size=4, steps=2, seed=seed)
        for epoch in (0, 3):
            reduced = (seed * 100_003 + epoch) % 2 ** 63
            order = torch.randperm(8, generator=torch.Generator().manual_seed(reduced))
            assert torch.equal(vision._epoch_draws(epoch)["order"], order)
            starts = torch.randint(0, 400 - 16, (2, 4), generator=torch.Generator().manual_seed(reduced))
            assert torch.equal(next(text.train_batches(epoch))[0][:, 0], stream[starts[0]].long())
    for seed, epoch in ((0, 0), (3, 7), (2 ** 40, 5)):          # products below 2**63: unchanged
        assert torch.equal(epoch_generator(seed, epoch).get_state(),
                           torch.Generator().manual_seed(seed * 100_003 + epoch).get_state())


# -- the embedded corpus ---------------------------------------------------------------------
def test_stdlib_corpus_is_deterministic_and_split_per_file():
    files = stdlib_files()
    assert len(files) >= len(STDLIB_MODULES) - 2 and files == sorted(files)
    train, val, listed = load_stdlib_corpus()
    train2, val2, _ = load_stdlib_corpus()
    assert torch.equal(train, train2) and torch.equal(val, val2) and listed == files
    assert train.dtype == torch.uint8 and 0.08 < len(val) / (len(train) + len(val)) < 0.12
    # The start of the first file opens the train stream, its end opens the val stream.
    with open(files[0], "rb") as f:
        text = f.read()
    assert bytes(train[:200].tolist()) == text[:200]
    assert bytes(val[:50].tolist()) == text[int(len(text) * 0.9):][:50]


def test_stdlib_corpus_missing_sources(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"the standard-library sources under {tmp_path} are missing or too "
                                                  f"small (0 of {len(STDLIB_MODULES)} modules, 0 bytes); this "
                                                  "Python install ships no .py sources")):
        load_stdlib_corpus(stdlib_dir=str(tmp_path))


def test_stdlib_corpus_max_bytes_bounds_the_total():
    files = stdlib_files()
    minimum = len(files) * 68                       # 64 bytes of each file and its two blank lines
    for max_bytes in (minimum, minimum + len(files) - 1, 10_001):
        train, val, _ = load_stdlib_corpus(max_bytes=max_bytes)
        assert max_bytes - len(files) < len(train) + len(val) <= max_bytes
        with open(files[0], "rb") as f:
            head = f.read(max_bytes // len(files) - 4)
        assert bytes(train[:len(head) * 9 // 10].tolist()) == head[:len(head) * 9 // 10]
    with pytest.raises(ValueError, match=re.escape(f"max_bytes must be at least {minimum} (64 bytes of each of "
                                                   f"the {len(files)} files and their blank lines), got 1000")):
        load_stdlib_corpus(max_bytes=1000)


def test_text_data_targets_are_inputs_shifted():
    stream = torch.arange(1000) % 251
    data = TextData(stream.to(torch.uint8), stream[:300].to(torch.uint8), context=16, batch_size=4, steps=3, seed=1)
    batches = list(data.train_batches(0))
    assert len(batches) == 3
    inputs, targets = batches[0]
    assert tuple(inputs.shape) == (4, 16) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal((inputs + 1) % 251, targets)           # the stream counts up by one
    again = list(data.train_batches(0, start=2))
    assert torch.equal(again[0][0], batches[2][0])
    val = list(data.val_batches())
    assert sum(v[0].shape[0] for v in val) == (300 - 1) // 16


def test_text_data_draws_every_window_and_counts_them():
    """A 10-byte stream with context 4 has windows of 5 bytes at starts 0..5; the last one's target is
    the last byte."""
    stream = torch.arange(10, dtype=torch.uint8)
    data = TextData(stream, stream, context=4, batch_size=4, steps=50)
    starts = {int(x[0]) for epoch in range(2) for inputs, _ in data.train_batches(epoch) for x in inputs}
    assert starts == set(range(6))
    one = TextData(stream[:5], stream[:5], context=4, batch_size=1, steps=3)   # exactly one window
    assert all(torch.equal(y, torch.arange(1, 5)[None]) for _, y in one.train_batches(0))
    with pytest.raises(DataError, match=re.escape("--batch-size 3 is larger than the 2 windows of context + 1 = 5 "
                                                  "bytes in the 6-byte training text")):
        TextData(stream[:6], stream, context=4, batch_size=3)


@pytest.mark.parametrize("change,error,message", [
    (dict(context=0), ValueError, "context must be a positive int, got 0"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int, got 0"),
    (dict(val_windows=0), ValueError, "val_windows must be a positive int, got 0"),
    (dict(val_windows=-1), ValueError, "val_windows must be a positive int, got -1"),
    (dict(eval_batch_size=0), ValueError, "eval_batch_size must be a positive int, got 0"),
    (dict(steps=0), ValueError, "steps must be a positive int or None, got 0"),
    (dict(steps=-2), ValueError, "steps must be a positive int or None, got -2"),
    (dict(steps=2.0), TypeError, "steps must be a positive int or None, got float (2.0)"),
    (dict(context=16.0), TypeError, "context must be a positive int, got float (16.0)"),
])
def test_text_data_refuses_arguments_out_of_range(change, error, message):
    """val_windows=0 evaluated no window and reported val loss 0.0; the others failed late with a
    ZeroDivisionError, a RuntimeError of arange or a range() ValueError."""
    stream = (torch.arange(400) % 251).to(torch.uint8)
    kwargs = dict(context=16, batch_size=4, steps=2)
    kwargs.update(change)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        TextData(stream, stream, **kwargs)


@pytest.mark.parametrize("length, context, val_windows, count", [
    (1000, 16, 8, 8),
    (300, 16, 512, 18),
    (49, 16, 2, 2),
    (33, 16, 512, 2),
    (32, 16, 512, 1),           # 16 inputs and a target byte: room for one window
])
def test_text_data_val_windows_never_overlap_and_reach_the_stream_end(length, context, val_windows, count):
    """The fixed validation windows are spread over the whole stream: their inputs never overlap and the
    last one ends within ``context`` bytes of its end.  Each window is found in the (random) stream."""
    val = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length), dtype=torch.uint8)
    data = TextData(val, val, context=context, batch_size=1, steps=1, val_windows=val_windows, eval_batch_size=3)
    every = val.long().unfold(0, context + 1, 1)
    starts = []
    for inputs, targets in data.val_batches():
        for window in torch.cat([inputs, targets[:, -1:]], 1):
            (start,) = (every == window).all(1).nonzero().flatten().tolist()
            starts.append(start)
    assert len(starts) == count and starts[0] == 0
    assert all(later - earlier >= context for earlier, later in zip(starts, starts[1:]))
    assert starts[-1] + context >= length - 1 - context


def test_text_data_takes_one_val_window_in_batches_of_one():
    """val_windows=1 and eval_batch_size=1, the smallest values accepted, evaluate one window."""
    stream = (torch.arange(400) % 251).to(torch.uint8)
    one = TextData(stream, stream, context=16, batch_size=4, steps=2, val_windows=1, eval_batch_size=1)
    assert [tuple(inputs.shape) for inputs, _ in one.val_batches()] == [(1, 16)]


@pytest.mark.parametrize("val_fraction,error,got", [
    (-0.1, ValueError, "-0.1"),
    (0.0, ValueError, "0.0"),
    (1.0, ValueError, "1.0"),
    (1.5, ValueError, "1.5"),
    (float("nan"), ValueError, "nan"),
    ("0.1", TypeError, "str ('0.1')"),
])
def test_stdlib_corpus_refuses_a_val_fraction_outside_0_1(val_fraction, error, got):
    """-0.1 held nothing out (val was the blank lines alone) and 1.5 split each file in half, silently."""
    message = f"val_fraction must be a float in (0, 1), got {got}"
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        load_stdlib_corpus(max_bytes=10_001, val_fraction=val_fraction)


@pytest.mark.parametrize("max_bytes,error,got", [
    (10_001.0, TypeError, "float (10001.0)"),
    ("10001", TypeError, "str ('10001')"),
    (True, TypeError, "bool (True)"),
    (0, ValueError, "0"),
])
def test_stdlib_corpus_refuses_a_max_bytes_that_is_not_a_positive_int(max_bytes, error, got):
    """A float or str failed inside the file read or the division, with a message naming no argument."""
    message = f"max_bytes must be a positive int or None, got {got}"
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        load_stdlib_corpus(max_bytes=max_bytes)


def test_download_failure_is_a_clear_message(tmp_path, monkeypatch):
    from dynrank.train import data as data_module

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(data_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        data_module.download("cifar10", str(tmp_path))
    text = str(err.value)
    assert "could not download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (network is unreachable)" in text
    assert f"put cifar-10-python.tar.gz into {tmp_path}" in text
    assert os.listdir(tmp_path) == []               # no partial file left behind


def test_a_download_with_the_wrong_md5_is_refused_and_removed(tmp_path, monkeypatch):
    fetched = b"an error page, not the archive"
    monkeypatch.setattr(data_module.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(fetched))
    official = data_module.DATASETS["cifar10"]["md5"]
    with pytest.raises(DataError, match=re.escape(f"cifar-10-python.tar.gz downloaded with MD5 "
                                                  f"{hashlib.md5(fetched).hexdigest()}, expected {official}")):
        data_module.download("cifar10", str(tmp_path))
    assert os.listdir(tmp_path) == []               # no partial file left behind


def test_download_fetches_a_damaged_archive_again(tmp_path, monkeypatch):
    src = tmp_path / "src"
    x, _, _, _ = write_cifar10_pickles(str(src / "cifar-10-batches-py"))
    with tarfile.open(src / "official.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    official = (src / "official.tar.gz").read_bytes()
    monkeypatch.setitem(data_module.DATASETS["cifar10"], "md5", hashlib.md5(official).hexdigest())
    fetched = []

    def urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(official)
    monkeypatch.setattr(data_module.urllib.request, "urlopen", urlopen)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(official[:len(official) // 2])            # an interrupted copy
    with pytest.raises(DataError, match=re.escape(f"; delete {archive} and put an intact copy there, or rerun with "
                                                  "--download to fetch the official archive")):
        load_vision("cifar10", str(archive.parent))
    damaged_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match=re.escape(f"{archive} has MD5 {damaged_md5}, expected "
                                                   f"{hashlib.md5(official).hexdigest()} (damaged or not the official "
                                                   "archive); downloading it again")):
        assert data_module.download("cifar10", str(archive.parent)) == str(archive)
    assert archive.read_bytes() == official and len(fetched) == 1
    assert torch.equal(load_vision("cifar10", str(archive.parent))[0], torch.from_numpy(x))
    assert data_module.download("cifar10", str(archive.parent)) == str(archive)     # intact: kept, not fetched
    assert len(fetched) == 1 and sorted(os.listdir(archive.parent)) == ["cifar-10-python.tar.gz"]
