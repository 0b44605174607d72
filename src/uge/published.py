"""Write, read and verify a published (protected) data set.

Layout of a published folder::

    manifest.json            config, budget, authorized networks, recipe, versions, hashes
    checksums.sha256         SHA-256 of every other file, the manifest included (``sha256sum -c`` format)
    data.npz                 images (N, H, W, C) uint8, labels, classes      [format "npz"]
    images/<class>/<i>.png   the same images as lossless PNG, i = position   [format "png"]
    images.npy, labels.npy   the images as an uncompressed .npy that loaders memory-map, and the labels
                             [format "npy": a set larger than memory, docs/large-sets.md]
    authorized/theta0_<k>.safetensors   θ0 of authorized network k (or, published apart, only its hash)

The folder is written atomically: it appears under its final name only once complete. A set whose images are a
store (:mod:`uge.data.store`) is written, hashed, verified, sealed and unsealed chunk by chunk, never whole.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .config import FORMATS, Recipe
from .data.dataset import ImageDataset
from .data.loaders import BUILTINS
from .data.store import IMAGES, LABELS, StoreWriter, chunk_rows, npz_chunks, open_images
from .errors import ConfigError, DataError, VerificationError
from . import seeds
from .result import Protection, rho_levels
from .similarity import similarity, similarity_chunks
from .utils import atomic_dir, sha256_file, versions, write_json
from .weights import build_network, save_weights

FORMAT = "uge-published"
FORMAT_VERSION = 3  # 3: may hold images.npy (format "npy"); 2: the manifest is listed in checksums.sha256
# (1: it held the checksums file's hash). A set without "npy" is still written as version 2.
PUBLISH_FORMATS = (*FORMATS, "npy")  # "npy": the images memory-mapped, for sets larger than memory


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (used to pin labels and the original images)."""
    if isinstance(a, np.memmap):  # a store: read in chunks, the same digest
        return chunks_sha256(a.dtype, a.shape, (c for _, c in _array_chunks(a)))
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def chunks_sha256(dtype, shape, chunks) -> str:
    """:func:`array_sha256` of the array of ``dtype`` and ``shape`` whose rows ``chunks`` yields in order."""
    h = hashlib.sha256(f"{np.dtype(dtype).str}{tuple(shape)}".encode())
    for c in chunks:
        h.update(np.ascontiguousarray(c).tobytes())
    return h.hexdigest()


def _array_chunks(a: np.ndarray):
    from .data.store import read_rows

    rows = chunk_rows(a.shape[1:])
    for start in range(0, len(a), rows):
        yield start, read_rows(a, start, start + rows)


def images_sha256(data: ImageDataset) -> str:
    """:func:`array_sha256` of a set's images, chunk by chunk for a stored set."""
    if not isinstance(data.images, np.memmap):
        return array_sha256(data.images)
    return chunks_sha256(np.uint8, data.images.shape, (c for _, c in data.chunks()))


def source_record(data: str, split: str | None = "train", per_class: int | None = None,
                  subset_seed: int | None = 0) -> dict:
    """What identifies the data in a manifest: a built-in name or the file's name, the split and the subset.

    Never the local path: a data owner publishing the set would publish their file system's layout. The
    images themselves are identified by the manifest's ``original_sha256``.
    """
    data = str(data)
    builtin = data in BUILTINS
    return {"name": data if builtin else Path(data).name, "builtin": builtin, "split": split,
            "per_class": per_class, "subset_seed": subset_seed}


def source_location(source: dict) -> str | None:
    """Where a source record's data can be loaded from without asking: its local ``data`` (a record made on
    this machine, or a manifest of format 1), or a built-in name; None for a manifest's file source."""
    return source.get("data") or (source.get("name") if source.get("builtin") else None)


def _png_path(label: int, classes: list[str], index: int) -> str:
    return f"images/{classes[label]}/{index:06d}.png"


def publish(result: Protection, original: ImageDataset, out: str | Path, *, formats=("npz",),
            source: dict | None = None, overwrite: bool = False, theta0_apart: str | Path | None = None,
            seal_key: bytes | None = None) -> Path:
    """Write ``result`` (of UGE or of any protector in :mod:`uge.protectors`) as a published set in ``out``.

    The manifest names the method and its parameters, its budget (``rho``/``rho_levels``, None when not
    norm-bounded) and the PSNR/SSIM of the published images to the originals; baselines have no
    authorized network (``"authorized": []``) and no recipe. Returns the folder's path.

    Args:
        original: the clean set that was protected (its hash is recorded so ``verify`` can find
            the right originals; the originals themselves are not written).
        formats: any of "npz", "png" and "npy" (the images as an uncompressed ``.npy`` that loaders
            memory-map: a set larger than memory).
        source: where the clean data came from (recorded in the manifest for ``verify``/``evaluate``).
        theta0_apart: a folder for the θ0 files instead of the set (for owners who hand θ0 to licensees
            only); the manifest then holds each file's SHA-256, and ``evaluate``/``verify`` take the file.
        seal_key: a 256-bit key (:func:`uge.sealing.load_key`): also write ``sealed/residual.bin``, the
            residual original − published encrypted for the key's holders (``uge unseal``), and describe it
            in the manifest's ``"sealed"`` entry (None for a set published without a key).
    """
    formats = tuple(formats)
    if not formats or set(formats) - set(PUBLISH_FORMATS):
        raise ConfigError(f"formats must be a non-empty subset of {PUBLISH_FORMATS}, got {formats}")
    data = result.protected
    if data.images.shape != original.images.shape:
        raise DataError(f"protected images {data.images.shape} do not match the originals {original.images.shape}")
    streamed = isinstance(data.images, np.memmap) or isinstance(original.images, np.memmap)
    original_sha256 = images_sha256(original)
    sealed = None  # sealed publication (uge.sealing): the encrypted residual, for the key's holders only
    if seal_key is not None and not streamed:
        from .sealing import binding, seal

        residual, sealed = seal(original.images, data.images, seal_key,
                                bind=binding(array_sha256(data.images), array_sha256(data.labels), original_sha256))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if "npy" in formats:  # first: the later passes read the page cache it leaves
            with StoreWriter(tmp / IMAGES, data.images.shape) as w:
                for start, chunk in data.chunks():
                    w.write(start, chunk)
            np.save(tmp / LABELS, np.asarray(data.labels, np.int64))
        if "npz" in formats:
            if streamed:
                _savez_chunks(tmp / "data.npz", data)
            else:
                np.savez(tmp / "data.npz", images=data.images, labels=data.labels, classes=np.array(data.classes))
        if "png" in formats:
            for c in data.classes:
                (tmp / "images" / c).mkdir(parents=True)
            for start, chunk in data.chunks():
                for i, img in enumerate(chunk, start):
                    Image.fromarray(img[..., 0] if data.channels == 1 else img).save(
                        tmp / _png_path(int(data.labels[i]), data.classes, i), compress_level=6)
        if seal_key is not None and streamed:
            from .sealing import RESIDUAL_FILE, binding, seal_stream

            (tmp / RESIDUAL_FILE).parent.mkdir(parents=True)
            with open(tmp / RESIDUAL_FILE, "wb") as f:
                sealed = seal_stream(((o, d) for (_, o), (_, d) in zip(original.chunks(), data.chunks())),
                                     data.images.shape, seal_key, f,
                                     bind=binding(images_sha256(data), array_sha256(data.labels), original_sha256))
        authorized = []
        for k, (spec, state) in enumerate(zip(result.authorized, result.theta0)):
            rel = f"authorized/theta0_{k}.safetensors"
            f = Path(theta0_apart) / f"{Path(out).name}-theta0_{k}.safetensors" if theta0_apart else tmp / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            save_weights(f, state, metadata={"arch": spec.arch})
            authorized.append({"arch": spec.arch, "seed": None if theta0_apart else spec.seed,
                               "theta0": None if theta0_apart else rel, "theta0_sha256": sha256_file(f),
                               "num_classes": data.num_classes, "in_channels": data.channels})
        if sealed and not streamed:  # before the manifest and the checksums, which cover it
            (tmp / sealed["file"]).parent.mkdir(parents=True)
            (tmp / sealed["file"]).write_bytes(residual)
        write_json(tmp / "manifest.json", {
            "format": FORMAT, "format_version": FORMAT_VERSION if "npy" in formats else 2,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": result.method, "method_title": result.title or result.method,
            "formats": list(formats), "num_samples": len(data), "image_shape": list(data.images.shape[1:]),
            "classes": data.classes, "norm_bounded": result.norm_bounded, "rho": result.rho,
            "rho_levels": rho_levels(result.rho) if result.norm_bounded else None,
            "similarity": similarity_chunks((d, o) for (_, d), (_, o) in zip(data.chunks(), original.chunks()))
            if streamed else similarity(data.images, original.images),
            "labels_sha256": array_sha256(data.labels), "original_sha256": original_sha256,
            "source": source or {}, "authorized": authorized, "recipe": result.recipe.to_dict() if result.recipe else None,
            "feature_space": result.feature_space, "params": result.params,
            "seeds": seeds.table(None if result.seed_secret else result.seed),
            "history": result.history,
            "seconds": result.seconds, "versions": versions(),
            "sealed": sealed,
        })
        # Last, over every file the manifest included: an edited budget or θ0 hash fails `verify`.
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / "checksums.sha256").write_text("".join(f"{sha256_file(tmp / f)}  {f}\n" for f in files))
    return Path(out)


def _savez_chunks(path: Path, data: ImageDataset) -> None:
    """``np.savez(path, images=…, labels=…, classes=…)`` of a stored set, its images written chunk by chunk."""
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("images.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": tuple(data.images.shape)})
            for _, chunk in data.chunks():
                f.write(np.ascontiguousarray(chunk).data)
        for name, a in (("labels", data.labels), ("classes", np.array(data.classes))):
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


@dataclass
class Published:
    """A published set read back from disk."""

    path: Path
    manifest: dict
    data: ImageDataset

    @property
    def recipe(self) -> Recipe:
        """The authorized training recipe; the default :class:`Recipe` for sets without one (baselines)."""
        recipe = self.manifest.get("recipe")
        return Recipe.from_dict(recipe) if recipe else Recipe()

    def authorized_network(self, k: int = 0, theta0: str | Path | None = None):
        """Authorized network k at its published θ0, or at ``theta0`` (a file, checked against the hash the
        manifest records); a θ0 published apart from the set must be given."""
        return authorized_network(self.path, self.manifest, k, theta0)


def given_theta0(files: list | None, k: int):
    """The θ0 file given for authorized network k (files in the manifest's order), or None."""
    return files[k] if files and k < len(files) else None


def authorized_network(path: Path, manifest: dict, k: int, theta0: str | Path | None = None):
    """Authorized network k of the set in ``path`` (see :meth:`Published.authorized_network`)."""
    a = manifest["authorized"][k]
    if theta0 is None and not a.get("theta0"):
        raise ConfigError(f"θ0 of authorized network {k} ({a['arch']}) was published apart from the set; "
                          "pass its file (--theta0 FILE)")
    f = Path(theta0) if theta0 is not None else path / a["theta0"]
    if theta0 is not None and a.get("theta0_sha256") and f.is_file() and sha256_file(f) != a["theta0_sha256"]:
        raise ConfigError(f"{f} is not the θ0 of authorized network {k}: its SHA-256 differs from the manifest's")
    return build_network(a["arch"], a["num_classes"], a["in_channels"], weights=f)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / "manifest.json"
    if not path.is_dir():
        raise DataError(f"published set not found: {path}")
    if not f.is_file():
        raise DataError(f"{path} is not a complete published set: manifest.json is missing")
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{f} is not a uge published-set manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer uge (format {manifest['format_version']})")
    return manifest


def _read_png_tree(path: Path, manifest: dict, labels: np.ndarray, start: int = 0) -> np.ndarray:
    """The PNG images of ``labels`` (the labels of images start, start + 1, …)."""
    h, w, c = manifest["image_shape"]
    images = np.empty((len(labels), h, w, c), np.uint8)
    for i, y in enumerate(labels):
        f = path / _png_path(int(y), manifest["classes"], start + i)
        try:
            img = np.asarray(Image.open(f))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {f}: {e}") from None
        img = img.reshape(h, w, -1)
        if img.shape[-1] != c:
            raise DataError(f"{f} has {img.shape[-1]} channels, expected {c}")
        images[i] = img
    return images


def read_published(path: str | Path, prefer: str | None = None, *, stream: bool = False) -> Published:
    """Load a published set: from ``images.npy`` if present, else ``data.npz``, else the PNG tree (``prefer``:
    that format when the set has it). ``stream``: ``images.npy``'s images stay a memmap, read on demand (a set
    larger than memory); otherwise they are read into memory."""
    path = Path(path)
    manifest = read_manifest(path)
    formats = manifest["formats"]
    fmt = prefer if prefer in formats else next(f for f in ("npy", "npz", "png", *formats) if f in formats)
    if fmt == "npy":
        images = open_images(path / IMAGES)
        try:
            labels = np.load(path / LABELS, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 — missing, truncated, not an array
            raise DataError(f"cannot read {path / LABELS}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        data = ImageDataset(images, labels, manifest["classes"])
        if not stream:
            data = data.in_memory()
    elif fmt == "npz":
        try:
            with np.load(path / "data.npz", allow_pickle=False) as z:
                data = ImageDataset(z["images"], z["labels"], list(z["classes"]))
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"cannot read {path / 'data.npz'}: {e}") from None
    else:
        labels = _labels_from_png_tree(path, manifest)
        data = ImageDataset(_read_png_tree(path, manifest, labels), labels, manifest["classes"])
    return Published(path, manifest, data)


def _labels_from_png_tree(path: Path, manifest: dict) -> np.ndarray:
    labels = np.full(manifest["num_samples"], -1, np.int64)
    for y, c in enumerate(manifest["classes"]):
        for f in (path / "images" / c).glob("*.png"):
            if f.stem.isdigit() and int(f.stem) < len(labels):  # other files are reported by verify's file check
                labels[int(f.stem)] = y
    if (labels < 0).any():
        raise DataError(f"{path / 'images'}: image {int(np.argmax(labels < 0))} is missing")
    return labels


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`: one :class:`Check` per property."""

    checks: list[Check] = field(default_factory=list)
    linf: float | None = None  # measured L∞ distance to the originals on the [0, 1] scale
    similarity: dict | None = None  # measured PSNR / SSIM of sets that are not norm-bounded

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(passed), detail))
        return bool(passed)

    def raise_if_failed(self):
        if not self.ok:
            failed = "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)
            raise VerificationError(f"verification failed: {failed}")


def input_stage_difference(net, images: np.ndarray, original: np.ndarray, chunk: int = 4096) -> float:
    """The largest |stage(x_u) − stage(x)| over all pixels of two uint8 (N, H, W, C) sets, on the [0, 1] scale.

    The input stage is linear (x minus its components along ``net.blind``), so this is the largest part of
    x_u − x outside the blind directions, computed in float64 without touching the network."""
    u = net.blind.detach().cpu().double().numpy()  # (k, C) orthonormal rows
    worst = 0.0
    for i in range(0, len(images), chunk):
        d = (images[i:i + chunk].astype(np.float64) - original[i:i + chunk]) / 255
        worst = max(worst, float(np.abs(d - (d @ u.T) @ u).max(initial=0.0)))
    return worst


def verify(path: str | Path, original: ImageDataset | None = None,
           theta0: list[str | Path] | None = None, rho: float | None = None) -> VerifyReport:
    """Check a published set: file hashes, format agreement, and (given the originals) budget and labels.

    The checksums cover the manifest (format 2), so an edited budget fails the file hashes. ``rho``: the
    budget the user expects (on the [0, 1] scale); the manifest's budget must be that many 8-bit levels
    ("stated budget"), and the images are measured against the smaller of the two.

    Norm-bounded sets must hold ‖published − original‖∞ ≤ ρ on the saved 8-bit files ("budget"); sets that
    are not (CUDA) get a "similarity" check instead: their PSNR and SSIM to the originals, which must equal
    what the manifest reports.

    An authorized network with a blind input stage (keyed protection) also gets an "input stage" check: it
    must map every published image to what it maps the original to, within the 8-bit rounding (half a
    level); the largest difference is reported. ``theta0``: files of θ0s that were published apart.

    Every check is run and reported; nothing is raised for a failed check (see
    :meth:`VerifyReport.raise_if_failed`), only for a folder that is not a published set at all.
    """
    path = Path(path)
    manifest = read_manifest(path)
    report = VerifyReport()

    sums_file = path / "checksums.sha256"
    sums = sums_file.read_text() if sums_file.is_file() else ""
    listed = {}
    for line in sums.splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    if manifest.get("format_version", 1) >= 2:
        report.add("manifest", "manifest.json" in listed, "manifest.json is covered by checksums.sha256" if
                   "manifest.json" in listed else "checksums.sha256 does not cover manifest.json")
    else:  # format 1: the manifest held the checksums file's hash and nothing covered the manifest
        report.add("checksums file", hashlib.sha256(sums.encode()).hexdigest() == manifest.get("checksums_sha256"),
                   "checksums.sha256 matches the manifest (format 1: the manifest itself is not covered)"
                   if sums else "checksums.sha256 is missing")
    bad = [n for n, d in listed.items() if not (path / n).is_file() or sha256_file(path / n) != d]
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    extra = sorted(present - set(listed) - {"manifest.json", "checksums.sha256"})
    report.add("file hashes", not bad and bool(listed),
               f"{len(listed)} files match" if not bad else f"{len(bad)} file(s) changed or missing, "
               f"first: {bad[0]}")
    report.add("no extra files", not extra, "none" if not extra else f"unexpected file(s), first: {extra[0]}")
    sealed = manifest.get("sealed")
    if sealed:  # no key needed: the encrypted residual is the file the manifest describes
        f = path / "sealed/residual.bin"  # the one place a residual is read from, whatever the manifest says
        ok = sealed.get("file") == "sealed/residual.bin" and f.is_file() and sha256_file(f) == sealed.get("sha256")
        report.add("sealed residual", ok, f"{sealed.get('file')} ({sealed.get('bytes')} bytes, {sealed.get('cipher')}, "
                   f"key id {sealed.get('key_id')}) matches the manifest's SHA-256" if ok else
                   f"{sealed.get('file')} is missing or its SHA-256 differs from the manifest's")
    if bad:
        return report  # decoding tampered files proves nothing more
    limit = manifest.get("rho_levels")
    if rho is not None:
        expected = rho_levels(rho)
        stated = manifest.get("norm_bounded", True) and limit == expected
        report.add("stated budget", stated,
                   f"the manifest states ρ = {manifest.get('rho')} ({limit} levels), as expected ({expected} levels)"
                   if stated else f"you expect ρ = {rho} ({expected} levels); the manifest states ρ = "
                   f"{manifest.get('rho')} ({limit} levels)" if manifest.get("norm_bounded", True) else
                   f"you expect ρ = {rho}; the set is not norm-bounded")
        limit = expected if limit is None else min(limit, expected)

    pub = read_published(path, stream=True)
    data = pub.data
    first = next(f for f in ("npy", "npz", "png") if f in manifest["formats"])
    for fmt in ("npz", "png"):  # every other format holds what the first one does
        if fmt != first and fmt in manifest["formats"]:
            report.add(f"{first} = {fmt}", _same_images(path, manifest, data, fmt),
                       f"{_FILES[first]} and {_FILES[fmt]} hold the same images and labels")
    report.add("labels", array_sha256(data.labels) == manifest["labels_sha256"] and data.classes == manifest["classes"],
               f"{len(data)} labels and {data.num_classes} classes match the manifest")
    nets = []
    for k, a in enumerate(manifest["authorized"]):
        name = f"θ0 {a.get('theta0') or f'of authorized network {k} (published apart)'}"
        given = given_theta0(theta0, k)
        if not a.get("theta0") and given is None:
            report.add(name, True, "not checked: published apart; pass its file to check it")
            continue
        try:
            nets.append(authorized_network(path, manifest, k, given))
            report.add(name, True, f"loads into {a['arch']}" + (" and matches the manifest's hash" if given else ""))
        except Exception as e:  # noqa: BLE001 — any failure to load is a failed check
            report.add(name, False, str(e))

    if original is None:
        report.add("budget", True, "not checked: pass the original data to check the L∞ budget and the order")
        return report
    if original.images.shape != data.images.shape:
        report.add("originals", False, f"original images are {original.images.shape}, published {data.images.shape}")
        return report
    same = images_sha256(original) == manifest["original_sha256"]
    report.add("originals", same, "the given originals are the ones that were protected" if same else
               "the given originals differ from the ones recorded at protection time")
    report.add("labels unchanged", np.array_equal(original.labels, data.labels) and original.classes == data.classes,
               "labels, classes and order equal the originals")
    streamed = isinstance(data.images, np.memmap) or isinstance(original.images, np.memmap)
    pairs = lambda: ((d, o) for (_, d), (_, o) in zip(data.chunks(), original.chunks()))  # noqa: E731
    for k, net in enumerate(nets):
        if net.blind is not None:
            worst = max((input_stage_difference(net, d, o) for d, o in pairs()), default=0.0)
            report.add(f"input stage {k}", worst <= 0.5 / 255,
                       f"the authorized network's input stage maps every published image to its original's "
                       f"output within {worst:.2e} (8-bit rounding bound 0.5/255 = {0.5 / 255:.2e})")
    if streamed:  # chunk by chunk: the largest difference and the sum of every |δ|
        levels, total = 0, 0
        for d, o in pairs():
            diff = np.abs(d.astype(np.int16) - o.astype(np.int16))
            levels, total = max(levels, int(diff.max(initial=0))), total + int(diff.sum(dtype=np.int64))
        mean_abs = total / max(1, data.images.size)
    else:
        diff = np.abs(data.images.astype(np.int16) - original.images.astype(np.int16))
        levels, mean_abs = int(diff.max()), diff.mean()
    report.linf = levels / 255
    if manifest.get("norm_bounded", True):  # manifests from before baselines existed are all bounded
        report.add("budget", levels <= limit,
                   f"L∞ = {levels}/255 = {levels / 255:.4f} (ρ = {manifest['rho']}, {manifest['rho_levels']} levels"
                   + (f"; expected {rho_levels(rho)} levels" if rho is not None else "") + "); "
                   f"mean |δ| = {mean_abs:.2f}/255")
        return report
    # Not norm-bounded (CUDA): no budget to hold; the similarity the manifest claims must be the real one.
    measured = similarity_chunks(pairs()) if streamed else similarity(data.images, original.images)
    claimed = manifest.get("similarity") or {}
    report.similarity = measured
    agrees = all(isinstance(claimed.get(k), (int, float)) and abs(claimed[k] - v) <= tol
                 for (k, v), tol in zip(measured.items(), (1e-3, 1e-5)))
    report.add("similarity", agrees,
               f"PSNR = {measured['psnr']:.2f} dB, SSIM = {measured['ssim']:.4f} (mean over images; not norm-bounded, "
               f"L∞ = {levels}/255)" + ("" if agrees else f"; the manifest claims {claimed}"))
    return report


_FILES = {"npy": "images.npy", "npz": "data.npz", "png": "the PNG tree"}


def _same_images(path: Path, manifest: dict, data: ImageDataset, fmt: str) -> bool:
    """Whether format ``fmt`` of the set in ``path`` holds ``data``'s images and labels (chunk by chunk for a
    stored set)."""
    if not isinstance(data.images, np.memmap):  # in memory: as before
        other = read_published(path, prefer=fmt).data
        return np.array_equal(other.images, data.images) and np.array_equal(other.labels, data.labels)
    rows = chunk_rows(data.images.shape[1:])
    if fmt == "png":
        labels = _labels_from_png_tree(path, manifest)
        if not np.array_equal(labels, data.labels):
            return False
        return all(np.array_equal(_read_png_tree(path, manifest, labels[a:a + len(x)], a), x)
                   for a, x in data.chunks(rows))
    try:
        with np.load(path / "data.npz", allow_pickle=False) as z:
            if not np.array_equal(z["labels"], data.labels):
                return False
        return all(np.array_equal(x, y) for (_, x), (_, y) in zip(npz_chunks(path / "data.npz", rows),
                                                                  data.chunks(rows), strict=True))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, DataError):  # ValueError: fewer images
        return False


# ---------------------------------------------------------------- sealed publication (uge.sealing)

UNSEALED_FILE = "unsealed.json"  # beside data.npz in a folder written by unseal; uge.data.load_dataset reads it


def open_sealed(path: str | Path, key: bytes) -> tuple[ImageDataset, dict]:
    """The original set of a sealed published set, restored in memory with ``key``: ``(ImageDataset, info)``.

    The set is checked first (:func:`verify` without the originals: file hashes, the sealed residual's hash,
    labels); any failed check is a :class:`~uge.sealing.SealError`, as are a key that is not the set's and a
    residual that fails authentication. The restored images must hash to the manifest's ``original_sha256``.
    ``info`` is what ``unsealed.json`` records (see :func:`unseal`).
    """
    from .sealing import RESIDUAL_FILE, SealError, binding, unseal_images

    path = Path(path)
    _check_sealed(path)
    pub = read_published(path)
    m, data = pub.manifest, pub.data
    f = path / RESIDUAL_FILE  # verify checked that the manifest names this file and that its hash matches
    try:
        ciphertext = f.read_bytes()
    except OSError as e:
        raise SealError(f"cannot read the sealed residual {f}: {e.strerror or e}") from None
    original = unseal_images(data.images, ciphertext, m["sealed"], key,
                             bind=binding(array_sha256(data.images), m["labels_sha256"], m["original_sha256"]))
    digest = array_sha256(original)
    if digest != m["original_sha256"]:
        raise SealError(f"the restored images hash to {digest[:16]}…, not to the manifest's original_sha256 "
                        f"{m['original_sha256'][:16]}…")
    return ImageDataset(original, data.labels, data.classes), _unsealed_info(path, m, original.shape, digest,
                                                                              len(ciphertext))


def _check_sealed(path: Path) -> None:
    """SealError unless ``path`` is a sealed set that passes :func:`verify` without the originals."""
    from .sealing import SealError

    if not read_manifest(path).get("sealed"):
        raise SealError(f"{path} is not sealed (it was published without a key); there is nothing to unseal")
    report = verify(path)
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed)
        raise SealError(f"{path} fails verification, not unsealed: {failed}")


def _unsealed_info(path: Path, m: dict, shape, digest: str, residual_bytes: int) -> dict:
    """What ``unsealed.json`` records."""
    return {"format": "uge-unsealed", "format_version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "published": str(path.resolve()),
            "published_checksums_sha256": sha256_file(path / "checksums.sha256"),  # names the set exactly
            "method": m.get("method"), "source": m.get("source") or {}, "key_id": m["sealed"]["key_id"],
            "num_samples": int(shape[0]), "image_shape": [int(s) for s in shape[1:]],
            "original_sha256": digest, "labels_sha256": m["labels_sha256"], "residual_bytes": residual_bytes}


def unseal(path: str | Path, key: bytes, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Restore the originals of the sealed set in ``path`` into ``out_dir`` (``uge unseal``): ``data.npz``
    (images, labels, classes in the published order) and ``unsealed.json`` (the set and the SHA-256 of its
    checksums file, the key id, ``original_sha256``). A set published with ``images.npy`` is restored chunk by
    chunk into a store folder instead (``images.npy``, ``labels.npy``, ``store.json``; :mod:`uge.data.store`).

    ``uge.data.load_dataset(out_dir)`` (``--data DIR``) reads the folder. It is written atomically and only
    once every check has passed (see :func:`open_sealed`): nothing is written on any failure. Returns the
    ``unsealed.json`` record.
    """
    from .data.loaders import save_npz

    out = Path(out_dir)
    if out.exists() and not overwrite:  # before the work; atomic_dir checks again
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if "npy" in read_manifest(path).get("formats", []):
        return _unseal_stream(Path(path), key, out, overwrite)
    data, info = open_sealed(path, key)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_npz(data, tmp / "data.npz")
        write_json(tmp / UNSEALED_FILE, info)
    return info


def _unseal_stream(path: Path, key: bytes, out: Path, overwrite: bool) -> dict:
    """:func:`unseal` of a set with ``images.npy``, chunk by chunk into a store folder (nothing whole in memory)."""
    from .data.store import write_store_meta
    from .sealing import RESIDUAL_FILE, SealError, binding, unseal_stream

    _check_sealed(path)
    pub = read_published(path, stream=True)
    m, data = pub.manifest, pub.data
    shape = data.images.shape
    h = hashlib.sha256(f"{np.dtype(np.uint8).str}{tuple(shape)}".encode())
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with StoreWriter(tmp / IMAGES, shape) as w:
            def write(start: int, images: np.ndarray) -> None:
                w.write(start, images)
                h.update(images.tobytes())

            unseal_stream(data.chunks(), path / RESIDUAL_FILE, m["sealed"], key, write, shape=shape,
                          bind=binding(images_sha256(data), m["labels_sha256"], m["original_sha256"]))
            digest = h.hexdigest()
            if digest != m["original_sha256"]:
                raise SealError(f"the restored images hash to {digest[:16]}…, not to the manifest's original_sha256 "
                                f"{m['original_sha256'][:16]}…")
        np.save(tmp / LABELS, data.labels)
        write_store_meta(tmp, data.classes, shape)
        info = _unsealed_info(path, m, shape, digest, (path / RESIDUAL_FILE).stat().st_size)
        write_json(tmp / UNSEALED_FILE, info)
    return info
