"""imagenetpp command line. Heavy libraries load inside the commands, not at start-up."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shards.fetch import USER_AGENT

from .errors import PartialFailure, UserError

DESCRIPTION = """Build class-balanced ImageNet-sized training-data shifts with per-sample
provenance. Start with `imagenetpp demo`; `imagenetpp COMMAND --help` for each command."""
# Shipped configs (configs/), found wherever the package is installed: one per curator path.
DEMO_CONFIGS = (
    "demo_knn_img",
    "demo_knn_url",
    "demo_caption_search",
    "demo_sd_txt2img",
    "demo_sd_img2img",
)


class _Formatter(argparse.HelpFormatter):
    """Shows each option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming it (exit 2), like every other user error."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"imagenetpp: error: {message} (see '{self.prog} --help')\n")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def _at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Counts a user gives on the command line (None: not given, the default applies)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set or [])
    if args.ray_address:
        sets.append(f"run.ray_address={args.ray_address}")
    if args.executor:
        sets.append(f"run.executor={args.executor}")
    if args.workers is not None:
        sets.append(f"run.workers={args.workers}")
    if args.no_progress:
        sets.append("run.progress=false")
    if getattr(args, "no_report", False) or os.environ.get("IMAGENETPP_NO_REPORT"):
        sets.append("report.after_curate=false")
    return sets


def cmd_curate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .curate import curate
    from .executor import check_ray_address
    from .finalize import no_sample_reason, summary_table
    from .workdir import check_output

    # Everything the user typed is checked before anything is built or written.
    config = load_config(args.config, _overrides(args), check_resources=False)
    out = Path(args.out or config.run.out)
    check_output(out / config.shift)
    if config.run.executor == "ray":
        check_ray_address(config.run.ray_address)
    config = load_config(args.config, _overrides(args))
    manifest = curate(config, out)
    print(summary_table(manifest))
    print(f"shards: {out / config.shift / 'shards'}")
    if config.report.after_curate and manifest["total_samples"]:
        print(f"report: {out / config.shift / 'report' / 'index.html'}")
    for skip in manifest.get("sources_skipped", []):
        print(f"imagenetpp: warning: source unit {skip['unit']} unreadable, skipped: {skip['reason']}", file=sys.stderr)  # fmt: skip
    if manifest["total_samples"] == 0:
        print(f"imagenetpp: error: no sample kept: {no_sample_reason(manifest)}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Every demo shift (one per curator path) on the demo world, then a side-by-side table.
    The demo pool is served on a loopback port for the URL shift's acquire stage."""
    from .config import load_config
    from .curate import curate
    from .demo_world import DEMO_POOL_HOST, ensure_demo_world, serve_pool
    from .errors import ConfigError
    from .executor import check_ray_address, make_executor
    from .finalize import summary_table
    from .report import compare_html, compare_table, load_metrics
    from .workdir import check_output

    out = Path(args.out)
    names = DEMO_CONFIGS
    if args.only:
        names = tuple(n.strip().removesuffix(".yaml") for n in args.only.split(",") if n.strip())
        unknown = [n for n in names if n not in DEMO_CONFIGS]
        if unknown or not names:
            raise ConfigError(f"--only: unknown demo shift {(unknown or [''])[0]!r} (known: {', '.join(DEMO_CONFIGS)})")  # fmt: skip
    configs = [load_config(name, _overrides(args), check_resources=False) for name in names]
    for config in configs:  # everything typed is checked before the world is built
        check_output(out / config.shift)
    if configs[0].run.executor == "ray":
        check_ray_address(configs[0].run.ray_address)
    manifests = []
    with serve_pool(ensure_demo_world()) as address:
        run = configs[0].run  # the same for every demo shift: one Ray serves them all
        executor = make_executor(run.executor, run.ray_address, run.workers, run.progress)
        try:
            for name in names:
                config = load_config(name, _overrides(args))
                config.run.resolve = {DEMO_POOL_HOST: address}  # how to reach it: not hashed
                print(f"== {config.shift} ({name}.yaml)", flush=True)
                manifests.append(curate(config, out, executor))
                print(summary_table(manifests[-1]))
                print(f"shards: {out / config.shift / 'shards'}\n", flush=True)
        finally:
            executor.shutdown()
    reported = [(out / m["shift"] / "report" / "metrics.json").is_file() for m in manifests]
    metrics = [load_metrics(out / m["shift"]) if r else None for m, r in zip(manifests, reported, strict=True)]  # fmt: skip
    print(compare_table(manifests, metrics))
    links = [f"{m['shift']}/report/index.html" for m in manifests]
    (out / "compare.html").write_text(compare_html(manifests, metrics, links), "utf-8")
    print(f"\nreports: {out}/<shift>/report/index.html; side by side: {out / 'compare.html'}")
    return 0 if all(m["total_samples"] for m in manifests) else 1


def cmd_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .demo_world import demo_world_ready
    from .workdir import check_output

    config = load_config(args.config, _overrides(args), check_resources=False)
    check_output(Path(args.out or config.run.out) / config.shift)
    if config.curator.demo_params and not demo_world_ready():
        resources = "demo world not built yet (curate builds it once)"
    else:
        config = load_config(args.config, _overrides(args))
        resources = "found"
    classes = config.classes
    n = len(classes.wnids) if classes.wnids else classes.first or 1000
    print(
        f"{args.config}: OK (shift {config.shift}, curator {config.curator.name}, "
        f"{_plural(n, 'class')} x {config.target_per_class}, config hash {config.content_hash()}; "
        f"resources {resources})"
    )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from curators.knn_index import group_stats_warning

    from .executor import make_executor
    from .index_pool import build_index, plan_index

    if not 0.0 < args.dedup_cosine <= 1.0:
        raise UserError(f"--dedup-cosine must lie in (0, 1], got {args.dedup_cosine}")
    _at_least_one(args, "batch_size", "workers")
    # Pool, weights (cache, hub) and factory are checked before Ray or any model starts.
    plan = plan_index(args.pool, args.model, args.pretrained, args.factory, args.pool_name)
    kind = args.executor
    if kind == "auto":
        import torch

        cluster = args.ray_address or os.environ.get("RAY_ADDRESS")
        kind = "ray" if cluster or torch.cuda.device_count() > 1 else "local"
    executor = make_executor(kind, args.ray_address, args.workers, not args.no_progress)
    try:
        info = build_index(
            executor, args.pool, args.out, args.model, args.pretrained, args.factory,
            args.batch_size, args.device, dedup_cosine=args.dedup_cosine, plan=plan,
        )  # fmt: skip
    finally:
        executor.shutdown()
    print(
        f"index: {args.out} ({info.count} images, {info.skipped} skipped, dim {info.dim}, {info.factory})"
    )
    stats = info.dedup_stats
    if stats:
        sizes = ", ".join(f"{name}: {n}" for name, n in stats["sizes"].items())
        print(
            f"near-duplicate groups (cosine >= {info.dedup_cosine}): {stats['groups']} groups, "
            f"by size {sizes}; largest {stats['largest']}"
        )
        warning = group_stats_warning(stats, info.dedup_cosine)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from shards.verify import NotAShift, verify_shift

    if not Path(args.shift_dir).is_dir():
        raise UserError(f"no such shift folder: {args.shift_dir}")
    from .executor import RowProgress

    shards = len(list((Path(args.shift_dir) / "shards").glob("*.tar")))
    show = not args.no_progress and sys.stderr.isatty()
    try:
        with RowProgress("verify", shards, show, unit="shard") as bar:
            report = verify_shift(args.shift_dir, progress=bar)
    except NotAShift as e:
        raise UserError(str(e)) from None
    for p in report.problems:
        print(p)
    checked = f"{_plural(report.shards, 'shard')}, {_plural(report.samples, 'sample')} checked"
    if report.ok:
        print(f"{args.shift_dir}: OK ({checked})")
        return 0
    print(f"{args.shift_dir}: {_plural(len(report.problems), 'problem')} ({checked})")
    return 1


def cmd_download(args: argparse.Namespace) -> int:
    from shards.fetch import OPT_OUT, FetchPolicy
    from shards.images import ImagePolicy

    from .config import _is_network
    from .download import DownloadOptions, ListSpec, download

    bad = next((n for n in args.allow_network or [] if not _is_network(n)), None)
    if bad is not None:
        raise UserError(f"--allow-network {bad!r} is not a CIDR network, e.g. 127.0.0.1/32")
    _at_least_one(args, "shard_size", "threads", "per_host", "image_size", "max_bytes_mb")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be more than 0 seconds, got {args.timeout}")
    if args.retries < 0:
        raise UserError(f"--retries must be 0 or more, got {args.retries}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError("--jpeg-quality must lie in 1..100")
    if args.processes < 0:
        raise UserError("--processes must be 0 (one per core) or more")
    if args.shard_size > 100_000:
        raise UserError("--shard-size must be at most 100000")
    spec = ListSpec(
        args.url_col, args.caption_col or None,
        tuple(c for c in (args.extra_cols or "").split(",") if c), args.input_format,
    )  # fmt: skip
    options = DownloadOptions(
        shard_size=args.shard_size, threads=args.threads, processes=args.processes,
        retry_failed=args.retry_failed,
        fetch=FetchPolicy(
            read_timeout=args.timeout, retries=args.retries, per_host=args.per_host,
            max_bytes=args.max_bytes_mb << 20, max_redirects=args.max_redirects,
            user_agent=args.user_agent, allow_private=args.allow_private,
            allow_networks=tuple(args.allow_network or ()),
            opt_out=() if args.ignore_opt_out else OPT_OUT,
        ),
        image=ImagePolicy(args.resize_mode, args.image_size, args.jpeg_quality),
    )  # fmt: skip
    totals = download(args.url_list, args.out, spec, options, not args.no_progress)
    errors = {k.split(":", 1)[1]: n for k, n in totals.items() if k.startswith("error:")}
    rows = totals.get("rows", 0)
    line = f"{args.out}: {totals.get('samples', 0)} / {rows} images in {_plural(totals['shards'], 'shard')}"
    if totals.get("skipped_shards"):
        line += f" ({totals['skipped_shards']} finished before, skipped)"
    if errors:
        line += "; failures this run: " + ", ".join(f"{k} {n}" for k, n in sorted(errors.items()))
    print(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report_options, write_report
    from .report.build import ShiftFiles

    if args.contamination_cosine is not None and not 0 < args.contamination_cosine <= 1:
        raise UserError(f"--contamination-cosine must lie in (0, 1], got {args.contamination_cosine}")  # fmt: skip
    if args.phash_max_distance is not None and not 0 <= args.phash_max_distance <= 64:
        raise UserError(f"--phash-max-distance must lie in 0..64, got {args.phash_max_distance}")
    _at_least_one(args, "batch_size")
    shift = ShiftFiles.open(args.shift_dir)  # one line if it is not a shift
    options = report_options(
        shift.manifest, reference=args.reference, eval_sets=args.eval_set,
        contact_classes=args.contact_classes.split(",") if args.contact_classes else None,
        contamination_cosine=args.contamination_cosine, phash_max_distance=args.phash_max_distance,
    )  # fmt: skip
    known = {c["wnid"] for c in shift.manifest["per_class"]}
    unknown = [w for w in options.contact_classes if w not in known]
    if unknown:
        raise UserError(f"--contact-classes: {unknown[0]} is not a class of this shift")
    report = write_report(args.shift_dir, options, args.device, args.batch_size)
    for note in report.notes:
        print(f"note: {note}")
    print(_report_summary(report.metrics))
    print(f"report: {report.folder / 'index.html'}")
    return 0


def _report_summary(metrics: dict) -> str:
    c = metrics["classes"]
    line = (
        f"{metrics['shift']}: {metrics['samples']} samples; classes covered {c['covered']}/"
        f"{c['classes']}, LT@500 {c['lt500']}, LS@5pct {c['ls5pct']:.3f}"
    )
    if "clipscore" in metrics:
        line += f"; CLIPScore {metrics['clipscore']['mean']:.1f}"
    if "diversity" in metrics:
        d = metrics["diversity"]
        line += f"; intra-class cosine {d['mean_intra_class_cosine']:.3f}, near-duplicates {d['near_duplicate_rate']:.1%}"  # fmt: skip
    if "reference" in metrics:
        line += f"; CMMD {metrics['reference']['cmmd']:.3f}"
    if "contamination" in metrics:
        line += f"; contaminated samples {metrics['contamination']['samples']}"
    return line


def cmd_compare(args: argparse.Namespace) -> int:
    from shards.manifest import read_manifest

    from .report import compare_html, compare_table, load_metrics

    manifests, metrics = [], []
    for folder in args.shift_dirs:
        if not (Path(folder) / "manifest.json").is_file():
            raise UserError(f"not a finished shift folder (no manifest.json): {folder}")
        manifests.append(read_manifest(folder))
        metrics.append(load_metrics(folder))
    print(compare_table(manifests, metrics))
    if args.html:
        base = Path(args.html).resolve().parent
        links = [os.path.relpath(Path(f).resolve() / "report" / "index.html", base) for f in args.shift_dirs]  # fmt: skip
        Path(args.html).write_text(compare_html(manifests, metrics, links), "utf-8")
        print(f"compare: {args.html}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from shards.publish import PublishError, publish

    _at_least_one(args, "files_per_commit")
    try:
        plan = publish(
            args.shift_dir, args.repo_id, private=args.private, revision=args.revision,
            dry_run=args.dry_run, max_files_per_commit=args.files_per_commit,
        )  # fmt: skip
    except PublishError as e:
        raise UserError(str(e)) from None
    where = f"{args.repo_id}@{args.revision or 'main'}"
    size = sum(f.size for f in plan.changed) / 1e6
    if args.dry_run:
        for f in plan.changed:
            print(f"{f.path_in_repo}  {f.size} bytes")
        print(f"dry run: {len(plan.changed)} files ({size:.1f} MB) would go to {where}; {plan.unchanged} already there")  # fmt: skip
        return 0
    print(f"published {args.shift_dir} to {where}: {len(plan.changed)} files sent ({size:.1f} MB), {plan.unchanged} already there")  # fmt: skip
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .curate import status_report

    print("\n".join(status_report(Path(args.shift_dir))))
    return 0


def _run_options(p: argparse.ArgumentParser, auto: bool = False) -> None:
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")  # fmt: skip
    if auto:
        p.add_argument("--executor", choices=["auto", "ray", "local"], default="auto",
                       help="where units run. auto: Ray when a cluster is given or several GPUs "
                       "are visible, else this process (one process already keeps every core "
                       "busy encoding, and skips Ray's and each worker's start-up)")  # fmt: skip
    else:
        p.add_argument("--executor", choices=["ray", "local"],
                       help="where units run: Ray actors, or one after another in this process "
                       "(default: run.executor of the config, ray)")  # fmt: skip
    p.add_argument("--workers", type=int, metavar="N",
                   help="parallel workers per stage (default: the CPUs Ray sees)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imagenetpp", description=DESCRIPTION)
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    p = sub.add_parser("curate", help="make (or resume) a shift from a config")
    p.add_argument("config", help="shift config (YAML), e.g. configs/la1000_img2img.yaml")
    p.add_argument(
        "--out", help="output root; the shift goes to OUT/<shift> (default: run.out of the config)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-report", action="store_true",
                   help="do not write report/ at the end (run `imagenetpp report` later); "
                   "so does IMAGENETPP_NO_REPORT=1")  # fmt: skip
    _run_options(p)
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser(
        "check", help="validate a config and the resources it names, without running anything"
    )
    p.add_argument("config", help="shift config (YAML)")
    p.add_argument("--out", help="output root to check (default: run.out of the config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    _run_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "demo", help="build the offline demo world (once), curate its shifts, compare them"
    )
    p.add_argument("--out", default="out/demo", help="output root")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a key of the demo config"
    )
    p.add_argument(
        "--only", metavar="NAME[,NAME]",
        help=f"curate only these demo shifts (default: all of {', '.join(DEMO_CONFIGS)})",
    )  # fmt: skip
    _run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="embed an image-text webdataset pool and build a faiss index")
    p.add_argument("pool", help="folder of .tar shards, a glob, or a brace pattern")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument(
        "--pool-name", help="the pool's name in provenance (default: the folder of its shards)"
    )
    p.add_argument("--model", default="ViT-L-14", help="open_clip model name or config .json")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip tag, local checkpoint, or 'random' (untrained, seed 0)")  # fmt: skip
    p.add_argument(
        "--factory", default="Flat", help="faiss index factory string, e.g. IVF4096,PQ64"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dedup-cosine", type=float, default=0.95,
                   help="group near-duplicate pool images at this cosine (1.0: off); a shift keeps one per group")  # fmt: skip
    p.add_argument("--device", default="auto")
    _run_options(p, auto=True)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "download", help="download a URL list into an img2dataset-compatible webdataset pool"
    )
    p.add_argument("url_list", help="parquet, CSV, TSV, JSONL or TXT file, or a folder of them")
    p.add_argument("--out", required=True, help="pool folder (NNNNN.tar/.parquet/_stats.json)")
    p.add_argument("--url-col", default="url", help="column holding the URL")
    p.add_argument(
        "--caption-col", default="caption", help="column holding the caption ('' for none)"
    )
    p.add_argument("--extra-cols", help="comma-separated columns copied into each sample's json")
    p.add_argument("--input-format", choices=["parquet", "csv", "tsv", "jsonl", "txt"],
                   help="(default: from each file's extension)")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=10_000, help="rows per shard")
    p.add_argument("--threads", type=int, default=32, help="URLs in flight, over all processes")
    p.add_argument("--processes", type=int, default=0,
                   help="worker processes fetching and resizing (0: one per usable core)")  # fmt: skip
    p.add_argument("--per-host", type=int, default=16, help="URLs in flight to one host")
    p.add_argument("--timeout", type=float, default=10.0, help="read timeout, seconds")
    p.add_argument(
        "--retries", type=int, default=2, help="on timeouts, 429, 5xx, connection errors"
    )
    p.add_argument("--max-bytes-mb", type=int, default=20, help="largest body accepted")
    p.add_argument("--max-redirects", type=int, default=5)
    p.add_argument("--user-agent", default=USER_AGENT)
    p.add_argument("--resize-mode", default="keep_ratio_largest",
                   choices=["keep_ratio", "keep_ratio_largest", "center_crop", "border", "no"])  # fmt: skip
    p.add_argument("--image-size", type=int, default=512, help="target side (see --resize-mode)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--allow-private", action="store_true",
                   help="allow private, loopback and link-local hosts (refused by default)")  # fmt: skip
    p.add_argument("--allow-network", action="append", metavar="CIDR",
                   help="allow this network even if private (repeatable)")  # fmt: skip
    p.add_argument("--ignore-opt-out", action="store_true",
                   help="fetch images whose X-Robots-Tag says noai / noimageai / none")  # fmt: skip
    p.add_argument("--retry-failed", action="store_true",
                   help="in finished shards, fetch again the rows that failed transiently")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "report", help="a shift's metrics, plots and contamination check: OUT/<shift>/report/"
    )
    p.add_argument("shift_dir", help="a finished shift's folder, OUT/<shift>")
    p.add_argument("--reference", metavar="DIR",
                   help="images to measure CMMD against (<wnid>/ folders: per class too)")  # fmt: skip
    p.add_argument("--eval-set", action="append", metavar="DIR",
                   help="evaluation images to look for near-duplicates of (repeatable)")  # fmt: skip
    p.add_argument("--contact-classes", metavar="WNID[,WNID]", help="classes on the contact sheet")
    p.add_argument("--contamination-cosine", type=float, metavar="C",
                   help="an eval image this close (CLIP cosine) to a sample is a near-duplicate "
                   "(default: report.contamination_cosine of the shift's config, 0.95)")  # fmt: skip
    p.add_argument("--phash-max-distance", type=int, metavar="BITS",
                   help="... or one whose perceptual hash differs in at most this many of 64 bits "
                   "(default: report.phash_max_distance, 4)")  # fmt: skip
    p.add_argument("--device", default="auto", help="for the CLIP model")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="metrics of several shifts side by side")
    p.add_argument("shift_dirs", nargs="+", metavar="SHIFT_DIR", help="finished shift folders")
    p.add_argument("--html", metavar="FILE", help="also write the table as an HTML page")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "publish",
        help="upload a finished shift (shards, index, report, card) to the Hugging Face Hub",
    )
    p.add_argument("shift_dir", help="a finished shift's folder, OUT/<shift>")
    p.add_argument("--repo-id", required=True, metavar="NS/NAME", help="dataset repo on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default: main)")
    p.add_argument("--dry-run", action="store_true", help="list what would go; upload nothing")
    p.add_argument("--files-per-commit", type=int, default=100,
                   help="large shifts go in several commits of at most this many files")  # fmt: skip
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("status", help="how far a shift's run has got (committed units per stage)")
    p.add_argument("shift_dir", help="a shift's output folder, OUT/<shift>")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "verify", help="re-read a shift's shards and check them against its manifest and index"
    )
    p.add_argument("shift_dir", help="a shift's output folder, OUT/<shift>")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:  # ResourceError and ConfigError too
        print(f"imagenetpp: error: {e}", file=sys.stderr)
        return 2
    except PartialFailure as e:
        print(f"imagenetpp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imagenetpp: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.exit(main())
