"""The ``uge`` command line: a thin layer over the Python API (protect, train, evaluate, verify, demo)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, distributed
from .config import (
    CHOICES,
    COUNTERMEASURE_SYNTAX,
    FEATURE_SPACES,
    FORMATS,
    HACKER_SYNTAX,
    AuthorizedSpec,
    HackerSpec,
    ProtectConfig,
    Recipe,
    parse_budget,
    rho_levels,
)
from .errors import ConfigError, UGEError
from .params import field_spec
from .standing import STANDING
from .utils import resolve_device, write_json
from .workers import CLAIM_TIMEOUT, Terminated, Worker, parse_shard, released_on_sigterm

if TYPE_CHECKING:
    from .data import ImageDataset

# The parser is built from the config layer only; each command imports the numerical stack (torch) it needs,
# so `uge --help` and a mistyped flag answer at once.

log = logging.getLogger("uge")
DEFAULT_HACKERS = "cnn:normal,cnn:distill,resnetc20:normal,resnetc20:distill"


# ---------------------------------------------------------------- shared arguments and helpers

def _add_data_args(p: argparse.ArgumentParser, required: bool = True, prefix: str = ""):
    p.add_argument(f"--{prefix}data", required=required,
                   help="'digits', 'shapes', 'cifar10', 'cifar100', an ImageFolder folder, a .tar/.tar.gz of one, "
                        "a .npz or a published set")
    p.add_argument(f"--{prefix}split", default="train", help="split folder to read (default: train)")
    p.add_argument(f"--{prefix}per-class", type=int, default=None, help="class-balanced subset: N images per class")
    p.add_argument(f"--{prefix}subset-seed", type=int, default=0, help="seed of the class-balanced subset")


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--root", default=None, help="torchvision data root for cifar10/cifar100")
    p.add_argument("--download", action="store_true", help="allow torchvision to download cifar10/cifar100")


def _add_stream(p: argparse.ArgumentParser, what: str):
    p.add_argument("--stream", action="store_true",
                   help=f"a set larger than memory: {what} (docs/large-sets.md)")


def _add_recipe_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("training recipe (defaults: the published recipe, or Recipe())")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--no-flip", dest="flip", action="store_const", const=False, help="no horizontal flips")
    g.add_argument("--no-crop", dest="crop", action="store_const", const=False, help="no random crops")


def _recipe(args, base: Recipe | None = None) -> Recipe:
    d = (base or Recipe()).to_dict()
    d.update({k: v for k, v in {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                "flip": args.flip, "crop": args.crop}.items() if v is not None})
    return Recipe.from_dict(d)


class _CountermeasureAction(argparse.Action):
    """Store a countermeasure spec; ``list`` prints every countermeasure with its parameters and exits."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values.strip() == "list":
            from .countermeasures import describe_countermeasures

            print(describe_countermeasures())
            parser.exit(0)
        setattr(namespace, self.dest, values)


def _add_countermeasure_arg(p: argparse.ArgumentParser, flag: str = "--countermeasure", who: str = "the hackers"):
    p.add_argument(flag, metavar="SPEC", action=_CountermeasureAction,
                   help=f"countermeasures of {who}: {COUNTERMEASURE_SYNTAX} ('{flag} list' shows every "
                        "countermeasure with its parameters and defaults)")


def _budget(text: str) -> float:
    """argparse type of a budget flag: 0.04 or 10/255 (a bad one is a usage error, exit 2)."""
    try:
        return parse_budget(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shard(text: str) -> tuple[int, int]:
    """argparse type of --shard: I/N (a bad one is a usage error, exit 2)."""
    try:
        return parse_shard(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _source_record(args, prefix: str = "") -> dict:
    """Where the data is read from on this machine (for loading; a manifest gets :func:`uge.published.source_record`)."""
    return {"data": getattr(args, f"{prefix}data"), "split": getattr(args, f"{prefix}split"),
            "per_class": getattr(args, f"{prefix}per_class"), "subset_seed": getattr(args, f"{prefix}subset_seed")}


def load_source(source: dict, root=None, download=False, flag: str = "--original-data",
                stream: bool = False) -> ImageDataset:
    """Load a data set described by a source record (``data`` or a built-in ``name``, ``split``, ``per_class``,
    ``subset_seed``); a manifest's file source has no location, so ``flag`` must give it. ``stream``: a folder,
    tar or ``.npz`` is built into a cached store chunk by chunk, and a store (or a published set's images.npy)
    is read on demand, never whole (:mod:`uge.data.store`)."""
    from .data import load_dataset
    from .published import read_published, source_location

    data = source_location(source)
    if not data:
        raise ConfigError(f"the published set names its data {source.get('name')!r} but not where it is "
                          f"(manifests do not record local paths); pass {flag} PATH")
    if (Path(data) / "manifest.json").is_file():
        return read_published(data, stream=stream).data
    return load_dataset(data, source.get("split") or "train", root=root, download=download,
                        per_class=source.get("per_class"), seed=source.get("subset_seed") or 0, stream=stream)


def _print(text: str = ""):
    if distributed.is_main():  # under torchrun, rank 0 speaks for every process
        print(text, flush=True)


# ---------------------------------------------------------------- protect

# Every protect flag sets one field of the chosen method (uge.protectors); a flag whose field the method does not
# have is a usage error, never ignored. dest -> (flag, field).
_FIELD_FLAGS = {
    "rho": ("--rho", "rho"), "authorized": ("--authorized", "authorized"), "losses": ("--losses", "losses"),
    "trajectory_epochs": ("--trajectory-epochs", "trajectory_epochs"),
    **{d: (f"--{d.replace('_', '-')}", d) for d in (
        "generator_epochs", "generator_batch_size", "generator_width", "generator_lr", "lambda_fd", "lambda_ud",
        "alpha", "omega", "temperature", "gm_augment", "gm_trajectories", "delta_steps", "gm_rounds",
        "gm_warmup_epochs", "generator_center", "feature_space", "clip_model", "clip_checkpoint", "encoder_arch",
        "hacker_arch", *CHOICES)},
    "encoder_epochs": ("--encoder-epochs", "encoder_recipe"),
    **{d: (flag, "recipe") for d, flag in (("epochs", "--epochs"), ("lr", "--lr"), ("batch_size", "--batch-size"),
                                           ("flip", "--no-flip"), ("crop", "--no-crop"))},
}


def _protect_params(args, cls) -> tuple[dict, int | None]:
    """The chosen method's parameters from ``--config``, the flags and ``--param``, and the run's seed (None when
    neither gives one).

    Each flag sets the field of the method that it names; a flag the method has no field for is a ConfigError
    that lists the method's fields. ``--config`` is a JSON table of the method's fields (a ``seed`` in it is the
    run's seed, which ``--seed`` overrides).
    """
    names = cls.parameter_names()
    params = {}
    if args.config:
        try:
            params = json.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {args.config}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {args.config} is not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise ConfigError(f"config file {args.config} must hold a JSON table of the method's parameters")
    seed = params.pop("seed", None) if "seed" not in names else None
    seed = args.seed if args.seed is not None else seed
    given = {d: getattr(args, d) for d in _FIELD_FLAGS if getattr(args, d) is not None}  # every flag defaults to None
    wrong = sorted({_FIELD_FLAGS[d][0] for d in given if _FIELD_FLAGS[d][1] not in names})
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --method "
                          f"{cls.name}; its parameters: {', '.join(names)} (set with the flags or --param KEY=VALUE; "
                          "--method list shows every method's)")
    for d, value in given.items():
        field = _FIELD_FLAGS[d][1]
        if field == "losses":
            value = [x.strip() for x in value.split(",") if x.strip()]
        elif field == "authorized":
            value = [vars(AuthorizedSpec.parse(a)) for a in value]
        elif field == "encoder_recipe":
            value = {**(params.get(field) or ProtectConfig().fd.encoder_recipe.to_dict()), "epochs": value}
        elif field == "recipe":
            continue  # below
        params[field] = value
    if "recipe" in names:  # the recipe flags edit the published recipe (the config's, else Recipe())
        params["recipe"] = _recipe(args, Recipe.from_dict(params.get("recipe") or {})).to_dict()
    params.update(_method_params(args.param))
    return params, seed


def _method_params(items: list[str] | None) -> dict:
    """``--param key=value`` pairs; values are read as JSON where they parse (3, 0.5, true), else as text."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param takes KEY=VALUE, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:  # a budget in levels ("8/255") or a plain string
            params[key.strip()] = parse_budget(value) if value.strip().endswith("/255") else value
    return params


class _MethodAction(argparse.Action):
    """Store a method's name; ``list`` prints every method with its parameters and exits."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values.strip() == "list":
            from .protectors import list_protectors, protector_class

            print("\n".join(protector_class(name).describe() for name in list_protectors()))
            parser.exit(0)
        setattr(namespace, self.dest, values)


def _published_root(data: str) -> Path | None:
    """The published set that the path ``data`` is, or lies in (its data.npz, images/, images/<class>), else None."""
    from .data.loaders import BUILTINS

    path = Path(data)
    if data.lower() in BUILTINS or not path.exists():
        return None
    if (path / "manifest.json").is_file():
        return path
    # above the path, a set's two files: a folder that merely holds some other manifest.json is not one
    return next((p for p in path.resolve().parents[:3] if (p / "manifest.json").is_file()
                 and (p / "checksums.sha256").is_file()), None)


def _new_or_kept_key(out: Path) -> tuple[str, bytes, Path | None]:
    """The key file beside the published folder ``out`` (``<out>.key``, never inside it): a new key, or the one an
    earlier run of the same command left there; (its path, the key, the path again if this call wrote it)."""
    from .sealing import keygen, load_key

    path = out.with_name(f"{out.name}.key")
    if path.exists():
        _print(f"sealing with the existing key {path}")
        return str(path), load_key(path), None
    key = keygen(path)
    _print(f"sealing with a new key, written to {path} (mode 0600): keep it secret and apart from the published set")
    return str(path), key, path


def _standing_line() -> str:
    s, f = STANDING, STANDING["full_size"]
    return (f"{s['method']}, the default ({s['run']}, CIFAR-10 at CPU size): a {s['network']} hacker trained on it "
            f"reaches {s['plain']:.1f} % test accuracy plainly and {s['worst']:.1f} % at worst (by {s['by']}), against "
            f"{s['clean']:.1f} % from clean data: {s['fraction']:.2f} of clean learning kept (the lowest of the other "
            f"{s['protections'] - 1} protections measured at its budget: {s['lowest_other']:.2f}; the goal: at most "
            f"0.40); at full size ({f['run']}, one GPU), a {f['network']} hacker: {f['plain']:.1f} % plainly, "
            f"{f['worst']:.1f} % at worst (by {f['by']}), against {f['clean']:.1f} %: {f['fraction']:.2f} kept, "
            f"{f['fraction_without_adv']:.2f} without adversarial training (by {f['by_without_adv']}); key holders "
            "unseal the originals bit for bit")


_DISTRIBUTED_METHODS = ("uge", "fd")  # the methods whose protect runs under torchrun (the generator's training)


def cmd_protect(args) -> int:
    from .protectors import build_protector, protector_class
    from .protectors.base import in_memory_limit
    from .published import publish, source_record

    all_formats = (*FORMATS, "npy")
    formats = [f.strip() for f in (args.format or ("npy" if args.stream else "npz,png")).split(",") if f.strip()]
    if not formats or set(formats) - set(all_formats):  # fail before any training
        raise ConfigError(f"--format must be a comma list of {', '.join(all_formats)}, got {args.format!r}")
    # every method is built by name through the registry, so a bad parameter fails before any work
    published = _published_root(args.data)
    if published is not None:
        where = "already a published set" if published == Path(args.data) else f"part of the published set {published}"
        raise ConfigError(f"{args.data} is {where}; protect the original images (a key holder of a sealed set gets "
                          "them with `uge unseal`)")
    params, seed = _protect_params(args, protector_class(args.method))
    method = build_protector(args.method, **params)
    if distributed.world().size > 1 and args.method not in _DISTRIBUTED_METHODS:
        raise ConfigError(f"--method {args.method} runs in one process; under torchrun protect runs UGE's generator "
                          f"({', '.join(_DISTRIBUTED_METHODS)})")
    from .sealing import key_seed, load_key

    seal_key = load_key(args.seal) if args.seal else None  # a missing or bad key fails before any work
    data = load_source(_source_record(args), args.root, args.download, stream=args.stream)
    data = in_memory_limit(method, data)  # a stored set: kept for a method that streams, else read whole or refused
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if args.method == STANDING["method"]:
        _print(_standing_line())
    made = None  # a key file this run wrote: removed again if the run fails
    if seal_key is None and method.sealed:  # only key holders learn from it: always sealed
        args.seal, seal_key, made = _new_or_kept_key(out)
    # sealed, the seed comes from the key unless given: a published seed would let anyone draw the same
    # perturbation and subtract it (every draw of a pattern protector follows from the seed)
    seed_secret = seal_key is not None and seed is None
    seed = key_seed(seal_key) if seed_secret else seed or 0
    work = Path(args.work_dir) if args.work_dir else out.with_name(f".{out.name}.work")
    budget = f"ρ = {method.rho:.4g} ({rho_levels(method.rho)} levels)" if method.rho is not None else "no L∞ budget"
    _print(f"protecting {len(data)} images of {data.num_classes} classes with {args.method}, {budget}, "
           + ("seed derived from the key (secret, not in the manifest)" if seed_secret else f"seed {seed}"))
    start = time.perf_counter()
    try:
        result = method.protect(data, device=args.device, work_dir=work, progress=not args.quiet, seed=seed)
        result.seed_secret = seed_secret
        distributed.on_main(publish, result, data, out, formats=formats, overwrite=args.overwrite,  # rank 0 writes
                            theta0_apart=args.theta0_apart, seal_key=seal_key,
                            source=source_record(args.data, args.split, args.per_class, args.subset_seed))
    except BaseException:
        if made is not None:
            made.unlink(missing_ok=True)
        raise
    if data.stored:  # the protected images' working copy (uge.protectors.base.chunked_result), now published
        (work / "protected.npy").unlink(missing_ok=True)
    if seal_key is not None:
        _print(f"sealed: the residual to the originals is encrypted in {out / 'sealed'}; key holders restore the "
               f"originals with `uge unseal {out} --key {args.seal} --out DIR`")
    if args.theta0_apart and result.theta0:
        _print(f"θ0 written apart from the set, to {args.theta0_apart} (the manifest holds its SHA-256)")
    _print(f"published {out} ({', '.join(formats)}) in {time.perf_counter() - start:.1f} s"
           + (f"; feature space: {result.feature_space}" if result.feature_space != "none" else ""))
    if result.history:
        _print("last generator epoch: " + json.dumps(result.history[-1]))
    return 0


# ---------------------------------------------------------------- train

def cmd_train(args) -> int:
    from .countermeasures import (
        format_countermeasures,
        make_batch_augment,
        parse_countermeasures,
        transform_data,
        wrap_task,
    )
    from .training import DistillTask, SupervisedTask, accuracy, train
    from .weights import build_network, save_weights

    cms = parse_countermeasures(args.countermeasure)  # fail on a bad spec before loading anything
    src = _source_record(args)
    data = load_source(src, args.root, args.download, stream=args.stream)
    test_src = _source_record(args, "test_") if args.test_data else _default_test_source(src)
    test = _load_test(test_src, args)
    data.check_compatible(test)
    data = transform_data(cms, data, reference=test)  # adaptive countermeasures: the test split's statistics
    test = transform_data(cms, test, test=True)
    model = build_network(args.arch, data.num_classes, data.channels, args.seed, args.init)
    task = None
    if args.teacher:
        if not args.teacher_arch:
            raise ConfigError("--teacher needs --teacher-arch")
        teacher = build_network(args.teacher_arch, data.num_classes, data.channels, weights=args.teacher)
        task = DistillTask(teacher, args.temperature)
    recipe = _recipe(args)
    start = time.perf_counter()
    train(model, data, recipe, task=wrap_task(cms, task or SupervisedTask()), device=args.device, seed=args.seed,
          progress=not args.quiet, desc=f"train {args.arch}", batch_augment=make_batch_augment(cms, data.num_classes),
          checkpoint=args.checkpoint, sync_bn=args.sync_bn)
    rec = {"arch": args.arch, "mode": "distill" if task else "normal", "init": args.init or f"seed:{args.seed}",
           "data": src, "test": test_src, "test_acc": accuracy(model, test), "train_acc": accuracy(model, data),
           "seconds": round(time.perf_counter() - start, 2), "recipe": recipe.to_dict(),
           "countermeasures": format_countermeasures(cms) or None, **_processes()}
    _print(f"{args.arch} ({rec['mode']}): test accuracy {rec['test_acc']:.2f}% "
           f"(train {rec['train_acc']:.2f}%) in {rec['seconds']:.1f} s")
    if args.save:
        distributed.on_main(save_weights, args.save, model.state_dict(), metadata={"arch": args.arch})
        _print(f"weights saved to {args.save}")
    if args.record:
        distributed.on_main(write_json, args.record, rec)
    return 0


def _processes() -> dict:
    """The number of training processes, in a record of a run under torchrun (one process: nothing, as before)."""
    size = distributed.world().size
    return {"processes": size} if size > 1 else {}


def _default_test_source(src: dict) -> dict:
    """The test split of the training data's source (the published set's own source for a published set)."""
    from .published import read_published, source_location

    if (Path(src["data"]) / "manifest.json").is_file():
        recorded = read_published(src["data"]).manifest.get("source") or {}
        data = source_location(recorded)
        if not data:
            raise ConfigError("this published set does not record where its data is "
                              f"({recorded.get('name') or 'no source'!r}); pass --test-data")
        src = {"data": data}
    elif (Path(src["data"]) / "unsealed.json").is_file():  # `uge unseal`'s output: its published set's source
        recorded = json.loads((Path(src["data"]) / "unsealed.json").read_text()).get("source") or {}
        data = source_location(recorded)
        if not data:
            raise ConfigError("this unsealed set does not record where its data is "
                              f"({recorded.get('name') or 'no source'!r}); pass --test-data")
        src = {"data": data}
    return {"data": src["data"], "split": "test", "per_class": None, "subset_seed": 0, "default": True}


def _load_test(test_src: dict, args) -> ImageDataset:
    """The test set; a defaulted one must be a real test split of the source, never its training images."""
    from .data import load_splits

    if test_src.get("default"):
        test = load_splits(test_src["data"], root=args.root, download=args.download)[1]
        return test.per_class(args.test_per_class, args.test_subset_seed) if args.test_per_class else test
    return load_source(test_src, args.root, args.download)


# ---------------------------------------------------------------- evaluate

def cmd_evaluate(args) -> int:
    from .countermeasures import countermeasure_slug, parse_countermeasures
    from .evaluate import evaluate_published, format_table
    from .published import read_published

    cms = parse_countermeasures(args.countermeasure)  # fail on a bad spec before loading anything
    auth_cms = parse_countermeasures(args.authorized_countermeasure)
    pub = read_published(args.published, stream=args.stream)
    key_nets, unsealed = _unsealed_authorized(args, pub)  # (None, None) without --key
    src = _source_record(args, "original_") if args.original_data else pub.manifest.get("source") or {}
    if args.test_data:
        test_src = _source_record(args, "test_")
    else:
        test_src = _default_test_source(src if args.original_data else {"data": str(pub.path)})
    test = _load_test(test_src, args)
    clean = load_source(src, args.root, args.download) if args.baseline else None
    hackers = [HackerSpec.parse(h) for h in args.hackers.split(",") if h.strip()]
    out = Path(args.out) if args.out else pub.path.with_name(pub.path.name + "-eval")
    start = time.perf_counter()
    records = evaluate_published(pub, test, hackers, clean=clean, recipe=_recipe(args, pub.recipe), out_dir=out,
                                 device=args.device, seed=args.seed, progress=not args.quiet,
                                 countermeasures=cms, authorized_countermeasures=auth_cms, theta0=args.theta0,
                                 authorized=key_nets, unsealed=unsealed)
    table = format_table(records, num_classes=test.num_classes)
    # one table per countermeasure setting, like the records ("table.md" without countermeasures)
    tag = "".join(f"__{p}{countermeasure_slug(c)}" for p, c in (("", cms), ("authorized-", auth_cms)) if c)
    distributed.on_main((out / f"table{tag}.md").write_text, table + "\n")
    _print(table)
    _print(f"\n{len(records)} records and table{tag}.md in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _unsealed_authorized(args, pub):
    """``evaluate --key``: the originals restored from the sealed residual, and the authorized networks that train
    on them (``--key-archs``; default the published authorized networks' architectures, else resnetc20 for colour
    and cnn for grayscale), each from the random initialization of ``--seed``. (None, None) without ``--key``."""
    if not args.key:
        if args.key_archs:
            raise ConfigError("--key-archs names the networks trained on the unsealed originals; it needs --key")
        return None, None
    from .published import open_sealed
    from .records import AuthorizedNet
    from .weights import build_network

    key = _holder_key(args.key)
    data = pub.data
    archs = ([a.strip() for a in args.key_archs.split(",") if a.strip()] if args.key_archs else
             [a["arch"] for a in pub.manifest["authorized"]] or ["resnetc20" if data.channels == 3 else "cnn"])
    nets = [AuthorizedNet(a, build_network(a, data.num_classes, data.channels, seed=args.seed), f"seed:{args.seed}")
            for a in dict.fromkeys(archs)]  # a bad architecture fails here, before any work
    unsealed, info = open_sealed(pub.path, key)
    n, npz = len(data), pub.path / "data.npz"
    _print(f"unsealed {n} images with key {info['key_id']}: the sealed residual is "
           f"{info['residual_bytes'] / n:,.1f} bytes per image, the data {data.images[0].nbytes:,} bytes per image"
           + (f" (data.npz {npz.stat().st_size / n:,.1f})" if npz.is_file() else "")
           + f"; authorized networks trained on the originals: {', '.join(a.arch for a in nets)}")
    return nets, unsealed


# ---------------------------------------------------------------- verify

def cmd_verify(args) -> int:
    from .published import read_manifest, verify

    pub_manifest = read_manifest(args.published)
    if args.original_data:
        src = _source_record(args, "original_")
    else:
        src = pub_manifest.get("source") or {}
    original = None
    if src.get("data") or src.get("name"):
        try:
            original = load_source(src, args.root, args.download, stream=args.stream)
        except UGEError as e:
            _print(f"warning: cannot load the originals ({e}); checking hashes only")
    report = verify(args.published, original, theta0=args.theta0, rho=args.rho)
    for c in report.checks:
        _print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    _print("verified: OK" if report.ok else "verified: FAILED")
    return 0 if report.ok else 1


# ---------------------------------------------------------------- sealed publication (uge.sealing)

def cmd_keygen(args) -> int:
    from .sealing import key_id, keygen

    key = keygen(args.keyfile)
    _print(f"wrote a new 256-bit key to {args.keyfile} (mode 0600, key id {key_id(key)}); keep it secret: whoever "
           "holds it restores the original images of every set sealed with it")
    return 0


_FROM_OWNER = ("use the key file the set was sealed with, from its data owner (a new key from `uge keygen` "
               "cannot open it)")


def _holder_key(path: str) -> bytes:
    """A key holder's key (unseal, evaluate --key): a missing or bad one is to be had from the data owner, not made."""
    from .sealing import load_key

    try:
        return load_key(path)
    except ConfigError:
        what = "not found" if not Path(path).exists() else "is not a uge key file (or cannot be read)"
        raise ConfigError(f"key file {path} {what}; {_FROM_OWNER}") from None


def cmd_unseal(args) -> int:
    from .published import unseal

    info = unseal(args.published, _holder_key(args.key), args.out, overwrite=args.overwrite)
    _print(f"{info['num_samples']} images restored bit for bit to {args.out}, verified against the manifest's "
           f"original_sha256 ({info['original_sha256'][:16]}…)")
    return 0


# ---------------------------------------------------------------- benchmark and report

def cmd_benchmark(args) -> int:
    from .benchmark import load_config, run_benchmark, write_report

    cfg = load_config(args.config)
    if args.data:  # the same experiment on data stored elsewhere (e.g. a copy on a GPU machine)
        cfg.data.source = args.data
    out = Path(args.out or Path("runs") / cfg.name)
    start = time.perf_counter()
    worker = Worker(*args.shard, claim_timeout=args.claim_timeout)
    with released_on_sigterm():  # a job array's time limit: the claims go back at once, not after the timeout
        records = run_benchmark(cfg, out, device=args.device, root=args.root, progress=not args.quiet, worker=worker)
    if not worker.complete:  # a shard whose part is finished, while other workers' is not
        _print(f"{worker}: its part is finished ({len(worker.claimed)} networks trained here); "
               f"{len(worker.left)} of the grid's networks are other workers' and not finished yet: "
               f"`uge report {out}` once they are ({time.perf_counter() - start:.1f} s)")
        return 0
    report = write_report(out)  # by each worker that finds the grid finished: the same files from the same records
    _print((report / "table.md").read_text())
    _print(f"{len(records)} records in {out}, report in {report} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_report(args) -> int:
    from .benchmark import write_report

    report = write_report(args.run_dir, args.out)
    _print((report / "report.md").read_text())
    _print(f"report written to {report}")
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from .demo import run_demo

    table, seconds = run_demo(args.out, device=args.device, progress=not args.quiet)
    _print(table)
    _print(f"\ndemo finished in {seconds:.1f} s on {resolve_device(args.device)}; report.md and demo.png in {args.out}")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uge", description="Ungeneralizable Examples: publish an image data set "
                                "that only your chosen (authorized) network can learn from.")
    p.add_argument("--version", action="version", version=f"uge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("protect", help="protect a training set and publish it")
    _add_data_args(q)
    _add_common(q)
    _add_stream(q, "the data becomes a cached store, protected and published chunk by chunk")
    _add_recipe_args(q)
    q.add_argument("--out", required=True, help="folder of the published set")
    q.add_argument("--config", help="a JSON table of the method's parameters (the flags override it)")
    q.add_argument("--authorized", action="append",
                   help="ARCH, ARCH:SEED or ARCH:THETA0.safetensors; repeat for several authorized networks")
    q.add_argument("--rho", type=_budget, help="L∞ budget: 0.04 on the [0,1] scale or 10/255 in 8-bit levels "
                   "(default: the method's)")
    q.add_argument("--trajectory-epochs", type=int, help="T (default 4)")
    q.add_argument("--losses", help="comma list of gm,fd,ud (default all three)")
    q.add_argument("--seed", type=int, help="the run's seed, for every method (default 0; uge.seeds)")
    uge_specs = ProtectConfig.flat_specs()
    for name, typ in (("generator-epochs", int), ("generator-batch-size", int), ("generator-width", int),
                      ("generator-lr", float), ("lambda-fd", float), ("lambda-ud", float), ("alpha", float),
                      ("omega", float), ("temperature", float), ("encoder-epochs", int)):
        field = name.replace("-", "_")  # UGE's parameter; its allowed values from the same spec that checks them
        spec = field_spec(Recipe, "epochs") if field == "encoder_epochs" else uge_specs[field]
        q.add_argument(f"--{name}", type=typ, help=spec.allowed())
    for name, values in CHOICES.items():  # readings of the paper and variants beyond it (README: the objective)
        q.add_argument(f"--{name.replace('_', '-')}", choices=values, help=f"default {values[0]}")
    q.add_argument("--gm-augment", action="store_const", const=True, help="match gradients under the recipe's crop + flip")
    q.add_argument("--gm-trajectories", type=int, help="trajectories (data orders) from θ0 matched by L_gm (default 1)")
    q.add_argument("--delta-steps", type=int, help="with --parametrization delta: PGD steps per batch (default 10)")
    q.add_argument("--gm-rounds", type=int, help="with --parametrization delta: passes over the set, each after "
                   "the first also matching at the authorized network's run on the protected set (default 1)")
    q.add_argument("--gm-warmup-epochs", type=int, help="generator epochs trained without L_gm first (default 0)")
    q.add_argument("--generator-center", action="store_const", const=True,
                   help="subtract the batch mean of the generator's perturbation (no universal pattern)")
    q.add_argument("--feature-space", choices=FEATURE_SPACES)
    q.add_argument("--clip-model", help="OpenCLIP model name (default ViT-B-32)")
    q.add_argument("--clip-checkpoint", help="local OpenCLIP checkpoint file")
    q.add_argument("--encoder-arch", help="network of the offline feature space (default resnetc20)")
    q.add_argument("--hacker-arch", help="random network f'_θA of L_ud (default: the authorized architecture)")
    q.add_argument("--method", default=STANDING["method"], action=_MethodAction,
                   help=f"{STANDING['method']} (default: a power-matched grating, published sealed; it prints its "
                   "measured standing), "
                   "uge (the paper's method) or another protector: keyed, fd, random, patch, jpeg-patch, em, tap, "
                   "rem, cuda, ntga; every "
                   "flag of this command sets one of the method's parameters, and a flag the method does not have "
                   "is an error ('--method list' shows every method's parameters, defaults and allowed values)")
    q.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="any parameter of the method, e.g. --param pgd_steps=10 (repeat for several)")
    q.add_argument("--format", help="a comma list of npz, png and npy (the images as one uncompressed .npy that "
                   "loaders memory-map; default npz,png, with --stream npy)")
    q.add_argument("--work-dir", help="checkpoint folder for resuming (default: .<out>.work beside --out)")
    q.add_argument("--theta0-apart", metavar="DIR", help="write the authorized θ0 here instead of into the set "
                   "(the manifest keeps its SHA-256; evaluate and verify then take --theta0 FILE)")
    q.add_argument("--seal", metavar="KEYFILE", help="also publish the residual to the originals, encrypted with "
                   "this key (uge keygen): key holders restore the originals bit for bit (uge unseal)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_protect, processes=True)

    t = sub.add_parser("train", help="train a network on a clean or published set")
    _add_data_args(t)
    _add_data_args(t, required=False, prefix="test-")
    _add_common(t)
    _add_stream(t, "the training images are read batch by batch from a store, never whole")
    _add_recipe_args(t)
    t.set_defaults(test_split="test")
    t.add_argument("--arch", required=True)
    t.add_argument("--seed", type=int, default=0, help="initialization and training seed")
    t.add_argument("--init", help="initial weights (safetensors), e.g. a published θ0")
    t.add_argument("--teacher", help="teacher weights (safetensors): train by distillation")
    t.add_argument("--teacher-arch")
    t.add_argument("--temperature", type=float, default=4.0)
    t.add_argument("--save", help="write the trained weights here (safetensors)")
    t.add_argument("--record", help="write a JSON record here")
    t.add_argument("--checkpoint", metavar="FILE", help="write the run's state here after every epoch and resume "
                   "from it when it exists (a rerun of a killed run ends as one never stopped)")
    t.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm with the statistics "
                   "of the global batch, not of each process's part")
    _add_countermeasure_arg(t, who="this training run")
    t.set_defaults(func=cmd_train, processes=True)

    e = sub.add_parser("evaluate", help="the paper's threat model on a published set")
    e.add_argument("published")
    _add_data_args(e, required=False, prefix="test-")
    _add_data_args(e, required=False, prefix="original-")
    _add_common(e)
    _add_stream(e, "the published images.npy is read batch by batch, never whole")
    _add_recipe_args(e)
    e.set_defaults(test_split="test")
    e.add_argument("--hackers", default=DEFAULT_HACKERS,
                   help=f"comma list of {HACKER_SYNTAX} (default {DEFAULT_HACKERS})")
    _add_countermeasure_arg(e)
    _add_countermeasure_arg(e, "--authorized-countermeasure", "the authorized networks (default none)")
    e.add_argument("--baseline", action="store_true", help="also train the same networks on the clean originals")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="records folder (default: <published>-eval)")
    e.add_argument("--theta0", action="append", metavar="FILE",
                   help="θ0 of an authorized network published apart from the set (repeat for several, in order)")
    e.add_argument("--key", metavar="KEYFILE", help="a sealed set's key: the authorized networks train on the "
                   "originals restored with it (uge unseal), from a random initialization; hackers on the set")
    e.add_argument("--key-archs", metavar="ARCH,ARCH", help="with --key: the authorized networks' architectures "
                   "(default: the published authorized networks', else resnetc20 for colour, cnn for grayscale)")
    e.set_defaults(func=cmd_evaluate, processes=True)

    v = sub.add_parser("verify", help="check a published set's budget, labels, order and hashes")
    v.add_argument("published")
    _add_data_args(v, required=False, prefix="original-")
    _add_common(v)
    _add_stream(v, "the originals are read chunk by chunk from a store, never whole")
    v.add_argument("--rho", type=_budget, help="the L∞ budget you expect (0.04, or 10/255 in 8-bit levels): fail "
                   "when the manifest states another, or the images exceed it")
    v.add_argument("--theta0", action="append", metavar="FILE",
                   help="θ0 of an authorized network published apart from the set (repeat for several, in order)")
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("keygen", help="write a new random 256-bit key for sealed publication (protect --seal)")
    k.add_argument("keyfile", help="a new file (mode 0600; never overwritten)")
    k.set_defaults(func=cmd_keygen)

    u = sub.add_parser("unseal", help="restore a sealed set's original images, bit for bit, with its key")
    u.add_argument("published")
    u.add_argument("--key", required=True, metavar="KEYFILE", help="the key the set was sealed with")
    u.add_argument("--out", required=True, help="a new folder: data.npz and unsealed.json (--data reads it)")
    u.add_argument("--overwrite", action="store_true")
    u.set_defaults(func=cmd_unseal)

    b = sub.add_parser("benchmark", help="run (or resume) an experiment grid from a TOML config")
    b.add_argument("config", help="a benchmark config, e.g. configs/table1-cpu.toml")
    b.add_argument("--out", help="run folder (default runs/<config name>); rerun to resume")
    b.add_argument("--data", help="override the config's data source (same experiment, other location)")
    b.add_argument("--device", default=None, help="auto, cpu or cuda (default: the config's)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--root", default=None, help="torchvision data root for cifar10/cifar100")
    b.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="train only this worker's fixed part of the grid's networks (I from 0 to N-1), e.g. "
                   "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; workers sharing --out never train a network "
                   "twice, with or without shards")
    b.add_argument("--claim-timeout", type=float, default=CLAIM_TIMEOUT, metavar="SECONDS",
                   help="a worker's claim on a piece of work without a heartbeat for this long (its worker died) "
                   "is taken over by another (default %(default)s)")
    b.set_defaults(func=cmd_benchmark)

    r = sub.add_parser("report", help="tables and figures from a benchmark run folder (never retrains)")
    r.add_argument("run_dir")
    r.add_argument("--out", help="report folder (default <run_dir>/report)")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="clean vs the sealed patch vs UGE on the built-in synthetic shapes, in one "
                       "table (CPU, about 2 minutes on 2 idle cores)")
    d.add_argument("--out", default="uge-demo", help="output folder (default ./uge-demo)")
    _add_common(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``uge`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s")
    try:
        with _process_group(args):
            return args.func(args)
    except UGEError as e:
        print(f"uge: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 1 for a sealed set that cannot be opened (uge.sealing.SealError)
    except KeyboardInterrupt:
        print("uge: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated as e:
        print("uge: terminated (SIGTERM); its claims are released: rerun the same command to resume", file=sys.stderr)
        return e.code


def _process_group(args):
    """torchrun's process group for the commands that train on several processes (``processes`` among their
    defaults: train, evaluate, protect with UGE); any other command under torchrun is refused rather than run N
    times."""
    if getattr(args, "processes", False):
        if not distributed.is_main():  # one log: rank 0's
            logging.getLogger("uge").setLevel(logging.WARNING)
        return distributed.session(args.device)
    if distributed.launched():
        raise ConfigError(f"uge {args.command} runs in one process; under torchrun only train, evaluate and protect "
                          "(UGE) run (every process would do the whole work and write the same files)")
    return contextlib.nullcontext()


if __name__ == "__main__":
    sys.exit(main())
