"""Sets larger than memory (issue 22 part 1): a stored set (images a memmap of images.npy, read in chunks) gives
what the in-memory path gives — protected images, manifests, digests, verification, sealing and trained
parameters — and the loaders build the store chunk by chunk with the images of today's loaders."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_dataset
from uge.data import ImageDataset, load_dataset
from uge.data import store as store_mod
from uge.data.store import StoreWriter, open_images, open_store, save_store
from uge.errors import ConfigError, DataError
from uge.protectors import build_protector
from uge.protectors.base import in_memory_limit
from uge.published import array_sha256, publish, read_published, unseal, verify
from uge.sealing import binding, keygen, unseal_images
from uge.training import Recipe, accuracy, train

N, SIZE = 2500, 8  # 192 bytes per RGB image: chunks of 1,000 images make three chunks


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 1000 * SIZE * SIZE * 3)


@pytest.fixture
def pair(tmp_path, small_chunks):
    data = random_dataset(n=N, size=SIZE, channels=3, num_classes=4)
    save_store(data, tmp_path / "store")
    stored = open_store(tmp_path / "store")
    assert stored.stored and isinstance(stored.images, np.memmap)
    return data, stored


def test_store_bytes_are_np_save_and_chunks_read_lazily(tmp_path, pair):
    data, stored = pair
    np.save(tmp_path / "ref.npy", data.images)
    assert (tmp_path / "ref.npy").read_bytes() == (tmp_path / "store" / "images.npy").read_bytes()
    assert [len(c) for _, c in stored.chunks()] == [1000, 1000, 500]
    assert all(not isinstance(c, np.memmap) for _, c in stored.chunks())
    idx = np.array([5, 6, 7, 2400, 0, 0, 1999])
    assert np.array_equal(stored.take(idx), data.images[idx])
    images, labels = stored.batch_source("cpu")
    assert torch.equal(images[torch.from_numpy(idx)], data.tensors("cpu")[0][idx])
    assert array_sha256(stored.images) == array_sha256(data.images)
    assert np.array_equal(stored.subset(idx).images, data.subset(idx).images)


@pytest.mark.parametrize("method,params", [
    ("patch", {"size": 4, "shift": True}), ("patch", {"size": 4, "block": 2, "signs": True}), ("cuda", {}),
    ("jpeg-patch", {"size": 8, "signs": True, "block_signs": True, "flips": True}),
    ("jpeg-patch", {"size": 8, "block_signs": True, "share": 0.75, "matched": True}),
    ("smooth", {"size": SIZE, "fmax": 2, "sharpness": 2.0, "matched": True})])
def test_per_sample_protectors_stream_the_same_images(tmp_path, pair, method, params):
    data, stored = pair
    mem = build_protector(method, **params).protect(data, device="cpu", seed=3, progress=False)
    st = build_protector(method, **params).protect(stored, device="cpu", seed=3, progress=False, work_dir=tmp_path)
    assert st.protected.stored and np.array_equal(st.protected.in_memory().images, mem.protected.images)


@pytest.mark.parametrize("method", ["random", "cuda"])  # norm-bounded (budget) and not (similarity)
def test_stored_protect_publish_verify_seal_match_in_memory(tmp_path, pair, method):
    data, stored = pair
    params = {}
    key = keygen(tmp_path / "key")
    mem = build_protector(method, **params).protect(data, device="cpu", seed=3, progress=False)
    st = build_protector(method, **params).protect(stored, device="cpu", seed=3, progress=False,
                                                   work_dir=tmp_path / "work")
    assert st.protected.stored and np.array_equal(st.protected.in_memory().images, mem.protected.images)
    formats = ("npy", "npz", "png") if method == "random" else ("npy", "npz")
    publish(mem, data, tmp_path / "mem", formats=formats, seal_key=key)
    publish(st, stored, tmp_path / "st", formats=formats, seal_key=key)
    m1, m2 = (json.loads((tmp_path / p / "manifest.json").read_text()) for p in ("mem", "st"))
    for k in ("created", "sealed", "seconds"):
        m1.pop(k), m2.pop(k)
    assert m1 == m2  # digests, similarity, labels: the same numbers
    assert (tmp_path / "mem/images.npy").read_bytes() == (tmp_path / "st/images.npy").read_bytes()
    for original in (data, stored):  # verified against in-memory and stored originals alike
        for pub in ("mem", "st"):
            report = verify(tmp_path / pub, original)
            assert report.ok, [c for c in report.checks if not c.passed]
            assert {"npy = npz", "budget" if mem.rho else "similarity"} <= {c.name for c in report.checks}
    # the streamed residual opens with the in-memory unsealing too, and unsealing streams back the originals
    m = json.loads((tmp_path / "st/manifest.json").read_text())
    restored = unseal_images(mem.protected.images, (tmp_path / "st/sealed/residual.bin").read_bytes(), m["sealed"], key,
                             bind=binding(array_sha256(mem.protected.images), m["labels_sha256"], m["original_sha256"]))
    assert np.array_equal(restored, data.images)
    info = unseal(tmp_path / "st", key, tmp_path / "un")
    back = load_dataset(tmp_path / "un", stream=True)
    assert back.stored and np.array_equal(back.in_memory().images, data.images)
    assert info["original_sha256"] == array_sha256(data.images)


def test_tampered_stored_residual_fails_in_one_line(tmp_path, pair):
    data, stored = pair
    key = keygen(tmp_path / "key")
    st = build_protector("random").protect(stored, device="cpu", seed=0, work_dir=tmp_path / "work")
    publish(st, stored, tmp_path / "st", formats=("npy",), seal_key=key)
    from conftest import rehash
    f = tmp_path / "st/sealed/residual.bin"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 1
    f.write_bytes(bytes(raw))
    m = json.loads((tmp_path / "st/manifest.json").read_text())
    m["sealed"]["sha256"] = __import__("hashlib").sha256(bytes(raw)).hexdigest()
    (tmp_path / "st/manifest.json").write_text(json.dumps(m))
    rehash(tmp_path / "st")
    from uge.sealing import SealError
    with pytest.raises(SealError, match="fails authentication") as e:
        unseal(tmp_path / "st", key, tmp_path / "un")
    assert "\n" not in str(e.value) and not (tmp_path / "un").exists()


def test_keyed_streams(tmp_path, pair):
    data, stored = pair
    params = {"arch": "lenet", "size": 8, "block": 2, "recipe": {"epochs": 1}}
    mem = build_protector("keyed", **params).protect(data, device="cpu", seed=1, progress=False)
    st = build_protector("keyed", **params).protect(stored, device="cpu", seed=1, progress=False, work_dir=tmp_path)
    assert np.array_equal(st.protected.in_memory().images, mem.protected.images)


def test_training_on_a_store_gives_the_same_parameters(pair):
    data, stored = pair
    from uge.models import create_model

    recipe = Recipe(epochs=1, batch_size=64, lr=0.05)
    nets = [train(create_model("lenet", 4, 3, seed=0), d, recipe, device="cpu", seed=2, progress=False)
            for d in (data, stored)]
    for (k, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), k
    assert accuracy(nets[0], data) == pytest.approx(accuracy(nets[1], stored), abs=1e-4)


def _tree(root, rng):
    for split in ("train", "test"):
        for c in ("cat", "dog", "emu"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(6):
                a = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
                Image.fromarray(a[..., 0] if i == 2 else a).save(d / f"{i:02d}.png")


def test_loaders_build_the_store_in_chunks_with_the_same_images(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 4 * 9 * 11 * 3)  # chunks of 4 images
    _tree(tmp_path / "tree", np.random.default_rng(0))
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "tree", arcname="tree")
    for src in (tmp_path / "tree", tmp_path / "tree.tar.gz"):
        for split in ("train", "test"):
            today = load_dataset(src, split, cache_dir=tmp_path / "c1")
            stored = load_dataset(src, split, cache_dir=tmp_path / "c2", stream=True)
            assert stored.stored
            assert np.array_equal(stored.in_memory().images, today.images)
            assert np.array_equal(stored.labels, today.labels) and stored.classes == today.classes
            again = load_dataset(src, split, cache_dir=tmp_path / "c2", stream=True)  # from the cache
            assert again.images.filename == stored.images.filename


def test_gray_folder_stores_one_channel(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 2 * 64)
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "g" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "g" / c / f"{i}.png")
    today = load_dataset(tmp_path / "g", cache_dir=tmp_path / "c1")
    stored = load_dataset(tmp_path / "g", cache_dir=tmp_path / "c2", stream=True)
    assert stored.images.shape == today.images.shape == (6, 8, 8, 1)
    assert np.array_equal(stored.in_memory().images, today.images)


def test_corrupt_or_truncated_store_is_one_line(tmp_path, pair):
    data, _ = pair
    f = tmp_path / "store" / "images.npy"
    raw = f.read_bytes()
    cases = {"truncated": raw[:-100], "appended": raw + b"\0" * 7, "header": b"\x93NUMPX" + raw[6:],
             "empty": b""}
    for name, content in cases.items():
        f.write_bytes(content)
        with pytest.raises(DataError) as e:
            load_dataset(tmp_path / "store", stream=True)
        assert "\n" not in str(e.value) and "images.npy" in str(e.value), name
    with pytest.raises(DataError, match="uint8"):
        np.save(f, np.zeros((4, 8, 8, 3), np.float32))
        open_images(f)


def test_published_npy_truncated_is_one_line(tmp_path, pair):
    data, stored = pair
    st = build_protector("random").protect(stored, device="cpu", seed=0, work_dir=tmp_path)
    publish(st, stored, tmp_path / "pub", formats=("npy",))
    assert json.loads((tmp_path / "pub/manifest.json").read_text())["format_version"] == 3
    f = tmp_path / "pub/images.npy"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataError) as e:
        read_published(tmp_path / "pub", stream=True)
    assert "\n" not in str(e.value) and "truncated" in str(e.value)
    assert not verify(tmp_path / "pub").ok  # the file hash fails first


def test_old_formats_keep_version_2(tmp_path, pair):
    data, _ = pair
    r = build_protector("random").protect(data, device="cpu", seed=0)
    publish(r, data, tmp_path / "old", formats=("npz",))
    assert json.loads((tmp_path / "old/manifest.json").read_text())["format_version"] == 2
    assert verify(tmp_path / "old", data).ok


def test_whole_set_protectors_refuse_a_store_over_the_limit(pair):
    _, stored = pair
    em = build_protector("em")
    with pytest.raises(ConfigError) as e:
        in_memory_limit(em, stored, limit_bytes=1000)
    assert "\n" not in str(e.value) and "chunk by chunk" in str(e.value)
    small = in_memory_limit(em, stored, limit_bytes=10**9)
    assert not small.stored and isinstance(small, ImageDataset)
    assert in_memory_limit(build_protector("random"), stored, 1000) is stored


def test_store_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "x.npy", (3, 8, 8, 3)) as w:
            w.write(0, np.zeros((1, 8, 8, 3), np.uint8))
            raise RuntimeError
    assert not list(tmp_path.iterdir())


def test_cli_protect_stream_verify_train(tmp_path, pair):
    from uge.cli import main

    save = tmp_path / "store"
    out = tmp_path / "pub"
    assert main(["protect", "--data", str(save), "--method", "patch", "--param", "size=4", "--stream",
                 "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checksums.sha256", "images.npy", "labels.npy", "manifest.json"]
    assert not (tmp_path / ".pub.work" / "protected.npy").exists()
    assert main(["verify", str(out), "--original-data", str(save), "--stream"]) == 0
    assert main(["train", "--data", str(out), "--stream", "--arch", "lenet", "--epochs", "1", "--test-data",
                 str(save), "--quiet"]) == 0
