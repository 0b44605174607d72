"""Sealed publication: authorized users get the original images back exactly, by cryptography.

A sealed set carries, beside the protected images x_u, the residual r = x − x_u (int16, compressed with
zlib) encrypted with AES-256-GCM (the ``cryptography`` package's AESGCM) under a key the data owner keeps and
hands to authorized users. Whoever holds the key restores x = x_u + r bit for bit (``uge unseal``); without it
the residual is noise. Nothing about the key is published except :func:`key_id`, a one-way identifier.

The associated data of the encryption binds the residual to its set (:func:`binding`: the hashes of the
published images, the labels and the originals, plus the residual's shape, dtype and compression), so a
residual moved to another set, or the right residual under another set's key, fails authentication.

This module holds the keys and the cipher; :func:`uge.published.unseal` (``uge unseal``) opens a whole set.

Key file: one line of text, ``uge-key-v1:<base64url of the 32 key bytes>`` (:func:`keygen` writes it with
mode 0600 and never overwrites a file). Nothing here imports torch at module level.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import zlib
from pathlib import Path

import numpy as np

from .errors import ConfigError, UGEError

KEY_BYTES = 32  # AES-256
KEY_PREFIX = "uge-key-v1:"
NONCE_BYTES = 12  # 96-bit GCM nonce, fresh and random for every seal
CIPHER = "AES-256-GCM"
COMPRESSION = "zlib"
DTYPE = "int16"
RESIDUAL_FILE = "sealed/residual.bin"
_MAX_AEAD = 2**31 - 1  # the largest message AESGCM encrypts in one call
_MAKE_ONE = "make one with `uge keygen KEYFILE`"


class SealError(UGEError):
    """A sealed residual cannot be opened: not this set's key, tampered, truncated, or another set's.

    The command line exits 1 for it (as for a failed ``uge verify``), not 2 as for bad input."""

    exit_code = 1


# ----------------------------------------------------------------------------------------- keys


def keygen(path: str | os.PathLike) -> bytes:
    """Write a new random 256-bit key to ``path`` (a new file, mode 0600) and return it.

    The file is one line, ``uge-key-v1:<base64url>``; an existing file is never overwritten (ConfigError).
    """
    path = Path(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; keygen never overwrites a key file (choose another name)") from None
    except OSError as e:
        raise ConfigError(f"cannot create key file {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (KEY_PREFIX + base64.urlsafe_b64encode(key).decode("ascii") + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return key


def load_key(path: str | os.PathLike) -> bytes:
    """The 32 key bytes of a key file written by :func:`keygen` (ConfigError for a missing file or a non-key)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} not found; {_MAKE_ONE}") from None
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror or e}; {_MAKE_ONE}") from None
    try:
        text = raw.decode("ascii").strip()
        if not text.startswith(KEY_PREFIX):
            raise ValueError
        key = base64.b64decode(text[len(KEY_PREFIX):], altchars=b"-_", validate=True)
        if len(key) != KEY_BYTES:
            raise ValueError
    except ValueError:  # UnicodeDecodeError and binascii.Error are ValueErrors
        raise ConfigError(f"{path} is not a uge key file (expected one line {KEY_PREFIX}<base64 of 32 bytes>); "
                          f"{_MAKE_ONE}") from None
    return key


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ConfigError(f"a sealing key is {KEY_BYTES} bytes (see uge.sealing.load_key)")
    return bytes(key)


def key_id(key: bytes) -> str:
    """A public identifier of ``key`` (32 hex digits): HMAC-SHA256 of a fixed label under the key, which
    reveals nothing about the key but tells a set's key from another."""
    return hmac.new(_check_key(key), b"uge key id v1", hashlib.sha256).hexdigest()[:32]


def key_seed(key: bytes) -> int:
    """The protection's seed for a set sealed with ``key`` (62 bits of HMAC-SHA256 under the key): every random
    draw of the perturbation (which class has which pattern, each block's sign) follows from it, so it must be as
    secret as the key. A published seed would let anyone draw the same perturbation and subtract it."""
    return int.from_bytes(hmac.new(_check_key(key), b"uge protect seed v1", hashlib.sha256).digest()[:8], "big") >> 2


# ----------------------------------------------------------------------------------------- seal


def binding(published_sha256: str, labels_sha256: str, original_sha256: str) -> str:
    """The string a set's residual is bound to: the hashes (:func:`uge.published.array_sha256`) of its published
    images, its labels and its originals."""
    return f"uge-sealed-v1;published={published_sha256};labels={labels_sha256};original={original_sha256}"


def _aad(bind: str, shape) -> bytes:
    """Associated data: the binding and how to decode the plaintext (tampering with either fails)."""
    return json.dumps({"bind": bind, "shape": [int(s) for s in shape], "dtype": DTYPE, "compression": COMPRESSION},
                      sort_keys=True).encode()


def seal(original_images: np.ndarray, published_images: np.ndarray, key: bytes, *, bind: str) -> tuple[bytes, dict]:
    """Encrypt the residual original − published (uint8 arrays (N, H, W, C)) for ``key``.

    Returns the ciphertext (the bytes of ``sealed/residual.bin``, GCM tag included) and its manifest entry:
    ``cipher``, ``compression``, ``nonce`` (hex), ``key_id``, ``file``, ``sha256`` and ``bytes`` of the
    ciphertext, ``shape`` and ``dtype`` of the residual.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _check_key(key)
    original_images, published_images = np.asarray(original_images), np.asarray(published_images)
    if original_images.dtype != np.uint8 or published_images.dtype != np.uint8:
        raise ConfigError(f"seal takes uint8 images, got {original_images.dtype} and {published_images.dtype}")
    if original_images.shape != published_images.shape:
        raise ConfigError(f"original images {original_images.shape} and published {published_images.shape} differ "
                          "in shape")
    residual = original_images.astype("<i2") - published_images.astype("<i2")
    plain = zlib.compress(np.ascontiguousarray(residual).tobytes(), 6)
    del residual
    if len(plain) > _MAX_AEAD - 16:
        raise ConfigError(f"the compressed residual is {len(plain)} bytes; sealing holds at most {_MAX_AEAD - 16}")
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, plain, _aad(bind, original_images.shape))
    meta = {"cipher": CIPHER, "compression": COMPRESSION, "nonce": nonce.hex(), "key_id": key_id(key),
            "file": RESIDUAL_FILE, "sha256": hashlib.sha256(ciphertext).hexdigest(), "bytes": len(ciphertext),
            "shape": [int(s) for s in original_images.shape], "dtype": DTYPE}
    return ciphertext, meta


def _check_meta(meta, key: bytes) -> None:
    """SealError (one line) unless ``meta`` is a sealed entry this uge opens, sealed with ``key``."""
    if not isinstance(meta, dict):
        raise SealError("the set is not sealed (its manifest has no \"sealed\" entry)")
    if (meta.get("cipher"), meta.get("compression"), meta.get("dtype")) != (CIPHER, COMPRESSION, DTYPE):
        raise SealError(f"the residual is sealed as {meta.get('cipher')}/{meta.get('compression')}/"
                        f"{meta.get('dtype')}; this uge opens {CIPHER}/{COMPRESSION}/{DTYPE}")
    if meta.get("key_id") != key_id(key):
        raise SealError(f"the key given is not this set's key (the set was sealed with key id {meta.get('key_id')}, "
                        f"the key given has id {key_id(key)})")


def _nonce(meta: dict) -> bytes:
    """The sealed entry's nonce; SealError (one line) when it is missing or malformed."""
    try:
        nonce = bytes.fromhex(meta.get("nonce") or "")
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_BYTES:
        raise SealError("the sealed residual's nonce in the manifest is malformed")
    return nonce


def unseal_images(published_images: np.ndarray, ciphertext: bytes, meta: dict, key: bytes, *,
                  bind: str) -> np.ndarray:
    """The original uint8 images: ``published_images`` + the residual decrypted from ``ciphertext``.

    Raises SealError (one line) for a key that is not this set's, a residual that fails authentication
    (tampered, truncated, another set's) or that does not decode to the published images' shape.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _check_key(key)
    published_images = np.asarray(published_images)
    _check_meta(meta, key)
    shape = tuple(published_images.shape)
    if list(shape) != list(meta.get("shape") or []) or published_images.dtype != np.uint8:
        raise SealError(f"the sealed residual has shape {meta.get('shape')}, the published images "
                        f"{list(shape)} ({published_images.dtype})")
    nonce = _nonce(meta)
    try:
        plain = AESGCM(key).decrypt(nonce, bytes(ciphertext), _aad(bind, shape))
    except InvalidTag:
        raise SealError("the sealed residual fails authentication: it was tampered with or truncated, or it "
                        "belongs to another set") from None
    expected = int(np.prod(shape)) * 2
    d = zlib.decompressobj()
    try:
        raw = d.decompress(plain, expected + 1)
    except zlib.error as e:
        raise SealError(f"the sealed residual does not decompress ({e})") from None
    if len(raw) != expected or not d.eof or d.unused_data:
        raise SealError(f"the sealed residual decompresses to {len(raw)}{'+' if not d.eof else ''} bytes; "
                        f"the published images {list(shape)} need {expected}")
    restored = published_images.astype(np.int16) + np.frombuffer(raw, "<i2").reshape(shape)
    if restored.min(initial=0) < 0 or restored.max(initial=0) > 255:
        raise SealError("the sealed residual does not restore 8-bit images (values outside 0..255)")
    return restored.astype(np.uint8)


# ------------------------------------------------------------------------ streamed (sets larger than memory)

_GCM_MAX = 2**36 - 32  # bytes GCM encrypts under one nonce (NIST SP 800-38D)


def seal_stream(pairs, shape, key: bytes, out, *, bind: str) -> dict:
    """:func:`seal` of a set read in chunks: ``pairs`` yields (original, published) uint8 chunks in order;
    the ciphertext goes to ``out`` (a binary file) as it is made. The bytes are those :func:`seal` gives for
    the same nonce (one zlib stream, AES-256-GCM with the tag at the end), so :func:`unseal_images` opens it.
    Returns the manifest entry."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = _check_key(key)
    shape = tuple(int(s) for s in shape)
    nonce = os.urandom(NONCE_BYTES)
    enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(_aad(bind, shape))
    z, h, size, rows = zlib.compressobj(6), hashlib.sha256(), 0, 0

    def emit(block: bytes) -> None:
        nonlocal size
        if block:
            out.write(block)
            h.update(block)
            size += len(block)

    for original, published in pairs:
        if original.dtype != np.uint8 or published.dtype != np.uint8 or original.shape != published.shape \
                or original.shape[1:] != shape[1:]:
            raise ConfigError(f"seal takes uint8 chunks of one shape, got {original.dtype} {original.shape} and "
                              f"{published.dtype} {published.shape}")
        rows += len(original)
        emit(enc.update(z.compress((original.astype("<i2") - published.astype("<i2")).tobytes())))
        if size > _GCM_MAX:
            raise ConfigError(f"the compressed residual passes {_GCM_MAX} bytes, the most one GCM nonce encrypts")
    if rows != shape[0]:
        raise ConfigError(f"seal was given {rows} images for a set of {shape[0]}")
    emit(enc.update(z.flush()))
    emit(enc.finalize())
    emit(enc.tag)
    return {"cipher": CIPHER, "compression": COMPRESSION, "nonce": nonce.hex(), "key_id": key_id(key),
            "file": RESIDUAL_FILE, "sha256": h.hexdigest(), "bytes": size, "shape": list(shape), "dtype": DTYPE}


def unseal_stream(published_chunks, ciphertext_file, meta: dict, key: bytes, write, *, shape, bind: str) -> None:
    """:func:`unseal_images` of a set read in chunks: ``published_chunks`` yields (start, published images) in
    order, the residual is read from ``ciphertext_file`` as needed, and ``write(start, originals)`` takes each
    restored chunk. The tag is checked at the end: the caller must discard what was written when this raises
    (SealError, one line, as :func:`unseal_images`)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = _check_key(key)
    shape = tuple(int(s) for s in shape)
    _check_meta(meta, key)
    if list(shape) != list(meta.get("shape") or []):
        raise SealError(f"the sealed residual has shape {meta.get('shape')}, the published images {list(shape)}")
    nonce = _nonce(meta)
    failed = SealError("the sealed residual fails authentication: it was tampered with or truncated, or it "
                       "belongs to another set")
    total = Path(ciphertext_file).stat().st_size
    if total < 16:
        raise failed
    with open(ciphertext_file, "rb") as f:
        f.seek(total - 16)
        tag = f.read(16)
        f.seek(0)
        dec = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(_aad(bind, shape))
        z, left, pending = zlib.decompressobj(), total - 16, bytearray()

        def feed() -> bool:
            """Decrypt and decompress the next block of the file into ``pending``; False at its end."""
            nonlocal left
            if not left:
                return False
            block = f.read(min(left, 1 << 20))
            if not block:
                raise failed
            left -= len(block)
            plain = dec.update(block)
            if plain and z.eof or z.unused_data:  # bytes after the end of the zlib stream
                raise SealError("the sealed residual has bytes after its compressed data")
            try:
                pending.extend(z.decompress(plain))
            except zlib.error as e:
                raise SealError(f"the sealed residual does not decompress ({e})") from None
            if z.unused_data:
                raise SealError("the sealed residual has bytes after its compressed data")
            return True

        def authentic() -> bool:
            while feed_raw():
                pass
            try:
                dec.finalize()
                return True
            except InvalidTag:
                return False

        def feed_raw() -> bool:  # the rest of the ciphertext through the cipher only (to check the tag)
            nonlocal left
            block = f.read(min(left, 1 << 20)) if left else b""
            left -= len(block)
            dec.update(block)
            return bool(block)

        try:
            for start, published in published_chunks:
                need = published.size * 2
                while len(pending) < need and feed():
                    pass
                if len(pending) < need:
                    raise SealError("the sealed residual decompresses to fewer bytes than the published images "
                                    f"{list(shape)} need")
                raw = np.frombuffer(bytes(pending[:need]), "<i2").reshape(published.shape)
                del pending[:need]
                restored = published.astype(np.int16) + raw
                if restored.min(initial=0) < 0 or restored.max(initial=0) > 255:
                    raise SealError("the sealed residual does not restore 8-bit images (values outside 0..255)")
                write(start, restored.astype(np.uint8))
            while feed():
                pass
            if pending or not z.eof:
                raise SealError(f"the sealed residual decompresses to {'more' if pending else 'fewer'} bytes than "
                                f"the published images {list(shape)} need")
        except SealError:
            if not authentic():  # a tampered file says so, whatever it decompressed to
                raise failed from None
            raise
        try:
            dec.finalize()
        except InvalidTag:
            raise failed from None
