"""Train `tiny-clip`: a small CLIP for the drawn world, to score what the embedded model draws.

    python -m batch.toy.clip --out models/tiny-clip     # about 3 minutes on 2 cores
    python -m batch.toy.clip --out /tmp/clip --scale 0.2  # a quick trial

The output is an ordinary `transformers.CLIPModel` + `CLIPProcessor` folder (the embedded
model's tokenizer, a 64-px `CLIPImageProcessor`), so torchmetrics' `clip_score` and
`sdbatch score --clip` load it like openai/clip-vit-large-patch14. Stages, each seeded:

1. data: drawings of every (colour, shape) of the world, the new shape (diamond) too, each
   degraded at random (blur, noise, a coarser resampling) so soft or noisy copies still read;
   and images the embedded model `tiny` draws for each "a <colour> <shape>" prompt (seeds it is
   never judged on), captioned with their prompt, so the CLIP judges what that model draws;
2. a contrastive loss over image and caption embeddings (symmetric InfoNCE in which every image
   with the same caption is a match), AdamW with a cosine schedule, an EMA of the weights;
3. held-out figures: for drawings and for model images of unseen seeds, how often the own caption
   scores higher than the caption with the colour swapped, and with the shape swapped;
4. save (into a temp folder beside OUT, renamed into place at the end) with `training.json`.

OUT must be absent, empty or an earlier output of this recipe (it holds its `training.json`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import BatchError
from .world import ALL_SHAPES, COLOURS, SHAPES, caption, draw, sample_scene

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER = "training.json"  # written last into every folder this recipe saves: its summary
# what a saved folder holds (CLIPModel's and CLIPProcessor's save_pretrained, the marker)
ENTRIES = {"config.json", "model.safetensors", "merges.txt", "vocab.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "preprocessor_config.json", "processor_config.json", MARKER}


@dataclass(frozen=True)
class ClipConfig:
    """Sizes, data and steps; the defaults make the shipped `models/tiny-clip`."""

    seed: int = 0
    image_size: int = 64  # the processor's resize and crop: a 128-px drawing still shows its shape at 64
    patch: int = 8  # 8x8 patches of 8 px: 64 tokens
    width: int = 64  # hidden size of both towers
    projection: int = 64  # the shared embedding
    layers: int = 3
    heads: int = 4
    # data
    drawings: int = 1920  # 120 per (colour, shape), diamonds included
    generator: str = "tiny"  # the model whose images the CLIP learns to read (a name or folder, as --model)
    model_images: int = 8  # per (colour, shape) prompt of the model's vocabulary: 96 images
    model_steps: tuple = (12, 20)  # alternately: a few steps give softer images than the defaults
    model_seed: int = 10_000  # far from the seeds tests and READMEs use
    model_share: float = 0.25  # of every batch: the model's own images
    # training
    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    ema: float = 0.995
    warmup: int = 100

    def scaled(self, factor: float) -> "ClipConfig":
        """The same recipe with `factor` times the steps (a quick trial)."""
        return replace(self, steps=max(1, int(self.steps * factor)))


def swapped(colour: str, shape: str) -> tuple[str, str]:
    """The caption's colour and shape each moved one step along the world's lists: what the
    held-out figures (and tests/test_score.py) score an image's own caption against."""
    colours = sorted(COLOURS)
    return colours[(colours.index(colour) + 1) % len(colours)], SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]


# --- 1. data -------------------------------------------------------------------------------------

def degrade(image, rng: random.Random):
    """A softer or noisier copy, as a generator's images are: blur, a coarser resampling, pixel noise."""
    import numpy as np
    from PIL import Image, ImageFilter

    size = image.size[0]
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
    if rng.random() < 0.3:
        small = rng.choice((32, 48, 64))
        image = image.resize((small, small), Image.BILINEAR).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        pixels = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 10), pixels.shape)
        image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return image


def drawn_data(config: ClipConfig) -> list[tuple[object, str]]:
    """(image, caption) pairs of every colour and shape, new shapes too, equally often; degraded at random."""
    pairs = list(itertools.product(sorted(COLOURS), ALL_SHAPES))
    items = []
    for index in range(config.drawings):
        colour, shape = pairs[index % len(pairs)]
        rng = random.Random(f"clip/{config.seed}/{index}")
        scene = sample_scene(rng, 128, colour, shape)
        items.append((degrade(draw(scene, 128), rng), caption(scene)))
    return items


def model_data(config: ClipConfig, seed: int, count: int, device: str = "cpu") -> list[tuple[object, str]]:
    """(image, prompt) pairs the model draws: `count` per (colour, shape) of its vocabulary, from `seed` on."""
    import torch

    from ..api import Generator

    items = []
    # threads: the count this process was given (--threads), not one the Generator would choose from the load
    with Generator(config.generator, device=device, quiet=True, threads=torch.get_num_threads(), width=128,
                   height=128) as generator:
        for n, (colour, shape) in enumerate(itertools.product(sorted(COLOURS), SHAPES)):
            prompt = f"a {colour} {shape}"
            for k in range(count):
                steps = config.model_steps[k % len(config.model_steps)]
                [image] = generator.generate(prompt, seed=seed + 100 * n + k, steps=steps)
                items.append((image, prompt))
    return items


# --- 2. model ------------------------------------------------------------------------------------

def build_clip(tokenizer, config: ClipConfig):
    """A CLIPModel whose text tower speaks the embedded model's tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    shared = {"hidden_size": config.width, "intermediate_size": 2 * config.width, "num_hidden_layers": config.layers,
              "num_attention_heads": config.heads, "projection_dim": config.projection}
    clip_config = CLIPConfig(
        text_config={**shared, "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**shared, "image_size": config.image_size, "patch_size": config.patch},
        projection_dim=config.projection)
    return CLIPModel(clip_config)


def build_processor(tokenizer, config: ClipConfig):
    """CLIP's own preprocessing (resize the short side, centre crop, OpenAI's mean and std) at `image_size`."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    images = CLIPImageProcessor(size={"shortest_edge": config.image_size},
                                crop_size={"height": config.image_size, "width": config.image_size})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def load_tokenizer():
    """The embedded model's CLIPTokenizer (models/tiny/tokenizer)."""
    from transformers import CLIPTokenizer

    from ..models import MODELS_DIR

    return CLIPTokenizer.from_pretrained(MODELS_DIR / "tiny" / "tokenizer")


# --- 3. training ---------------------------------------------------------------------------------

def contrastive_loss(logits, captions: list[str]):
    """Symmetric InfoNCE where every image with the same caption counts as a match."""
    import torch

    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(dim=1, keepdim=True)
    images = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    texts = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (images + texts) / 2


def features(output):
    """The projected embedding, from a tensor (transformers 4) or an output with `pooler_output` (5)."""
    return output if hasattr(output, "norm") else output.pooler_output


def train_clip(model, processor, drawn, made, config: ClipConfig) -> None:
    """The contrastive loop: each batch mixes drawings and the model's images."""
    import torch
    import torch.nn.functional as F

    pixel_values = {}
    for name, items in (("drawn", drawn), ("made", made)):
        pixel_values[name] = torch.cat([processor(images=[image for image, _ in items[i : i + 256]],
                                                  return_tensors="pt").pixel_values for i in range(0, len(items), 256)])
    captions = {"drawn": [c for _, c in drawn], "made": [c for _, c in made]}
    texts = sorted(set(captions["drawn"]) | set(captions["made"]))
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(config.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or name == "logit_scale" else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then a cosine to 0
        optimizer, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps))))
    parameters = [p for p in model.parameters()]
    shadow = [p.detach().clone() for p in parameters]
    made_count = round(config.batch * config.model_share) if made else 0
    model.train()
    started = time.perf_counter()
    for step in range(config.steps):
        drawn_index = torch.randint(len(drawn), (config.batch - made_count,), generator=generator)
        made_index = torch.randint(max(1, len(made)), (made_count,), generator=generator)
        pixels = torch.cat([pixel_values["drawn"][drawn_index], pixel_values["made"][made_index]])
        flip = torch.rand(len(pixels), generator=generator) < 0.5  # every shape of the world is mirror-symmetric
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        batch_captions = ([captions["drawn"][i] for i in drawn_index.tolist()]
                          + [captions["made"][i] for i in made_index.tolist()])
        image = F.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
        text = F.normalize(features(model.get_text_features(**tokens)), dim=-1)
        by_caption = text[[texts.index(c) for c in batch_captions]]
        logits = model.logit_scale.exp().clamp(max=100) * image @ by_caption.T
        loss = contrastive_loss(logits, batch_captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            rate = 1 - min(config.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(shadow, [p.detach() for p in parameters], rate)
        if step % max(1, config.steps // 20) == 0 or step == config.steps - 1:
            elapsed = time.perf_counter() - started
            log.info("clip step %d/%d loss %.4f (%.0fs, eta %.0fs)", step + 1, config.steps, loss.item(), elapsed,
                     elapsed / (step + 1) * (config.steps - step - 1))
    with torch.no_grad():
        for p, s in zip(parameters, shadow):
            p.copy_(s)
    model.eval()


# --- 4. held-out figures -------------------------------------------------------------------------

def scores(model, processor, images, prompts) -> list[float]:
    """100 x cos(image, prompt) per pair, as torchmetrics' clip_score (before its floor at 0)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        image = F.normalize(features(model.get_image_features(
            pixel_values=processor(images=list(images), return_tensors="pt").pixel_values)), dim=-1)
        tokens = processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
        text = F.normalize(features(model.get_text_features(**tokens)), dim=-1)
    return (100 * (image * text).sum(-1)).tolist()


def swap_figures(model, processor, items) -> dict:
    """How often an image's own caption beats its colour-swapped and its shape-swapped caption."""
    own, colour, shape = [], [], []
    for _, text in items:
        _, c, s = text.split()
        own.append(text)
        colour.append(f"a {swapped(c, s)[0]} {s}")
        shape.append(f"a {c} {swapped(c, s)[1]}")  # the world's three shapes only: `items` hold no diamond
    images = [image for image, _ in items]
    mine = scores(model, processor, images, own)
    by_colour, by_shape = scores(model, processor, images, colour), scores(model, processor, images, shape)
    return {"images": len(items), "beats_swapped_colour": sum(a > b for a, b in zip(mine, by_colour)),
            "beats_swapped_shape": sum(a > b for a, b in zip(mine, by_shape)),
            "mean_own_score": round(sum(mine) / len(mine), 2)}


# --- 5. the whole recipe ---------------------------------------------------------------------------

def train(config: ClipConfig, out: Path) -> dict:
    """Every stage, then save; returns the summary written to OUT/training.json."""
    import torch

    out = Path(out).resolve()
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    times, started = {}, time.perf_counter()
    tokenizer = load_tokenizer()
    processor = build_processor(tokenizer, config)
    drawn = drawn_data(config)
    times["drawings_s"] = time.perf_counter() - started
    mark = time.perf_counter()
    made = model_data(config, config.model_seed, config.model_images) if config.model_images else []
    held_out_made = model_data(config, config.model_seed + 5000, 4)
    times["model_images_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_clip(tokenizer, config)
    train_clip(model, processor, drawn, made, config)
    times["train_s"] = time.perf_counter() - mark

    held_out_drawn = drawn_data(replace(config, seed=config.seed + 1, drawings=192))
    held_out_drawn = [(image, text) for image, text in held_out_drawn if text.split()[2] in SHAPES]
    figures = {"drawings": swap_figures(model, processor, held_out_drawn),
               "model_images": swap_figures(model, processor, held_out_made)}
    times["total_s"] = time.perf_counter() - started
    log.info("held out: %s", figures)

    with tempfile.TemporaryDirectory(prefix=f".{out.name}-partial-", dir=out.parent) as staging:
        folder = Path(staging) / "clip"
        save(model, processor, folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        summary = {"config": asdict(config), "seconds": {k: round(v, 1) for k, v in times.items()},
                   "held_out": figures, "folder_bytes": size,
                   "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
        (folder / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        earlier = Path(staging) / "earlier"
        if out.exists():
            os.replace(out, earlier)
        os.replace(folder, out)
    log.info("trained in %.1f min; %.2f MB", times["total_s"] / 60, size / 1e6)
    return summary


def save(model, processor, folder: Path) -> None:
    """CLIPModel + CLIPProcessor in a folder that transformers 4 and 5 both load."""
    from ..models import MODELS_DIR

    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)  # transformers 5: processor_config.json holds the image processor's settings
    processor.image_processor.save_pretrained(folder)  # transformers 4 reads them from preprocessor_config.json
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):  # the slow tokenizer's too
        shutil.copyfile(MODELS_DIR / "tiny" / "tokenizer" / name, folder / name)
    mode = 0o666 & ~_umask()  # safetensors writes 0600 whatever the umask: shipped files must be readable
    for path in folder.iterdir():
        path.chmod(mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(out: Path) -> None:
    """BatchError unless OUT is absent, empty or an earlier output of this recipe holding nothing else."""
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        entries = {p.name for p in out.iterdir()}
        if MARKER not in entries:
            raise BatchError(f"--out {out} holds files this recipe did not write (no {MARKER}): it would be "
                             "replaced; choose an empty or new folder")
        if entries - ENTRIES:
            raise BatchError(f"--out {out}: an earlier CLIP, but also {', '.join(sorted(entries - ENTRIES))}, "
                             "which replacing it would delete; move them out first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "tiny-clip", help="[models/tiny-clip]")
    parser.add_argument("--model", default=ClipConfig.generator,
                        help="the model whose images it learns from: tiny, or a folder `python -m batch.toy.train` "
                             "wrote [tiny]")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (a quick trial) [1]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads [sdbatch's choice: the CPUs free for this process, see README]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from .. import threads

    threads.configure(args.threads)  # torch's own default (every core) crawls on a machine others keep busy
    config = replace(ClipConfig(), generator=args.model)
    config = config.scaled(args.scale) if args.scale != 1.0 else config
    try:
        train(config, args.out)
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
