"""imagenetpp command line. Heavy libraries load inside the commands, not at start-up."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_knn_img.yaml"


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set or [])
    if args.ray_address:
        sets.append(f"run.ray_address={args.ray_address}")
    if args.executor:
        sets.append(f"run.executor={args.executor}")
    if args.workers:
        sets.append(f"run.workers={args.workers}")
    if args.no_progress:
        sets.append("run.progress=false")
    return sets


def cmd_curate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .curate import curate
    from .finalize import summary_table

    config = load_config(args.config, _overrides(args))
    out = Path(args.out or config.run.out)
    manifest = curate(config, out)
    print(summary_table(manifest))
    print(f"shards: {out / config.shift / 'shards'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo_world import ensure_demo_world

    ensure_demo_world()
    args.config = str(DEMO_CONFIG)
    return cmd_curate(args)


def cmd_index(args: argparse.Namespace) -> int:
    from .executor import make_executor
    from .index_pool import build_index

    if not 0.0 < args.dedup_cosine <= 1.0:
        raise UserError(f"--dedup-cosine must lie in (0, 1], got {args.dedup_cosine}")
    executor = make_executor(
        args.executor or "ray", args.ray_address, args.workers, not args.no_progress
    )
    try:
        info = build_index(
            executor, args.pool, args.out, args.model, args.pretrained, args.factory,
            args.batch_size, args.device, dedup_cosine=args.dedup_cosine,
        )  # fmt: skip
    finally:
        executor.shutdown()
    print(
        f"index: {args.out} ({info.count} images, {info.skipped} skipped, dim {info.dim}, {info.factory})"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from shards.verify import verify_shift

    if not Path(args.shift_dir).is_dir():
        raise UserError(f"no such shift folder: {args.shift_dir}")
    problems = verify_shift(args.shift_dir)
    for p in problems:
        print(p)
    print(f"{args.shift_dir}: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


def cmd_status(args: argparse.Namespace) -> int:
    from .workdir import progress_report

    print("\n".join(progress_report(Path(args.shift_dir))))
    return 0


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local one)"
    )
    p.add_argument("--executor", choices=["ray", "local"], help="where units run (default: ray)")
    p.add_argument("--workers", type=int, help="parallel workers per stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagenetpp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("curate", help="make (or resume) a shift from a config")
    p.add_argument("config")
    p.add_argument("--out", help="output root (default: run.out of the config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    _run_options(p)
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("demo", help="build the offline demo world (once) and curate its shift")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    _run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="embed an image-text webdataset pool and build a faiss index")
    p.add_argument("pool", help="folder of .tar shards, or a glob")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--model", default="ViT-L-14", help="open_clip model name or config .json")
    p.add_argument("--pretrained", default="openai", help="open_clip tag or local checkpoint")
    p.add_argument(
        "--factory", default="Flat", help="faiss index factory string, e.g. IVF4096,PQ64"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dedup-cosine", type=float, default=0.95,
                   help="group near-duplicate pool images at this cosine (1.0: off); a shift keeps one per group")  # fmt: skip
    p.add_argument("--device", default="auto")
    _run_options(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("status", help="how far a shift's run has got (committed units per stage)")
    p.add_argument("shift_dir")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "verify", help="re-read a shift's shards and check them against its manifest"
    )
    p.add_argument("shift_dir")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    from curators.base import ResourceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ResourceError) as e:
        print(f"imagenetpp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagenetpp: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.exit(main())
