"""One loader for Stable-Diffusion-family pipelines: a hub id or a local folder, through
diffusers' ``from_pretrained``, with the scheduler named in the config.

``load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", "txt2img", "unipc")`` loads the
real weights; ``load_pipeline("<demo world>/model/tiny-sd", ...)`` loads the tiny pipeline the
project builds (:func:`build_tiny_pipeline`) along the very same path. Weights are described by
content (:func:`weights_digest`), never by location, so the same weights read the same
anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from functools import lru_cache
from pathlib import Path

from shards.fetch import host_port

from .base import ResourceError
from .clip_models import _hub_offline, _one_line, _reachable, resolve_device

# Config names -> diffusers scheduler classes (any class name below is accepted as well).
SCHEDULERS = {
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2s": "DPMSolverSinglestepScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "deis": "DEISMultistepScheduler",
}
MODES = ("txt2img", "img2img")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


def scheduler_class(name: str) -> str | None:
    """The diffusers class a config's scheduler name means; None if unknown."""
    if name in SCHEDULERS.values():
        return name
    return SCHEDULERS.get(name.lower())


def is_hub_id(model: str) -> bool:
    """An "owner/name" that is not an existing folder; anything else is a local path."""
    return bool(_HUB_ID.match(model)) and not Path(model).exists()


def check_model(model: str) -> str | None:
    """A one-line problem with ``model``, or None; no network unless a hub id is not cached."""
    if not is_hub_id(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            return f"no such model folder: {model}"
        if not (folder / "model_index.json").is_file():
            return f"{model} holds no model_index.json (a diffusers pipeline saved with save_pretrained)"  # fmt: skip
        return None
    if _cached_snapshot(model) is not None:
        return None
    from huggingface_hub import constants

    # HF_ENDPOINT may name a mirror on any port (the same parse open_clip's weights get).
    if _hub_offline() or not _reachable(*host_port(constants.ENDPOINT)):
        return (
            f"{model} is not in the local Hugging Face cache and the hub cannot be reached; "
            "download it once (huggingface-cli download ...) or give a local folder"
        )
    return None


def _cached_snapshot(model: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def model_folder(model: str) -> Path:
    """The local folder a model's files are in (a hub id's cached snapshot)."""
    if not is_hub_id(model):
        return Path(model).expanduser().resolve()
    folder = _cached_snapshot(model)
    if folder is None:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors"]))  # fmt: skip
    return folder


@lru_cache(maxsize=8)
def weights_digest(folder: str) -> str:
    """sha256 over the pipeline's files (relative path and content of each, sorted): what a
    sample's provenance records as the weights. One pass per worker (4 GB take ~10 s)."""
    root = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    for path in files:
        if path.suffix == ".bin" and any(path.parent.glob("*.safetensors")):
            continue  # diffusers loads the safetensors; a .bin beside them is unused
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def resolve_dtype(dtype: str, device: str) -> str:
    """fp16 on a GPU, float32 on CPU (half precision on CPU is slow and often unsupported)."""
    if dtype != "auto":
        return dtype
    return "float16" if device.startswith("cuda") else "float32"


def load_pipeline(model: str, mode: str, scheduler: str, device: str = "auto", dtype: str = "auto"):
    """A txt2img or img2img pipeline on ``device``, its scheduler replaced by the named one
    (built from the model's own scheduler config, so betas and offsets stay the model's)."""
    import diffusers
    import torch

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    cls = diffusers.AutoPipelineForText2Image if mode == "txt2img" else diffusers.AutoPipelineForImage2Image  # fmt: skip
    folder = model_folder(model)
    _quiet_loading()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter; failures raise below
            pipe = cls.from_pretrained(
                str(folder), torch_dtype=getattr(torch, dtype), local_files_only=True
            )
    except Exception as e:  # noqa: BLE001  a damaged folder raises json, safetensors or torch errors
        raise ResourceError(f"cannot load diffusion model {model} ({type(e).__name__}: {_one_line(e)})") from None  # fmt: skip
    sched_cls = getattr(diffusers, scheduler_class(scheduler) or scheduler)
    pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _quiet_loading() -> None:
    """Loading bars and the 'install accelerate' advice, once per worker per component, drown
    the run's own progress; failures still raise."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --- the tiny pipeline the demo and the tests build (random weights, offline) --------------


def build_tokenizer(folder: Path):
    """A transformers CLIPTokenizer from open_clip's bundled BPE (the same vocabulary as
    Stable Diffusion's), built offline. Positional arguments: in transformers 5 the keyword
    form of the fast tokenizer silently yields other ids."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)  # fmt: skip


def build_tiny_pipeline(
    folder: Path, seed: int = 0, size: int = 64, flagged: float = 0.0, steps: int = 4
) -> Path:
    """Build and save a Stable Diffusion pipeline with SD's layout at toy width (random
    weights, ~4 M parameters, latent 8x smaller than the image, like SD's).

    ``flagged`` > 0 adds a safety checker (random CLIP vision tower) whose threshold is set
    so that about that share of outputs at ``size`` px is flagged, and so come out black:
    the failure that cost the published SD1000 img2img shift three classes.
    """
    import shutil
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        UNet2DConditionModel,
        UniPCMultistepScheduler,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        block_out_channels=(16, 32, 32, 32), sample_size=size,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=UniPCMultistepScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    if flagged > 0:
        pipe = _with_safety_checker(pipe, seed, size, flagged, steps)
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder)
    return folder


def _with_safety_checker(pipe, seed: int, size: int, flagged: float, steps: int):
    """Add diffusers' own safety checker, random-weighted, with one "concept" (the main axis
    along which its embeddings of sample outputs vary) and a threshold at the (1 - flagged)
    quantile of those outputs' scores."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)  # fmt: skip
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 49408},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed + 1)
    checker = StableDiffusionSafetyChecker(config).eval()
    features = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})  # fmt: skip
    n = 64
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    images = pipe(
        ["a photo"] * n, num_inference_steps=steps, height=size, width=size, generator=gens
    ).images
    with torch.no_grad():
        pixels = features(images, return_tensors="pt").pixel_values
        emb = torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(pixels)[1]), dim=-1)  # fmt: skip
        axis = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)[2][0]
        scores = (emb @ axis).numpy()
        never = 10.0  # cosine never exceeds 1: these concepts never fire
        checker.concept_embeds.copy_(axis.expand_as(checker.concept_embeds))
        weights = torch.full_like(checker.concept_embeds_weights, never)
        weights[0] = float(np.quantile(scores, 1 - flagged))
        checker.concept_embeds_weights.copy_(weights)
        checker.special_care_embeds_weights.fill_(never)
    return StableDiffusionPipeline(
        **{**pipe.components, "safety_checker": checker, "feature_extractor": features},
        requires_safety_checker=True,
    )
