"""Sealed publication (uge.sealing): keys, the encrypted residual, unsealing bit for bit, and every way it must fail.

Every protector runs with tiny parameters on 40 digits (and on 40 8x8 RGB images), a second or two each.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import random_dataset, rehash

from uge.cli import main
from uge.data import load_dataset
from uge.errors import ConfigError, UGEError
from uge.protectors import build_protector, list_protectors
from uge.published import (
    array_sha256,
    open_sealed,
    publish,
    read_manifest,
    read_published,
    source_record,
    unseal,
    verify,
)
from uge.sealing import KEY_PREFIX, RESIDUAL_FILE, SealError, binding, key_id, keygen, load_key, seal, unseal_images

RECIPE = {"epochs": 1, "batch_size": 32, "lr": 0.05, "flip": False}
UGE_TINY = {"authorized": ["cnn:0"], "recipe": RECIPE, "trajectory_epochs": 1, "generator_epochs": 1,
            "generator_width": 4, "generator_batch_size": 32, "encoder_arch": "lenet",
            "encoder_recipe": {"epochs": 1, "batch_size": 32, "flip": False}}
TINY = {  # every registered protector, each a second or two on 40 tiny images
    "uge": UGE_TINY,
    "fd": UGE_TINY,
    "random": {},
    "patch": {"size": 4},
    "jpeg-patch": {"size": 8},
    "smooth": {"size": 8},
    "grating": {},
    "em": {"arch": "lenet", "train_steps": 1, "pgd_steps": 1, "max_rounds": 1, "batch_size": 32},
    "rem": {"arch": "lenet", "train_steps": 1, "pgd_steps": 1, "max_rounds": 1, "batch_size": 32, "adv_steps": 1},
    "tap": {"arch": "lenet", "epochs": 1, "steps": 1, "batch_size": 32},
    "cuda": {},
    "keyed": {"arch": "lenet", "size": 8, "block": 2, "recipe": {"epochs": 1}},
    "ntga": {"block_size": 16, "held_out": 32, "steps": 2},
}
RGB_ONLY = {"keyed"}


@pytest.fixture(scope="module")
def digits40():
    return load_dataset("digits", per_class=4)


@pytest.fixture(scope="module")
def rgb40():
    return random_dataset(n=40, size=8, channels=3, num_classes=4, seed=0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {name: (d / f"{name}.key", keygen(d / f"{name}.key")) for name in ("a", "b")}


@pytest.fixture(scope="module")
def sealed_set(digits40, keys, tmp_path_factory):
    """A set sealed with key a (random noise on 40 digits, npz + png), read-only: copy it before tampering."""
    result = build_protector("random").protect(digits40, device="cpu", progress=False, seed=0)
    out = tmp_path_factory.mktemp("sealed") / "set"
    return publish(result, digits40, out, formats=("npz", "png"), seal_key=keys["a"][1],
                   source=source_record("digits", "train", 4, 0))


@pytest.fixture
def scratch(sealed_set, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(sealed_set, dst)
    return dst


def _nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder left


def _set_manifest(path: Path, **sealed_fields):
    m = json.loads((path / "manifest.json").read_text())
    m["sealed"].update(sealed_fields)
    (path / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    rehash(path)


def _reseal_residual(path: Path, data: bytes):
    """Replace the residual and fix the manifest's hash, size and every checksum: only the cryptography can tell."""
    (path / RESIDUAL_FILE).write_bytes(data)
    _set_manifest(path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


# ---------------------------------------------------------------------------------------- keys


def test_keygen_writes_a_0600_key_file_and_never_overwrites(tmp_path):
    f = tmp_path / "k.key"
    key = keygen(f)
    assert len(key) == 32 and stat.S_IMODE(f.stat().st_mode) == 0o600
    text = f.read_text()
    assert text.startswith(KEY_PREFIX) and text.endswith("\n") and text.count("\n") == 1
    assert load_key(f) == key
    with pytest.raises(ConfigError, match="already exists"):
        keygen(f)
    assert load_key(f) == key  # untouched
    assert keygen(tmp_path / "other.key") != key


def test_load_key_errors_say_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match=r"not found.*uge keygen KEYFILE"):
        load_key(tmp_path / "missing.key")
    for name, content in (("short", KEY_PREFIX + base64.urlsafe_b64encode(b"x" * 16).decode()),
                          ("raw", os.urandom(32)), ("garbage", b"uge-key-v1:!!!notbase64!!!"), ("empty", b"")):
        f = tmp_path / name
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ConfigError, match="not a uge key file") as e:
            load_key(f)
        assert "\n" not in str(e.value) and "uge keygen KEYFILE" in str(e.value)


def test_key_id_is_stable_per_key_and_reveals_nothing():
    k1, k2 = os.urandom(32), os.urandom(32)
    assert key_id(k1) == key_id(k1) != key_id(k2)
    assert len(key_id(k1)) == 32 and int(key_id(k1), 16) >= 0
    assert key_id(k1) not in (k1.hex(), hashlib.sha256(k1).hexdigest()[:32])


# ------------------------------------------------------------------------------------ round trip


def _cases():
    return [(name, data) for name in list_protectors() for data in ("digits", "rgb")
            if not (name in RGB_ONLY and data == "digits")]


@pytest.mark.parametrize("name,which", _cases())
def test_every_protector_unseals_bit_for_bit(name, which, digits40, rgb40, keys, tmp_path):
    if name not in TINY:
        pytest.fail(f"protector {name!r} has no tiny parameters in tests/test_sealing.py's TINY")
    data = digits40 if which == "digits" else rgb40
    result = build_protector(name, **TINY[name]).protect(data, device="cpu", progress=False, seed=0)
    assert not np.array_equal(result.protected.images, data.images)
    pub = publish(result, data, tmp_path / "pub", seal_key=keys["a"][1])
    m = read_manifest(pub)
    assert set(m["sealed"]) == {"cipher", "compression", "nonce", "key_id", "file", "sha256", "bytes", "shape", "dtype"}
    assert verify(pub, data).ok
    info = unseal(pub, keys["a"][1], tmp_path / "orig")
    back = load_dataset(tmp_path / "orig")  # what --data DIR reads
    assert back.images.dtype == np.uint8 and np.array_equal(back.images, data.images)
    assert np.array_equal(back.labels, data.labels) and back.classes == data.classes
    assert info["original_sha256"] == m["original_sha256"] == array_sha256(back.images)
    assert info["key_id"] == key_id(keys["a"][1]) and info["num_samples"] == len(data)


def test_manifest_sealed_entry_and_unsealed_json(sealed_set, keys, digits40, tmp_path):
    m = read_manifest(sealed_set)
    s = m["sealed"]
    assert s["cipher"] == "AES-256-GCM" and s["compression"] == "zlib" and s["dtype"] == "int16"
    assert s["file"] == RESIDUAL_FILE and s["shape"] == [40, 8, 8, 1] and len(bytes.fromhex(s["nonce"])) == 12
    f = sealed_set / RESIDUAL_FILE
    assert s["bytes"] == f.stat().st_size and s["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert s["key_id"] == key_id(keys["a"][1])
    listed = {line.split("  ", 1)[1] for line in (sealed_set / "checksums.sha256").read_text().splitlines()}
    assert RESIDUAL_FILE in listed
    unseal(sealed_set, keys["a"][1], tmp_path / "orig")
    assert sorted(p.name for p in (tmp_path / "orig").iterdir()) == ["data.npz", "unsealed.json"]
    u = json.loads((tmp_path / "orig/unsealed.json").read_text())
    assert u["format"] == "uge-unsealed" and u["key_id"] == s["key_id"]
    assert u["original_sha256"] == m["original_sha256"] == array_sha256(digits40.images)
    assert u["published_checksums_sha256"] == hashlib.sha256((sealed_set / "checksums.sha256").read_bytes()).hexdigest()
    assert Path(u["published"]) == sealed_set.resolve()


def test_two_seals_of_one_set_use_fresh_nonces(digits40, keys):
    prot = digits40.images ^ 1
    bind = binding(array_sha256(prot), array_sha256(digits40.labels), array_sha256(digits40.images))
    (c1, m1), (c2, m2) = (seal(digits40.images, prot, keys["a"][1], bind=bind) for _ in range(2))
    assert m1["nonce"] != m2["nonce"] and c1 != c2
    for c, m in ((c1, m1), (c2, m2)):
        assert np.array_equal(unseal_images(prot, c, m, keys["a"][1], bind=bind), digits40.images)


def test_a_set_published_without_a_key_is_not_sealed(digits40, keys, tmp_path):
    result = build_protector("random").protect(digits40, device="cpu", progress=False, seed=0)
    pub = publish(result, digits40, tmp_path / "plain")
    assert read_manifest(pub)["sealed"] is None and not (pub / "sealed").exists()
    assert "sealed residual" not in {c.name for c in verify(pub).checks}
    with pytest.raises(SealError, match="not sealed"):
        unseal(pub, keys["a"][1], tmp_path / "out")
    _nothing_written(tmp_path / "out")


def test_no_key_material_in_any_published_file(sealed_set, keys):
    path, key = keys["a"]
    needles = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
               base64.urlsafe_b64encode(key), base64.b64encode(key).rstrip(b"="),
               base64.urlsafe_b64encode(key).rstrip(b"="), path.read_bytes().strip()]
    files = [p for p in sealed_set.rglob("*") if p.is_file()]
    assert any(p.name == "residual.bin" for p in files)
    for f in files:
        blob = f.read_bytes()
        for needle in needles:
            assert needle not in blob, f"key material in {f}"


# ------------------------------------------------------------------------------------ verify


def test_verify_checks_the_sealed_residual_without_a_key(sealed_set, scratch, digits40):
    ok = {c.name: c for c in verify(sealed_set).checks}
    assert ok["sealed residual"].passed and "AES-256-GCM" in ok["sealed residual"].detail
    assert verify(sealed_set, digits40).ok
    res = scratch / RESIDUAL_FILE
    blob = bytearray(res.read_bytes())
    blob[10] ^= 0xFF
    res.write_bytes(bytes(blob))
    failed = {c.name for c in verify(scratch).checks if not c.passed}
    assert {"file hashes", "sealed residual"} <= failed
    rehash(scratch)  # a forger who rewrites checksums.sha256 still fails the manifest's residual hash
    failed = {c.name for c in verify(scratch).checks if not c.passed}
    assert failed == {"sealed residual"}


# --------------------------------------------------------------------------------- failures


def test_wrong_key_fails_and_writes_nothing(sealed_set, keys, tmp_path):
    with pytest.raises(SealError, match="not this set's key") as e:
        unseal(sealed_set, keys["b"][1], tmp_path / "out")
    assert "\n" not in str(e.value) and e.value.exit_code == 1
    _nothing_written(tmp_path / "out")


def test_tampered_residual_fails_authentication(scratch, keys, tmp_path):
    blob = bytearray((scratch / RESIDUAL_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    _reseal_residual(scratch, bytes(blob))
    assert verify(scratch).ok  # hashes all agree: only the cryptography catches it
    with pytest.raises(SealError, match="fails authentication"):
        unseal(scratch, keys["a"][1], tmp_path / "out")
    _nothing_written(tmp_path / "out")


def test_truncated_residual_fails(scratch, keys, tmp_path):
    blob = (scratch / RESIDUAL_FILE).read_bytes()
    (scratch / RESIDUAL_FILE).write_bytes(blob[:-20])
    with pytest.raises(SealError, match="fails verification.*sealed/residual.bin"):
        unseal(scratch, keys["a"][1], tmp_path / "out")
    _nothing_written(tmp_path / "out")
    _reseal_residual(scratch, blob[:-20])  # with every hash fixed up
    with pytest.raises(SealError, match="fails authentication"):
        unseal(scratch, keys["a"][1], tmp_path / "out")
    _nothing_written(tmp_path / "out")


def test_tampered_nonce_fails_authentication(scratch, keys, tmp_path):
    nonce = bytearray(bytes.fromhex(read_manifest(scratch)["sealed"]["nonce"]))
    nonce[0] ^= 1
    _set_manifest(scratch, nonce=nonce.hex())
    with pytest.raises(SealError, match="fails authentication"):
        unseal(scratch, keys["a"][1], tmp_path / "out")
    _nothing_written(tmp_path / "out")


def test_another_sets_key_and_residual_fail(sealed_set, scratch, digits40, keys, tmp_path):
    # another set, sealed with key b: key a's set cannot be opened with it, nor can its residual serve set a
    other = build_protector("random", rho=4 / 255).protect(digits40, device="cpu", progress=False, seed=1)
    pub_b = publish(other, digits40, tmp_path / "b", seal_key=keys["b"][1])
    with pytest.raises(SealError, match="not this set's key"):
        unseal(sealed_set, keys["b"][1], tmp_path / "out")
    _nothing_written(tmp_path / "out")
    # the same key, another set's residual: moved in with its manifest entry and every hash fixed up
    pub_c = publish(other, digits40, tmp_path / "c", seal_key=keys["a"][1])
    (scratch / RESIDUAL_FILE).write_bytes((pub_c / RESIDUAL_FILE).read_bytes())
    m = json.loads((scratch / "manifest.json").read_text())
    m["sealed"] = read_manifest(pub_c)["sealed"]
    (scratch / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    rehash(scratch)
    assert verify(scratch).ok
    with pytest.raises(SealError, match="fails authentication"):
        unseal(scratch, keys["a"][1], tmp_path / "out")
    _nothing_written(tmp_path / "out")
    assert unseal(pub_b, keys["b"][1], tmp_path / "ok")["original_sha256"] == array_sha256(digits40.images)


def test_residual_that_decodes_to_the_wrong_size_is_an_error(digits40, keys):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from uge.sealing import _aad

    key, prot = keys["a"][1], digits40.images ^ 1
    bind = binding(array_sha256(prot), array_sha256(digits40.labels), array_sha256(digits40.images))
    ciphertext, meta = seal(digits40.images, prot, key, bind=bind)
    short = AESGCM(key).encrypt(bytes.fromhex(meta["nonce"]), zlib.compress(b"\0" * 100), _aad(bind, prot.shape))
    with pytest.raises(SealError, match="decompresses to 100 bytes"):
        unseal_images(prot, short, meta, key, bind=bind)
    with pytest.raises(SealError, match="shape"):
        unseal_images(prot[:-1], ciphertext, meta, key, bind=bind)
    with pytest.raises(SealError, match="fails authentication"):  # the binding is part of the associated data
        unseal_images(prot, ciphertext, meta, key, bind=bind + "x")


def test_unseal_refuses_an_existing_folder(sealed_set, keys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        unseal(sealed_set, keys["a"][1], out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    unseal(sealed_set, keys["a"][1], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["data.npz", "unsealed.json"]


def test_open_sealed_restores_in_memory(sealed_set, keys, digits40):
    data, info = open_sealed(sealed_set, keys["a"][1])
    assert np.array_equal(data.images, digits40.images) and info["residual_bytes"] > 0
    assert issubclass(SealError, UGEError)


# ------------------------------------------------------------------------------------------ CLI


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_keygen_and_unseal(sealed_set, keys, digits40, tmp_path):
    rc, out, _ = run(["keygen", str(tmp_path / "new.key")])
    assert rc == 0 and "key id" in out and stat.S_IMODE((tmp_path / "new.key").stat().st_mode) == 0o600
    rc, _, err = run(["keygen", str(tmp_path / "new.key")])
    assert rc == 2 and err.startswith("uge: error:") and err.count("\n") == 1

    rc, out, _ = run(["unseal", str(sealed_set), "--key", str(keys["a"][0]), "--out", str(tmp_path / "orig")])
    assert rc == 0 and out.count("\n") == 1
    assert "40 images restored bit for bit" in out and "original_sha256" in out
    assert np.array_equal(load_dataset(str(tmp_path / "orig")).images, digits40.images)

    for key in (tmp_path / "new.key", keys["b"][0]):  # a wrong key: exit 1, one line, nothing written
        rc, out, err = run(["unseal", str(sealed_set), "--key", str(key), "--out", str(tmp_path / "bad")])
        assert rc == 1 and out == "" and err.startswith("uge: error:") and "not this set's key" in err
        assert err.count("\n") == 1
        _nothing_written(tmp_path / "bad")
    rc, _, err = run(["unseal", str(sealed_set), "--key", str(tmp_path / "nokey"), "--out", str(tmp_path / "bad")])
    assert rc == 2 and "data owner" in err  # a key holder's missing key is had from the owner, not made
    _nothing_written(tmp_path / "bad")

    # --data reads the unsealed folder; the default test set is the test split of the set's recorded source
    rc, out, _ = run(["train", "--data", str(tmp_path / "orig"), "--arch", "lenet", "--epochs", "1",
                      "--test-per-class", "5", "--quiet", "--device", "cpu", "--record", str(tmp_path / "rec.json")])
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rc == 0 and rec["test"]["data"] == "digits" and rec["test"]["split"] == "test"


def test_cli_unseal_tampered_exits_1(scratch, keys, tmp_path):
    blob = bytearray((scratch / RESIDUAL_FILE).read_bytes())
    blob[-1] ^= 0x80
    _reseal_residual(scratch, bytes(blob))
    rc, _, err = run(["unseal", str(scratch), "--key", str(keys["a"][0]), "--out", str(tmp_path / "bad")])
    assert rc == 1 and "fails authentication" in err and err.count("\n") == 1
    _nothing_written(tmp_path / "bad")


def test_cli_evaluate_with_key_trains_authorized_networks_on_the_originals(sealed_set, keys, tmp_path):
    recs = tmp_path / "recs"
    argv = ["evaluate", str(sealed_set), "--key", str(keys["a"][0]), "--hackers", "lenet:normal", "--epochs", "1",
            "--test-per-class", "5", "--quiet", "--device", "cpu", "--out", str(recs)]
    rc, out, _ = run(argv)
    assert rc == 0
    assert "bytes per image" in out and "sealed residual" in out
    assert "| cnn (authorized) | normal | seed:0 |" in out and "unsealed acc %" in out and "protected acc %" in out
    files = {f.name: json.loads(f.read_text()) for f in recs.glob("*.json")}
    assert set(files) == {"unsealed_authorized0_cnn.json", "protected_hacker_lenet_normal_s1.json"}
    auth = files["unsealed_authorized0_cnn.json"]
    assert auth["data"] == "unsealed" and auth["init"] == "seed:0" and auth["n_train"] == 40 and auth["n_test"] == 50
    assert files["protected_hacker_lenet_normal_s1.json"]["data"] == "protected"

    rc, _, err = run([*argv[:3], str(keys["b"][0]), *argv[4:]])  # another set's key
    assert rc == 1 and "not this set's key" in err
    rc, _, err = run(["evaluate", str(sealed_set), "--key-archs", "cnn", "--quiet", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--key" in err


@pytest.mark.parametrize("method, extra", [("random", []), ("cuda", []),
                                           ("em", ["--param", "arch=lenet", "--param", "max_rounds=1",
                                                   "--param", "train_steps=1", "--param", "pgd_steps=1"])])
def test_cli_protect_seal_then_unseal_gives_the_originals(method, extra, keys, digits40, tmp_path):
    """`uge protect --seal` works for any method: the published set differs, the unsealed one is the original."""
    pub, orig = tmp_path / "pub", tmp_path / "orig"
    rc, out, _ = run(["protect", "--data", "digits", "--per-class", "4", "--method", method, *extra,
                      "--seal", str(keys["a"][0]), "--out", str(pub), "--format", "npz", "--quiet", "--device", "cpu"])
    assert rc == 0 and "sealed:" in out
    assert read_manifest(pub)["sealed"]["key_id"] == key_id(keys["a"][1])
    assert verify(pub, digits40).ok
    rc, _, _ = run(["unseal", str(pub), "--key", str(keys["a"][0]), "--out", str(orig)])
    restored = load_dataset(str(orig))
    assert rc == 0 and np.array_equal(restored.images, digits40.images)
    assert np.array_equal(restored.labels, digits40.labels)
    assert not np.array_equal(read_published(pub).data.images, digits40.images)


def test_cli_protect_with_a_missing_key_fails_before_any_work(tmp_path):
    rc, out, err = run(["protect", "--data", "digits", "--method", "random", "--seal", str(tmp_path / "none.key"),
                        "--out", str(tmp_path / "pub"), "--quiet"])
    assert rc == 2 and out == "" and err.count("\n") == 1 and "uge keygen KEYFILE" in err
    assert not (tmp_path / "pub").exists()
