"""The baseline of the diffusion benchmark: what a user would write by hand to make a set of
Stable Diffusion images with diffusers, run as its own process so its imports and pipeline
load count (as `imagenetpp curate`'s do).

    python bench/naive_diffusion.py MODEL_DIR JOBS_JSON OUT_DIR

JOBS_JSON: {"steps": n, "guidance": g, "size": px, "batches": [[[name, prompt, seed], ...], ...]}
One process, one loop, torch's default thread count: load the pipeline from the folder
(local files only), UniPC scheduler from its config, then one pipeline call per batch (a CPU
generator seeded per image, as the curator seeds them), each image saved as PNG. Prints
{"images": n} as JSON.
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler


def main() -> None:
    model, jobs_file, out = sys.argv[1:4]
    jobs = json.loads(Path(jobs_file).read_text())
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for batch in jobs["batches"]:
        gens = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
        with torch.inference_mode():
            images = pipe(
                [prompt for _, prompt, _ in batch],
                num_inference_steps=jobs["steps"],
                guidance_scale=jobs["guidance"],
                height=jobs["size"],
                width=jobs["size"],
                generator=gens,
            ).images
        for (name, _, _), image in zip(batch, images, strict=True):
            image.save(out_dir / f"{name}.png")
            n += 1
    print(json.dumps({"images": n}))


if __name__ == "__main__":
    main()
