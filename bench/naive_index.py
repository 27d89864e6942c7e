"""The baseline of the index_e2e benchmark: what a user would write by hand to embed a
webdataset pool with open_clip, run as its own process so its imports and model load count
(as `imagenetpp index`'s do).

    python bench/naive_index.py POOL_DIR MODEL CHECKPOINT BATCH OUT_DIR

One process, one loop: tarfile read, PIL decode, open_clip preprocess, encode images and
captions in batches, save the normalised embeddings as .npy. Prints {"images": n} as JSON.
"""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

CONFIGS = Path(__file__).resolve().parent.parent / "curators" / "model_configs"


def main() -> None:
    pool, model_name, checkpoint, batch, out = sys.argv[1:6]
    batch = int(batch)
    open_clip.add_model_config(str(CONFIGS))  # the demo's tiny architecture
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    pixels, texts, img_emb, txt_emb = [], [], [], []

    def flush() -> None:
        if not pixels:
            return
        img = model.encode_image(torch.stack(pixels))
        txt = model.encode_text(tokenizer(texts))
        img_emb.append(torch.nn.functional.normalize(img, dim=-1).numpy())
        txt_emb.append(torch.nn.functional.normalize(txt, dim=-1).numpy())
        pixels.clear()
        texts.clear()

    def add(files: dict) -> None:
        if "jpg" not in files:
            return
        try:
            image = Image.open(io.BytesIO(files["jpg"])).convert("RGB")
        except Exception:  # noqa: BLE001  a broken image is skipped
            return
        pixels.append(preprocess(image))
        texts.append(files.get("txt", b"").decode("utf-8", "replace"))
        if len(pixels) == batch:
            flush()

    with torch.inference_mode():
        for shard in sorted(Path(pool).glob("*.tar")):
            with tarfile.open(shard, "r|") as tar:
                key, files = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    stem, _, ext = member.name.rpartition("/")[2].partition(".")
                    if stem != key:
                        add(files)
                        key, files = stem, {}
                    files[ext] = tar.extractfile(member).read()
                add(files)
        flush()
    Path(out).mkdir(parents=True, exist_ok=True)
    np.save(Path(out) / "img_emb.npy", np.concatenate(img_emb))
    np.save(Path(out) / "text_emb.npy", np.concatenate(txt_emb))
    print(json.dumps({"images": int(sum(len(e) for e in img_emb))}))


if __name__ == "__main__":
    main()
