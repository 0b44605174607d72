"""Issue 21: the one-line errors a new user meets say what to do: keyed protection on grayscale data, a missing
or bad key file (the data owner's, or a key holder's), the wrong key, protecting a published set."""
from __future__ import annotations

import contextlib
import io

import pytest

from conftest import random_dataset
from uge.cli import main
from uge.data import save_npz


def run(argv: list[str]) -> tuple[int, str, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue().strip().splitlines()


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """A small set published sealed with a fresh key: (folder, key file, the originals' npz)."""
    where = tmp_path_factory.mktemp("sealed")
    src = save_npz(random_dataset(n=20, size=8, channels=3, num_classes=4), where / "rgb.npz")
    assert run(["keygen", str(where / "owner.key")])[0] == 0
    assert run(["protect", "--data", str(src), "--method", "random", "--seal", str(where / "owner.key"),
                "--out", str(where / "pub"), "--format", "npz,png", "--quiet", "--device", "cpu"])[0] == 0
    return where / "pub", where / "owner.key", src


def test_keyed_on_grayscale_says_which_method_to_use(tmp_path):
    rc, _, err = run(["protect", "--data", "digits", "--per-class", "2", "--method", "keyed", "--out",
                      str(tmp_path / "k"), "--quiet", "--device", "cpu"])
    assert rc == 2 and len(err) == 1 and "needs RGB images" in err[0] and "--method patch" in err[0]


@pytest.mark.parametrize("content", [None, b"not a key\n"], ids=["missing", "bad"])
def test_protect_seal_with_a_missing_or_bad_key_says_how_to_make_one(content, tmp_path):
    key = tmp_path / "k.key"
    if content is not None:
        key.write_bytes(content)
    rc, out, err = run(["protect", "--data", "digits", "--method", "random", "--seal", str(key),
                        "--out", str(tmp_path / "pub"), "--quiet"])
    assert rc == 2 and out == "" and len(err) == 1 and "uge keygen KEYFILE" in err[0]
    assert not (tmp_path / "pub").exists()


@pytest.mark.parametrize("content", [None, b"uge-key-v1:short\n"], ids=["missing", "bad"])
@pytest.mark.parametrize("command", ["unseal", "evaluate"])
def test_a_key_holder_with_a_missing_or_bad_key_is_sent_to_the_data_owner(command, content, sealed, tmp_path):
    pub, _, _ = sealed
    key = tmp_path / "k.key"
    if content is not None:
        key.write_bytes(content)
    tail = ["--out", str(tmp_path / "out")] + (["--quiet"] if command == "evaluate" else [])
    rc, out, err = run([command, str(pub), "--key", str(key), *tail])
    assert rc == 2 and len(err) == 1 and "data owner" in err[0] and str(key) in err[0]
    assert "not found" in err[0] if content is None else "not a uge key file" in err[0]
    assert "make one" not in err[0]  # a new key cannot open the set
    assert not (tmp_path / "out").exists()


def test_the_wrong_key_names_the_sets_key_id(sealed, tmp_path):
    pub, _, _ = sealed
    assert run(["keygen", str(tmp_path / "other.key")])[0] == 0
    rc, _, err = run(["unseal", str(pub), "--key", str(tmp_path / "other.key"), "--out", str(tmp_path / "out")])
    assert rc == 1 and len(err) == 1 and "not this set's key" in err[0] and "key id" in err[0]


@pytest.mark.parametrize("inside", ["", "data.npz", "images"])
def test_protecting_a_published_set_or_a_file_of_one_is_a_one_line_error(inside, sealed, tmp_path):
    pub, _, _ = sealed
    data = pub / inside if inside else pub
    rc, out, err = run(["protect", "--data", str(data), "--method", "random", "--out", str(tmp_path / "again"),
                        "--quiet", "--device", "cpu"])
    assert rc == 2 and out == "" and len(err) == 1 and "published set" in err[0] and "uge unseal" in err[0]
    assert not (tmp_path / "again").exists()


def test_the_originals_beside_a_published_set_are_not_refused(sealed, tmp_path):
    _, _, src = sealed  # rgb.npz lies beside pub/, not inside it
    assert run(["protect", "--data", str(src), "--method", "random", "--out", str(tmp_path / "p"), "--format", "npz",
                "--quiet", "--device", "cpu"])[0] == 0
