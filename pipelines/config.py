"""Shift configs: YAML in, validated dataclasses out; every error names its key.

    shift: la1000-img2img           # name of the shift (and of its output folder)
    seed: 0
    classes: all                    # or {first: N} or {wnids: [n01440764, ...]}
    target_per_class: 1300
    curator: {name: clip_knn, params: {...}}   # params checked by the curator's dataclass
    select: {near_duplicate_cosine: 0.95}
    shards: {samples_per_shard: 1000}
    image: {max_side: 512, jpeg_quality: 90}
    acquire: {allow_private: false, threads: 16}   # how URL candidates are fetched
    run: {out: out, executor: ray, ray_address: null, workers: null}

Paths in curator params may start with ``demo:`` to name a part of the embedded demo world.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import ipaddress
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shards.fetch import OPT_OUT, USER_AGENT, FetchPolicy

from .errors import ConfigError


@dataclass
class ClassesConfig:
    first: int | None = None
    wnids: list[str] | None = None


@dataclass
class CuratorConfig:
    name: str
    params: Any = None  # the curator's params dataclass, once validated
    # Params given as `demo:` names, hashed as named: the demo world's absolute location on
    # this machine must not change the shards' bytes (their config_hash).
    demo_params: dict[str, str] = field(default_factory=dict)


@dataclass
class SelectConfig:
    near_duplicate_cosine: float = 0.95  # drop a candidate this similar to a kept one; 1.0 = off
    # Evaluation-set image folders (ImageNet-val, -V2, ...): a candidate whose CLIP embedding
    # lies this close to any of their images is dropped before balancing, so a held-out set
    # stays held out. Hashed as written (a `demo:` name, or the folder's path).
    exclude: list[str] = field(default_factory=list)
    exclude_cosine: float = 0.95
    # ... or whose 64-bit perceptual hash differs from one's in at most this many bits (as
    # report's phash_max_distance; null: off). Hashes the candidates a class would keep.
    exclude_phash_distance: int | None = 4


@dataclass
class EmbedConfig:
    # The shift's CLIP model, for candidates a curator returns without an embedding
    # (generated, scanned, fetched): near-duplicate removal and the shift's embeddings need it.
    model: str | None = None
    pretrained: str | None = None
    batch_size: int = 64
    device: str = "auto"


@dataclass
class AcquireConfig:
    # How URL candidates are fetched (the acquire stage). Hashed: which URLs may be fetched
    # decides which images a shift holds.
    allow_private: bool = False  # private/loopback/link-local hosts (refused by default: SSRF)
    allow_networks: list[str] = field(default_factory=list)  # CIDRs allowed even if private
    threads: int = 16  # URLs in flight per worker
    per_host: int = 16  # in flight to one host
    timeout: float = 10.0  # read timeout, seconds
    retries: int = 2  # on timeouts, connection errors, 429 and 5xx
    respect_opt_out: bool = True  # X-Robots-Tag noai / noimageai / none
    user_agent: str = USER_AGENT

    def policy(self, resolve: dict[str, str] | None = None) -> FetchPolicy:
        return FetchPolicy(
            resolve=tuple(sorted((resolve or {}).items())),
            read_timeout=self.timeout, retries=self.retries, per_host=self.per_host,
            allow_private=self.allow_private, allow_networks=tuple(self.allow_networks),
            opt_out=OPT_OUT if self.respect_opt_out else (), user_agent=self.user_agent,
        )  # fmt: skip


@dataclass
class ShardsConfig:
    samples_per_shard: int = 1000


@dataclass
class ImageConfig:
    max_side: int = 512
    jpeg_quality: int = 90


@dataclass
class ReportConfig:
    # What `imagenetpp report` measures beyond the shift's own counts. Not hashed: reading a
    # finished shift changes none of its bytes. Folders may be `demo:` names.
    after_curate: bool = True  # curate ends by writing report/
    reference: str | None = None  # images to measure CMMD against; <wnid>/ folders: per class too
    eval_sets: list[str] = field(default_factory=list)  # folders checked for contamination
    contact_classes: list[str] = field(default_factory=list)  # wnids (default: the first 8)
    contact_per_class: int = 8
    prompt: str = "a photo of a {name}."  # CLIPScore's text per class: {name}, {wnid}
    near_duplicate_cosine: float = 0.95  # diversity: a sample this close to another of its class
    contamination_cosine: float = 0.95  # an eval image this close to a sample is a duplicate
    phash_max_distance: int | None = 4  # ... or one whose 64-bit perceptual hash is (null: off)
    cmmd_max_samples: int = 10_000  # CMMD compares a seeded sample of the shift this large


@dataclass
class RunConfig:
    # Where and how to run: none of it changes a shard's bytes, so none of it is hashed.
    out: str = "out"
    executor: Literal["ray", "local"] = "ray"
    ray_address: str | None = None
    workers: int | None = None  # parallel workers per stage; default: the CPUs Ray sees
    progress: bool = True
    # host -> "ip:port" for fetching URL candidates (as curl --resolve): a mirror answers for
    # the host the URLs name; the demo serves its pool this way
    resolve: dict[str, str] = field(default_factory=dict)


@dataclass
class ShiftConfig:
    shift: str
    curator: CuratorConfig
    seed: int = 0
    classes: ClassesConfig = field(default_factory=ClassesConfig)
    target_per_class: int = 1300
    select: SelectConfig = field(default_factory=SelectConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    acquire: AcquireConfig = field(default_factory=AcquireConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """Hash of everything that decides the shards' bytes (not where or how it ran)."""
        data = self.to_dict()
        data.pop("run")
        data.pop("report")
        curator = data["curator"]
        curator["params"].update(curator.pop("demo_params"))
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**63, "must lie in 0..2**63-1"),
    "target_per_class": (lambda v: v >= 1, "must be at least 1"),
    "classes.first": (lambda v: 1 <= v <= 1000, "must lie in 1..1000"),
    "select.near_duplicate_cosine": (lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]"),
    "select.exclude_cosine": (lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]"),
    "select.exclude_phash_distance": (
        lambda v: v is None or 0 <= v <= 64,
        "must lie in 0..64 (or null: off)",
    ),
    "report.contact_per_class": (lambda v: 1 <= v <= 32, "must lie in 1..32"),
    "report.prompt": (
        lambda v: _is_template(v, {"name", "wnid"}),
        "must be text with {name} or {wnid} fields only",
    ),
    "report.near_duplicate_cosine": (lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]"),
    "report.contamination_cosine": (lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]"),
    "report.phash_max_distance": (
        lambda v: v is None or 0 <= v <= 64,
        "must lie in 0..64 (or null: off)",
    ),
    "report.cmmd_max_samples": (lambda v: v >= 10, "must be at least 10"),
    "shards.samples_per_shard": (lambda v: v >= 1, "must be at least 1"),
    "embed.batch_size": (lambda v: v >= 1, "must be at least 1"),
    "acquire.allow_networks": (
        lambda v: all(_is_network(n) for n in v),
        "must list CIDR networks, e.g. 127.0.0.1/32",
    ),
    "acquire.threads": (lambda v: v >= 1, "must be at least 1"),
    "acquire.per_host": (lambda v: v >= 1, "must be at least 1"),
    "acquire.timeout": (lambda v: v > 0, "must be positive"),
    "acquire.retries": (lambda v: 0 <= v <= 10, "must lie in 0..10"),
    "image.max_side": (lambda v: v >= 16, "must be at least 16"),
    "image.jpeg_quality": (lambda v: 1 <= v <= 100, "must lie in 1..100"),
    "run.workers": (lambda v: v is None or v >= 1, "must be at least 1"),
    "run.resolve": (
        lambda v: all(_is_host_port(a) for a in v.values()),
        "must map hosts to 'ip:port'",
    ),
    "classes.wnids": (lambda v: len(v) >= 1, "must list at least one wnid"),
    "shift": (
        lambda v: bool(v) and all(c.isalnum() or c in "-_" for c in v),
        "must be non-empty letters, digits, '-' or '_'",
    ),
}


def _is_template(text: str, fields: set[str]) -> bool:
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError:
        return False
    return names <= fields


def _is_host_port(text: object) -> bool:
    ip, _, port = str(text).rpartition(":")
    return _is_network(ip) and port.isdigit() and 0 < int(port) < 65536


def _is_network(text: object) -> bool:
    try:
        ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        return False
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list or tp is list:
        if isinstance(value, list):
            item = (typing.get_args(tp) or (Any,))[0]
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if isinstance(value, list | tuple):
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
                args = (args[0],) * len(value)
            elif not args:
                args = (Any,) * len(value)
            if len(args) == len(value):
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))  # fmt: skip
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            k_tp, v_tp = typing.get_args(tp) or (Any, Any)
            return {_coerce(k, k_tp, f"{key}.{k}"): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}  # fmt: skip
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build_dataclass(tp, value, key)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, data: dict, prefix: str = "") -> Any:
    """Build ``cls`` from a mapping, refusing unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{path}' (known here: {known})")
        kwargs[key] = _coerce(value, hints[key], path)
        check = CHECKS.get(path)
        if check and kwargs[key] is not None and not check[0](kwargs[key]):
            raise ConfigError(f"config key '{path}': {check[1]}, got {value!r}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # fmt: skip
            path = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"config key '{path}' is required")
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=c`` sets data["a"]["b"] to YAML-parsed c."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a mapping")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


def _demo_names(params: dict) -> dict[str, str]:
    return {k: v for k, v in params.items() if isinstance(v, str) and v.startswith("demo:")}


def _resolve_demo_paths(params: dict) -> dict:
    from .demo_world import resolve_demo_path

    return {**params, **{k: resolve_demo_path(v) for k, v in _demo_names(params).items()}}


def _check_classes(classes: ClassesConfig) -> None:
    from curators.labels import by_wnid

    if classes.first is not None and classes.wnids is not None:
        raise ConfigError("config key 'classes': give either 'first' or 'wnids', not both")
    seen: set[str] = set()
    known = by_wnid()
    for i, wnid in enumerate(classes.wnids or []):
        if wnid not in known:
            raise ConfigError(f"config key 'classes.wnids[{i}]': unknown wnid {wnid!r}")
        if wnid in seen:
            raise ConfigError(f"config key 'classes.wnids[{i}]': {wnid} is listed twice")
        seen.add(wnid)


def named_paths(config: ShiftConfig) -> dict[str, str]:
    """Config key -> folder of images, for the keys that name one (eval sets, reference), and
    a `demo:` CLIP checkpoint."""
    named = {f"select.exclude[{i}]": v for i, v in enumerate(config.select.exclude)}
    if config.embed.pretrained and config.embed.pretrained.startswith("demo:"):
        named["embed.pretrained"] = config.embed.pretrained  # checked as a name, as the others
    named |= {f"report.eval_sets[{i}]": v for i, v in enumerate(config.report.eval_sets)}
    if config.report.reference:
        named["report.reference"] = config.report.reference
    return named


def _check_named_paths(config: ShiftConfig, check_resources: bool) -> None:
    from curators.labels import by_wnid

    from .demo_world import check_demo_name

    for key, value in named_paths(config).items():
        if value.startswith("demo:"):
            try:
                check_demo_name(value)
            except ConfigError as e:
                raise ConfigError(f"config key '{key}': {e}") from None
        elif check_resources and not Path(value).expanduser().is_dir():
            raise ConfigError(f"config key '{key}': no such folder: {value}")
    known = by_wnid()
    for i, wnid in enumerate(config.report.contact_classes):
        if wnid not in known:
            raise ConfigError(f"config key 'report.contact_classes[{i}]': unknown wnid {wnid!r}")


def parse_config(data: Any, check_resources: bool = True) -> ShiftConfig:
    """Validate everything that needs no resource first (no side effects), then, when asked,
    the resources the curator names (building the demo world for ``demo:`` names)."""
    import curators

    if not isinstance(data, dict):
        raise ConfigError("config must be a YAML mapping")
    if data.get("classes") == "all":
        data = {**data, "classes": {}}
    curator = data.get("curator")
    if not isinstance(curator, dict) or "name" not in curator:
        raise ConfigError("config key 'curator.name' is required")
    try:
        params_cls = curators.params_type(curator["name"])
    except (KeyError, TypeError):
        names = ", ".join(sorted(curators.REGISTRY))
        raise ConfigError(
            f"config key 'curator.name': unknown curator {curator['name']!r} (known: {names})"
        ) from None
    raw_params = curator.get("params") or {}
    if not isinstance(raw_params, dict):
        raise ConfigError("config key 'curator.params': expected a mapping")
    extra = set(curator) - {"name", "params"}
    if extra:
        raise ConfigError(
            f"unknown config key 'curator.{sorted(extra)[0]}' (known here: name, params)"
        )
    demo_names = _demo_names(raw_params)
    for key, value in demo_names.items():
        from .demo_world import check_demo_name

        try:
            check_demo_name(value)
        except ConfigError as e:
            raise ConfigError(f"config key 'curator.params.{key}': {e}") from None
    # `demo:` names stay as written here: the world is built only once everything else holds.
    params = build_dataclass(params_cls, raw_params, "curator.params")
    rest = {k: v for k, v in data.items() if k != "curator"}
    config = build_dataclass(ShiftConfig, {**rest, "curator": {"name": curator["name"]}})
    _check_classes(config.classes)
    _check_named_paths(config, check_resources)
    config.curator.demo_params = demo_names
    if getattr(params, "images_per_class", 0) is None:  # a generator makes the target by default
        params.images_per_class = config.target_per_class
    if demo_names and hasattr(params, "check"):
        # Values are checked before the demo world is built (a minute, once): only the
        # problems of the `demo:` names themselves wait for it.
        for name, problem in params.check().items():
            if name not in demo_names:
                raise ConfigError(f"config key 'curator.params.{name}': {problem}")
    if check_resources:
        if demo_names:
            params = dataclasses.replace(params, **_resolve_demo_paths(_demo_names(raw_params)))
        if hasattr(params, "check"):
            for name, problem in params.check().items():
                raise ConfigError(f"config key 'curator.params.{name}': {problem}")
    config.curator.params = params
    return config


def resolve_config_path(path: str | Path) -> Path:
    """``path`` if it is a file; else a shipped config of that name (``configs/demo_knn_img.yaml``
    or ``demo_knn_img``), so the documented commands work where the package is installed
    without its source tree."""
    from configs import bundled, names

    path = Path(path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")) and (shipped := bundled(path.name)):
        return shipped
    raise ConfigError(f"config file not found: {path} (shipped configs: {', '.join(names())})")


def load_config(
    path: str | Path, overrides: list[str] = (), check_resources: bool = True
) -> ShiftConfig:
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a YAML mapping of keys, got {type(data).__name__}"
        )
    return parse_config(apply_overrides(data, list(overrides)), check_resources)
