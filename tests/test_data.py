"""Dataset loaders against the published facts in ../shared/datasets/README.md, and bad data."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from dataclasses import astuple

import numpy as np
import pytest
import torch

from raycls.data import BUILTIN_SHAPES, DataError, download_cifar10, load_dataset
from tests.conftest import shared_dataset


def test_digits_offline_default_is_deterministic():
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert a.train.labels.dtype == torch.int64
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.val.labels, b.val.labels)
    c = load_dataset("digits", seed=4)
    assert not torch.equal(a.val.images, c.val.images)  # the seed moves the validation split
    assert torch.equal(a.test.images, c.test.images)  # but never the test hold-out
    assert a.train.images.max() == 255
    shape = BUILTIN_SHAPES["digits"]
    assert (shape.channels, shape.image_size, shape.classes) == (1, 8, tuple(a.classes))


def test_mnist_matches_published_facts():
    ds = load_dataset("mnist", str(shared_dataset("mnist")))
    assert len(ds.train) + len(ds.val) == 60_000 and len(ds.test) == 10_000
    counts = torch.bincount(torch.cat([ds.train.labels, ds.val.labels]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert ds.train.images.shape[1:] == (1, 28, 28)
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert ds.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert astuple(BUILTIN_SHAPES["mnist"]) == (1, 28, tuple(ds.classes))


def test_fashion_mnist_matches_published_facts():
    ds = load_dataset("fashion-mnist", str(shared_dataset("fashion-mnist")))
    counts = torch.bincount(torch.cat([ds.train.labels, ds.val.labels]), minlength=10)
    assert counts.tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert astuple(BUILTIN_SHAPES["fashion-mnist"]) == (1, 28, tuple(ds.classes))


def test_cifar10_matches_published_facts():
    ds = load_dataset("cifar10", str(shared_dataset("cifar10")), download=False)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                          "horse", "ship", "truck"]
    assert ds.test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    shape = BUILTIN_SHAPES["cifar10"]  # what commands check against before loading it
    assert (shape.channels, shape.image_size, shape.classes) == (3, 32, tuple(ds.classes))
    assert np.allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=1e-4)
    assert np.allclose(ds.std, (0.2470, 0.2435, 0.2616), atol=1e-3)
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    # the first train labels, read straight from the first batch file
    first = np.fromfile(shared_dataset("cifar10") / "cifar-10-batches-bin" / "data_batch_1.bin",
                        dtype=np.uint8, count=3073 * 10).reshape(10, 3073)[:, 0]
    assert first.tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def _idx(path, magic, array):
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist(d, n=40):
    rng = np.random.default_rng(0)
    _idx(d / "train-images-idx3-ubyte.gz", 2051, rng.integers(0, 255, (n, 28, 28)))
    _idx(d / "train-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
    _idx(d / "t10k-images-idx3-ubyte.gz", 2051, rng.integers(0, 255, (10, 28, 28)))
    _idx(d / "t10k-labels-idx1-ubyte.gz", 2049, np.arange(10))


def test_idx_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "nope"))
    _fake_mnist(tmp_path)
    assert len(load_dataset("mnist", str(tmp_path)).test) == 10
    f = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(f.read_bytes())
    f.write_bytes(gzip.compress(raw[:-100]))  # truncated data
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: truncated"):
        load_dataset("mnist", str(tmp_path))
    f.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels"):
        load_dataset("mnist", str(tmp_path))


def _fake_cifar_archive(tmp_path, n=20):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            rec = np.concatenate([(np.arange(n) % 10)[:, None],
                                  rng.integers(0, 255, (n, 3072))], axis=1).astype(np.uint8)
            add(name, rec.tobytes())
        add("batches.meta.txt", "\n".join(f"class{i}" for i in range(10)).encode())
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(buf.getvalue())
    return archive, hashlib.md5(buf.getvalue()).hexdigest()


def test_cifar10_download_checks_md5_offline(tmp_path):
    """The real download code, fed a local archive through a file:// URL."""
    archive, md5 = _fake_cifar_archive(tmp_path)
    with pytest.raises(DataError, match="md5 .* does not match"):
        download_cifar10(tmp_path / "bad" / "data", url=archive.as_uri(), md5="0" * 32)
    assert not (tmp_path / "bad").exists()  # a failed download leaves no empty --data-dir
    with pytest.raises(OSError):
        download_cifar10(tmp_path / "gone", url=(tmp_path / "none.tar.gz").as_uri(), md5=md5)
    assert not (tmp_path / "gone").exists()
    folder = download_cifar10(tmp_path / "good", url=archive.as_uri(), md5=md5)
    ds = load_dataset("cifar10", str(folder.parent), download=False)
    assert len(ds.test) == 20 and ds.classes[3] == "class3"
    assert not list((tmp_path / "good").glob("*.tar.gz"))  # the temporary archive is removed


def test_cifar10_missing_and_truncated(tmp_path):
    with pytest.raises(DataError, match="put the official binary version there"):
        load_dataset("cifar10", str(tmp_path), download=False)
    archive, md5 = _fake_cifar_archive(tmp_path)
    folder = download_cifar10(tmp_path / "d", url=archive.as_uri(), md5=md5)
    with open(folder / "data_batch_3.bin", "ab") as f:
        f.write(b"\x00" * 17)
    with pytest.raises(DataError, match="data_batch_3.bin: .* not a whole number"):
        load_dataset("cifar10", str(folder), download=False)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="valid datasets: digits, mnist"):
        load_dataset("imagenet")


def _write_imagefolder(root, per_class=6, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


@pytest.mark.ray
def test_imagefolder_through_ray_data(ray_session, tmp_path):
    _write_imagefolder(tmp_path / "imgs")
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=16)
    assert ds.classes == ["cat", "dog"]
    assert ds.train.images.shape[1:] == (3, 16, 16) and ds.train.images.dtype == torch.uint8
    assert len(ds.train) + len(ds.val) + len(ds.test) == 12
    # bad data: an unreadable image is skipped and named, past the limit it stops the load
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    again = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=16)
    assert len(again.train) + len(again.val) + len(again.test) == 12
    bad = r"more than --max-bad-images 0: .*broken.png: not a recognised image"
    with pytest.raises(DataError, match=bad):
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=16, max_bad_images=0)
    (tmp_path / "imgs" / "bird").mkdir()
    with pytest.raises(DataError, match="bird has no images"):
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}")


@pytest.mark.ray
def test_parquet_through_ray_data(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for i in range(10):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "label": i % 3})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = load_dataset(f"parquet:{tmp_path / 'd.parquet'}", image_size=8)
    assert ds.classes == ["0", "1", "2"] and ds.channels == 1
    every = torch.cat([ds.train.images, ds.val.images, ds.test.images]).flatten(1)[:, 0]
    assert sorted(every.tolist()) == [i * 20 for i in range(10)]  # pixels survive exactly
    pq.write_table(pa.Table.from_pylist([{"img": b"x", "label": 0}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['image'\]"):
        load_dataset(f"parquet:{tmp_path / 'bad.parquet'}")
