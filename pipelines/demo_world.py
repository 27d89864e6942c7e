"""The embedded demo world: a tiny, offline stand-in for LAION + ImageNet-train + CLIP.

DEMO ONLY: it exercises the mechanics (index, retrieval, balancing, shards, resume), not the
quality of a real shift. Built deterministically from a seed and cached:

    <cache>/demo-world-v5-seed0/
      pool/pool-0000N.tar     img2dataset-style webdataset: <key>.jpg/.txt/.json
      exemplars/<wnid>/*.JPEG  ImageNet-train layout, the kNN queries
      model/                  imagenetpp-tiny open_clip checkpoint, trained on the pool
      index/                  `imagenetpp index` output over the pool
      url-index/              the same index in clip-retrieval's layout: URLs, no pixels
                              (served by serve_pool during the demo)
      ground_truth.parquet    hidden true class of every pool item (-1 for distractors)
      READY                   written last

Ten real ImageNet classes are drawn procedurally, each with its own visual motif; the pool
also has distractors, exact and near duplicates, corrupt files, and noisy captions (naming
the class, two classes, none, or the wrong one). One class is deliberately scarce.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import ConfigError, UserError

VERSION = 7
# (ImageNet index, pool items). Banana is scarce so the demo shows a shortfall.
DEMO_CLASSES = [(1, 240), (22, 240), (130, 240), (291, 240), (340, 240),
                (417, 240), (430, 240), (508, 240), (949, 240), (954, 60)]  # fmt: skip
DISTRACTORS = 360
CORRUPT = 3
EXEMPLARS = 20
SHARD_SIZE = 700
SIZE = 64
CAPTION_TEMPLATES = ("a photo of a {}", "a picture of a {}", "{} in the wild", "my {}",
                     "close-up of a {}", "the {} i saw today")  # fmt: skip
NO_CLASS_CAPTIONS = ("untitled", "a nice day", "photo", "IMG 2231", "view from the window")


DEMO_PARTS = ("index", "url-index", "exemplars", "pool", "model", "evalset", "ground_truth.parquet")  # fmt: skip
EVAL_PER_CLASS = (4, 6)  # the demo's evaluation set: pool images (leaked) and new ones, per class
# The host the URL index names: the demo serves the pool for it on a loopback port
# (run.resolve), so URLs, and the provenance recording them, never name the port.
DEMO_POOL_HOST = "demo-pool.invalid"
DEAD_EVERY = 25  # serve_pool answers 404 for one key in 25: acquire replaces them


def cache_dir() -> Path:
    """$IMAGENETPP_CACHE, else $XDG_CACHE_HOME/imagenetpp, else ~/.cache/imagenetpp: one
    place whatever folder the command runs from (the Makefile points it into the checkout)."""
    if os.environ.get("IMAGENETPP_CACHE"):
        return Path(os.environ["IMAGENETPP_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "imagenetpp").resolve()


def world_dir(seed: int = 0) -> Path:
    return cache_dir() / f"demo-world-v{VERSION}-seed{seed}"


def demo_world_ready(seed: int = 0) -> bool:
    return (world_dir(seed) / "READY").exists()


def check_demo_name(value: str) -> str:
    """The part a ``demo:`` name refers to; no side effect (the world is not built here)."""
    part = value.removeprefix("demo:")
    if part.split("/", 1)[0] not in DEMO_PARTS or ".." in part.split("/"):
        raise ConfigError(
            f"unknown demo resource {value!r} (known: {', '.join('demo:' + p for p in DEMO_PARTS)})"
        )
    return part


def resolve_demo_path(value: str) -> str:
    """``demo:index`` -> the path of that part of the demo world, building it if needed."""
    return str(ensure_demo_world() / check_demo_name(value))


# --- drawing ---------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, color: tuple, amount: int = 30) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _draw(motif: int, rng: np.random.Generator):
    """One 64x64 image of a class motif (0..9), or a distractor (-1)."""
    from PIL import Image, ImageDraw

    s = SIZE
    bgs = [(40, 90, 170), (150, 190, 230), (90, 150, 90), (200, 180, 120), (128, 128, 128),
           (170, 210, 240), (60, 40, 30), (30, 30, 35), (235, 235, 220), (80, 60, 120)]  # fmt: skip
    bg = _jitter(rng, bgs[motif] if motif >= 0 else tuple(rng.integers(0, 256, 3)), 25)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    cx, cy = s / 2 + rng.uniform(-8, 8), s / 2 + rng.uniform(-8, 8)
    r = s * rng.uniform(0.22, 0.32)
    if motif == 0:  # goldfish: orange ellipse with a tail
        d.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=_jitter(rng, (245, 130, 20)))
        d.polygon(
            [(cx + r, cy), (cx + 1.6 * r, cy - r / 2), (cx + 1.6 * r, cy + r / 2)],
            fill=_jitter(rng, (245, 130, 20)),
        )
    elif motif == 1:  # bald eagle: brown wings, white head
        d.polygon(
            [(cx - 1.5 * r, cy), (cx + 1.5 * r, cy), (cx, cy + r)], fill=_jitter(rng, (90, 55, 25))
        )
        d.ellipse([cx - r / 2, cy - r, cx + r / 2, cy], fill=_jitter(rng, (245, 245, 245), 10))
    elif motif == 2:  # flamingo: pink body on thin legs
        d.ellipse([cx - r, cy - r, cx + r / 2, cy], fill=_jitter(rng, (245, 120, 170)))
        for dx in (-r / 3, 0):
            d.line(
                [(cx + dx, cy), (cx + dx, cy + 1.5 * r)],
                fill=_jitter(rng, (245, 120, 170)),
                width=2,
            )
    elif motif == 3:  # lion: mane of rays around a tawny face
        for k in range(16):
            a = 2 * math.pi * k / 16
            d.line(
                [(cx, cy), (cx + 1.4 * r * math.cos(a), cy + 1.4 * r * math.sin(a))],
                fill=_jitter(rng, (150, 90, 30)),
                width=3,
            )
        d.ellipse(
            [cx - r / 1.5, cy - r / 1.5, cx + r / 1.5, cy + r / 1.5],
            fill=_jitter(rng, (215, 170, 80)),
        )
    elif motif == 4:  # zebra: black and white stripes, at a random angle and width
        w = int(rng.integers(3, 8))
        slant = int(rng.integers(-s // 2, s // 2))
        stripe = _jitter(rng, (15, 15, 15), 15)
        y0, y1 = rng.uniform(0, 20), rng.uniform(44, 64)
        for x in range(-s, 2 * s, 2 * w):
            d.polygon([(x, y0), (x + w, y0), (x + w + slant, y1), (x + slant, y1)], fill=stripe)
    elif motif == 5:  # balloons: coloured circles on strings
        for _ in range(int(rng.integers(2, 5))):
            bx, by, br = rng.uniform(10, 54), rng.uniform(8, 36), rng.uniform(6, 10)
            d.line([(bx, by + br), (bx, by + br + 18)], fill=(60, 60, 60), width=1)
            d.ellipse(
                [bx - br, by - br, bx + br, by + br],
                fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
            )
    elif motif == 6:  # basketball: orange disc with black seams
        d.ellipse(
            [cx - r, cy - r, cx + r, cy + r],
            fill=_jitter(rng, (230, 110, 20)),
            outline=(0, 0, 0),
            width=2,
        )
        d.line([(cx - r, cy), (cx + r, cy)], fill=(0, 0, 0), width=2)
        d.line([(cx, cy - r), (cx, cy + r)], fill=(0, 0, 0), width=2)
    elif motif == 7:  # keyboard: grid of grey keys, varying key size and layout
        key = _jitter(rng, (180, 180, 185), 30)
        pitch = int(rng.integers(6, 11))
        size = pitch - int(rng.integers(1, 3))
        ox, oy = int(rng.integers(0, pitch)), int(rng.integers(4, 20))
        for yy in range(oy, min(s - size, oy + pitch * int(rng.integers(3, 6))), pitch):
            for xx in range(ox, s - size, pitch):
                d.rectangle([xx, yy, xx + size, yy + size], fill=key)
    elif motif == 8:  # strawberry: red heart-ish triangle with seeds and green top
        d.polygon(
            [(cx - r, cy - r / 2), (cx + r, cy - r / 2), (cx, cy + r)],
            fill=_jitter(rng, (210, 20, 40)),
        )
        d.rectangle(
            [cx - r / 2, cy - r / 2 - 4, cx + r / 2, cy - r / 2], fill=_jitter(rng, (40, 160, 40))
        )
        for _ in range(8):
            sx, sy = cx + rng.uniform(-r / 2, r / 2), cy + rng.uniform(-r / 3, r / 3)
            d.point([(sx, sy)], fill=(250, 230, 60))
    elif motif == 9:  # banana: thick yellow arc
        d.arc(
            [cx - r, cy - r, cx + r, cy + r],
            start=20,
            end=160,
            fill=_jitter(rng, (245, 220, 40)),
            width=7,
        )
    else:  # distractor: random shapes in random colours
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.uniform(0, 48, 2)
            x1, y1 = x0 + rng.uniform(6, 24), y0 + rng.uniform(6, 24)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.rectangle if rng.random() < 0.5 else d.ellipse)([x0, y0, x1, y1], fill=fill)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (s, s, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jpeg(img, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _caption(rng: np.random.Generator, label_slot: int, names: list[str]) -> tuple[str, str]:
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    if label_slot < 0:
        if rng.random() < 0.5:
            return NO_CLASS_CAPTIONS[int(rng.integers(len(NO_CLASS_CAPTIONS)))], "none"
        return template.format(names[int(rng.integers(len(names)))]), "wrong"
    u = rng.random()
    if u < 0.7:
        return template.format(names[label_slot]), "class"
    if u < 0.8:
        other = names[(label_slot + 1 + int(rng.integers(len(names) - 1))) % len(names)]
        return f"a {names[label_slot]} and a {other}", "two"
    if u < 0.9:
        return NO_CLASS_CAPTIONS[int(rng.integers(len(NO_CLASS_CAPTIONS)))], "none"
    wrong = names[(label_slot + 1 + int(rng.integers(len(names) - 1))) % len(names)]
    return template.format(wrong), "wrong"


# --- building --------------------------------------------------------------------------------


def _write_pool(root: Path, seed: int, classes) -> list[dict]:
    """Pool shards plus ground truth rows. Returns the ground truth."""
    from shards.writer import ShardWriter

    rng = np.random.default_rng(seed)
    names = [c.name for c in classes]
    items = [slot for slot, (_, n) in enumerate(DEMO_CLASSES) for _ in range(n)] + [
        -1
    ] * DISTRACTORS
    items = [items[i] for i in rng.permutation(len(items))]
    records, made = [], []
    for slot in items:
        img = _draw(slot, rng)
        data = _jpeg(img)
        kind = "clean" if slot >= 0 else "distractor"
        u = rng.random()
        if made and u < 0.03:  # exact duplicate of an earlier item
            data, slot, kind = made[int(rng.integers(len(made)))] + ("exact_duplicate",)
        elif made and u < 0.06:  # near duplicate: same picture, re-encoded and brightened
            from PIL import Image, ImageEnhance

            src, slot = made[int(rng.integers(len(made)))]
            data = _jpeg(ImageEnhance.Brightness(Image.open(io.BytesIO(src))).enhance(1.04), 85)
            kind = "near_duplicate"
        made.append((data, slot))
        records.append((slot, data, kind))
    for j in range(CORRUPT):  # truncated JPEGs: a real pool always has some
        slot = j % len(DEMO_CLASSES)
        data = _jpeg(_draw(slot, rng))
        records.append((slot, data[: len(data) // 2], "corrupt"))
    truth, writer, shard = [], None, -1
    for i, (slot, data, kind) in enumerate(records):
        if i % SHARD_SIZE == 0:
            if writer:
                writer.close()
            shard += 1
            writer = ShardWriter(root / "pool" / f"pool-{shard:05d}.tar")
        key = f"{shard:05d}{i % SHARD_SIZE:04d}"
        caption, caption_kind = _caption(rng, slot, names)
        meta = {"key": key, "url": f"https://demo.invalid/{key}.jpg", "caption": caption,
                "license": "CC0-1.0 (synthetic demo)", "status": "success"}  # fmt: skip
        writer.write(key, {"jpg": data, "txt": caption.encode(), "json": json.dumps(meta).encode()})
        label = classes[slot].index if slot >= 0 else -1
        truth.append({"key": key, "label": label, "kind": kind, "caption_kind": caption_kind})
    writer.close()
    return truth


def _write_exemplars(root: Path, seed: int, classes) -> None:
    rng = np.random.default_rng(seed + 1_000_003)
    for slot, c in enumerate(classes):
        folder = root / "exemplars" / c.wnid
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(EXEMPLARS):
            (folder / f"{c.wnid}_{n}.JPEG").write_bytes(_jpeg(_draw(slot, rng)))


def _write_evalset(root: Path, seed: int, classes, truth: list[dict]) -> None:
    """A stand-in for ImageNet-val: per class, a few pool images made smaller and re-encoded
    (the leak a web-scale pool really has: shifts that pick them are contaminated) and new
    pictures of the class (not in the pool)."""
    from PIL import Image

    from shards.reader import iter_samples

    leaked, fresh = EVAL_PER_CLASS
    wanted: dict[str, int] = {}
    for slot, c in enumerate(classes):
        keys = [t["key"] for t in truth if t["label"] == c.index and t["kind"] == "clean"]
        wanted.update({k: slot for k in keys[:leaked]})
    for shard in sorted((root / "pool").glob("*.tar")):
        for key, files in iter_samples(shard):
            if key in wanted:
                c = classes[wanted[key]]
                img = Image.open(io.BytesIO(files["jpg"])).convert("RGB").resize((56, 56))
                folder = root / "evalset" / c.wnid
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"ILSVRC_val_leak_{key}.JPEG", quality=75)
    rng = np.random.default_rng(seed + 2_000_003)
    for slot, c in enumerate(classes):
        for n in range(fresh):
            (root / "evalset" / c.wnid / f"ILSVRC_val_{n:03d}.JPEG").write_bytes(
                _jpeg(_draw(slot, rng))
            )


def _quiet_random_init_warning():
    """open_clip warns 'No pretrained weights loaded' when building a model to train: expected
    here, and alarming on a user's terminal."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    return _Filter()


def train_tiny_clip(root: Path, seed: int, steps: int = 400, batch: int = 256, log=print) -> Path:
    """Contrastive training of imagenetpp-tiny on the pool's (image, caption) pairs.

    One thread: bit-identical weights on any machine, and no OpenMP spin-waiting when another
    process holds a core (two threads were 10x slower than one on a busy 2-core machine).
    """
    import logging

    import open_clip
    import torch
    import torch.nn.functional as F

    from curators.clip_models import resolve_model_name
    from shards.images import BadImage, decode
    from shards.reader import iter_samples

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    name = resolve_model_name("imagenetpp-tiny")
    quiet = _quiet_random_init_warning()
    logging.getLogger().addFilter(quiet)
    try:
        model, preprocess, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    tokenizer = open_clip.get_tokenizer(name)
    images, captions = [], []
    for shard in sorted((root / "pool").glob("*.tar")):
        for _, files in iter_samples(shard):
            try:
                images.append(preprocess(decode(files["jpg"])))
            except BadImage:
                continue
            captions.append(files["txt"].decode())
    pixels = torch.stack(images)
    # Captions repeat (templates x class names): each batch encodes its distinct ones once.
    vocab, caption_ids = np.unique(np.array(captions, dtype=object), return_inverse=True)
    tokens = tokenizer([str(c) for c in vocab])
    caption_ids = torch.from_numpy(caption_ids.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = last = time.monotonic()
    try:
        for step in range(steps):
            idx = torch.randint(0, len(pixels), (batch,), generator=gen)
            batch_px = pixels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            batch_px = torch.where(flip[:, None, None, None], batch_px.flip(-1), batch_px)
            img_f = F.normalize(model.encode_image(batch_px), dim=-1)
            distinct, inverse = torch.unique(caption_ids[idx], return_inverse=True)
            txt_f = F.normalize(model.encode_text(tokens[distinct]), dim=-1)[inverse]
            logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.T
            # Items that share a caption are positives for each other: soft targets.
            same = (inverse[:, None] == inverse[None, :]).float()
            target = same / same.sum(1, keepdim=True)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            now = time.monotonic()
            if now - last >= 5 or step == steps - 1:
                last = now
                rate = (step + 1) / (now - start)
                log(
                    f"  train tiny CLIP: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                    f"{rate:.1f} steps/s, {now - start:.0f}s elapsed, ETA {(steps - step - 1) / rate:.0f}s"
                )
    finally:
        torch.set_num_threads(threads)
    path = root / "model" / "imagenetpp-tiny.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def build_world(root: Path, seed: int, log=print) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curators import label_set

    from .executor import LocalExecutor
    from .index_pool import build_index

    table = label_set()
    classes = [table[i] for i, _ in DEMO_CLASSES]
    log(f"building the demo world in {root} (once; cached)")
    truth = _write_pool(root, seed, classes)
    pq.write_table(pa.Table.from_pylist(truth), root / "ground_truth.parquet")
    _write_exemplars(root, seed, classes)
    _write_evalset(root, seed, classes, truth)
    ckpt = train_tiny_clip(root, seed, log=log)
    log("  indexing the pool")
    build_index(LocalExecutor(progress=False), str(root / "pool"), root / "index",
                "imagenetpp-tiny", str(ckpt), factory="Flat", pool_name="demo-pool",
                dedup_cosine=0.995)  # fmt: skip
    _write_url_index(root)
    log("  building the tiny diffusion pipeline")
    from curators.diffusion_models import build_tiny_pipeline

    # About one output in ten comes out black from its safety checker: the demo shows them
    # replaced, as the published SD1000 img2img shift did not.
    build_tiny_pipeline(root / "model" / "tiny-sd", seed, size=SIZE, flagged=0.1)


def _write_url_index(root: Path) -> None:
    """The pool's index in clip-retrieval's published layout: image.index and metadata with
    url and caption only (no pool location, no embeddings), as LAION-5B's is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "url-index" / "metadata").mkdir(parents=True)
    shutil.copy(root / "index" / "image.index", root / "url-index" / "image.index")
    meta = _pool_metadata(root, ["key", "caption"])
    urls = [f"http://{DEMO_POOL_HOST}/pool/{k}.jpg" for k in meta["key"].to_pylist()]
    table = pa.table({"url": urls, "caption": meta["caption"], "key": meta["key"]})
    pq.write_table(table, root / "url-index" / "metadata" / "0_en.parquet")


def _pool_metadata(root: Path, columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted((root / "index" / "metadata").glob("metadata_*.parquet"))
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])


@contextmanager
def serve_pool(root: Path) -> Iterator[str]:
    """Serves GET /pool/<key>.jpg from the demo pool's tars on 127.0.0.1 (a free port), in a
    thread, while the block runs; yields "127.0.0.1:<port>" (for run.resolve). One key in
    DEAD_EVERY is a dead link (404), so the demo shows acquire replacing them."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    meta = _pool_metadata(root, ["key", "shard", "offset", "size"]).to_pylist()
    where = {r["key"]: (r["shard"], r["offset"], r["size"]) for r in meta}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            key = self.path.removeprefix("/pool/").removesuffix(".jpg")
            if key not in where or int(key) % DEAD_EVERY == 7:  # a crawl meets dead links
                self.send_error(404)
                return
            shard, offset, size = where[key]
            with open(shard, "rb") as f:
                f.seek(offset)
                body = f.read(size)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def ensure_demo_world(seed: int = 0, log=None) -> Path:
    """The demo world's folder, built first if needed. Concurrent callers wait for one builder."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    root = world_dir(seed)
    if (root / "READY").exists():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"demo cache {root.parent} (IMAGENETPP_CACHE) is not a writable folder: {e.strerror or e}"
        ) from None
    with open(root.parent / f".{root.name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            log(f"waiting for the demo world being built by {holder} in {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "READY").exists():
            lock.truncate(0)
            lock.write(f"pid {os.getpid()}\n")
            lock.flush()
            shutil.rmtree(root, ignore_errors=True)  # a build killed half-way
            root.mkdir(parents=True)
            build_world(root, seed, log=log)
            (root / "READY").write_text(f"demo world v{VERSION} seed {seed}\n")
    return root
