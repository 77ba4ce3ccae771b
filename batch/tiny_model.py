"""Regenerate the embedded tiny Stable Diffusion model folder (`models/tiny/`).

The folder is a real diffusers `StableDiffusionPipeline` checkpoint (UNet, VAE,
CLIP text encoder and tokenizer, PNDM scheduler, CLIP image encoder and feature
extractor) with small, seeded, randomly initialised weights. It lets the batch
runner and its tests exercise the full SD 1.5 code path offline, on CPU, in
seconds. Nothing is downloaded: the CLIP byte-level BPE tokenizer is built here
from an embedded word list. Output is deterministic (same bytes on every run
with the same library versions).

It also writes `models/tiny-ip-adapter/ip-adapter_tiny.safetensors`, a seeded random
IP-Adapter (original, non-plus layout) for the tiny UNet and image encoder; see
`build_tiny_ip_adapter`.

Usage: python -m batch.tiny_model [OUT_DIR]   (default: <repo root>/models/tiny;
       the IP-Adapter goes to OUT_DIR's sibling folder `tiny-ip-adapter`)
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "models" / "tiny"
IP_ADAPTER_DIR_NAME = "tiny-ip-adapter"  # next to the tiny model folder
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
IP_ADAPTER_NUM_TOKENS = 4  # image tokens of the original IP-Adapter (ImageProjection)
# Std of the random to_k_ip / to_v_ip weights: about twice the UNet's own attn2 to_k/to_v
# (default nn.Linear init, ~0.1 for 32 inputs), so the image prompt visibly steers the output.
IP_ADAPTER_KV_STD = 0.2

SEED = 0
CROSS_ATTENTION_DIM = 32  # text hidden size == image-encoder projection dim
MAX_LENGTH = 77  # CLIP context length, as SD 1.5
MAX_MERGES = 2000
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Per-channel std the VAE decoder's conv_out is rescaled to, so random weights
# decode to mid-grey images with visible texture instead of flat or clipped ones.
VAE_CONV_OUT_STD = 0.06

# SD 1.5's scheduler_config.json (PNDM / PLMS), beta schedule included.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# Word list the BPE merges are learnt from: common English and prompt words.
CORPUS = """
a an the and or of in on at to with from by for as is are was be this that it
photo photograph portrait painting drawing sketch illustration render artwork
digital art concept detailed highly intricate sharp focus high quality best
masterpiece beautiful realistic photorealistic cinematic lighting light dark
studio soft hard warm cold golden hour sunset sunrise night day morning evening
red orange yellow green blue purple pink brown black white gray grey silver gold
colorful vibrant pastel bright dim shadow shadows reflection reflections
cat cats dog dogs fox foxes bird birds horse horses lion tiger bear wolf rabbit
fish owl dragon unicorn butterfly flower flowers tree trees forest garden grass
mountain mountains river lake ocean sea beach sand desert snow ice rain storm
cloud clouds sky sun moon star stars space planet galaxy city street road house
castle tower bridge building buildings village town room kitchen window door
man woman men women person people girl boy child children old young face eyes
hair smile smiling standing sitting walking running flying swimming looking
wearing dress shirt hat coat armor helmet sword robot car train ship boat plane
small large big little tiny huge tall short long wide deep high low open closed
happy sad calm quiet peaceful mysterious magical fantasy science fiction future
futuristic ancient medieval modern vintage retro style styled trending artstation
unreal engine octane volumetric fog mist smoke fire water stone wood wooden metal
glass paper oil watercolor acrylic ink pencil charcoal anime cartoon comic film
camera lens wide angle close up closeup macro view background foreground scene
landscape nature wildlife animal animals field meadow valley hill hills island
through over under between behind near inside outside around into above below
two three four five many some every one other another again very much more most
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP mapping of the 256 byte values onto printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_bpe_merges(words: list[str], max_merges: int = MAX_MERGES) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (end-of-word marked with "</w>") from `words`, deterministically.

    Each step merges the most frequent adjacent pair; ties go to the lexicographically
    smallest pair. Stops at `max_merges` or once every word is a single token, so each
    corpus word ends up in the vocabulary whole (as common words are in real CLIP).
    """
    byte_encoder = bytes_to_unicode()
    counts = Counter(w.lower() for w in words)
    seqs: dict[tuple[str, ...], int] = {}
    for word, freq in sorted(counts.items()):
        chars = [byte_encoder[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        seqs[tuple(chars)] = seqs.get(tuple(chars), 0) + freq

    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for seq, freq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_seqs: dict[tuple[str, ...], int] = {}
        for seq, freq in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new_seqs[tuple(out)] = new_seqs.get(tuple(out), 0) + freq
        seqs = new_seqs
    return merges


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write CLIP `vocab.json` and `merges.txt` (same layout as openai/clip-vit-large-patch14)."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges = learn_bpe_merges(CORPUS)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    log.info("tokenizer: %d tokens (%d merges)", len(vocab), len(merges))
    return vocab_file, merges_file


def build_tokenizer(directory: Path):
    """A `CLIPTokenizer` loaded from freshly generated vocab/merges files in `directory`."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(directory)
    # Positional (vocab, merges) paths work for the tokenizers-backed CLIPTokenizer of
    # transformers 5 and the slow one of transformers 4; unlike from_pretrained(), this
    # leaves no load-time keys ("is_local", "local_files_only") in tokenizer_config.json.
    return CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        model_max_length=MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


def build_components(tokenizer) -> dict:
    """All pipeline components with seeded random weights (reseeded before each one)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16,  # default 128x128 px
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 4 blocks = 3 downsamplings: vae_scale_factor 8, as SD
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    )
    with torch.no_grad():
        w = vae.decoder.conv_out.weight
        w.mul_(VAE_CONV_OUT_STD / w.std())
        vae.decoder.conv_out.bias.zero_()

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,  # enough layers for clip_skip up to 4
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_LENGTH,
            projection_dim=32,
            layer_norm_eps=1e-5,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )

    torch.manual_seed(SEED)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            image_size=32,
            patch_size=4,
            num_channels=3,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            projection_dim=CROSS_ATTENTION_DIM,  # must match the UNet's cross_attention_dim
            layer_norm_eps=1e-5,
            hidden_act="quick_gelu",
        )
    )

    feature_extractor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 32},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )

    scheduler = PNDMScheduler.from_config(SCHEDULER_CONFIG)

    for module in (unet, vae, text_encoder, image_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "image_encoder": image_encoder,
        "feature_extractor": feature_extractor,
    }


def _normalise_model_index(out_dir: Path) -> None:
    """Record `CLIPImageProcessor` even where transformers built its PIL fallback class.

    Without torchvision, transformers 5 substitutes `CLIPImageProcessorPil`; the plain
    name loads with either backend and with transformers 4.
    """
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    library, cls = index["feature_extractor"]
    if cls != "CLIPImageProcessor":
        index["feature_extractor"] = [library, "CLIPImageProcessor"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _prefix_text_encoder_keys(out_dir: Path) -> None:
    """Store text-encoder weights under `text_model.*`, the layout of SD 1.5 checkpoints.

    transformers 5 flattened `CLIPTextModel` (no `.text_model` submodule) and saves a
    freshly built one without the prefix; it strips the prefix again on load, while
    transformers 4 needs it (without it, it would silently leave the weights random).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out_dir / "text_encoder" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {
            (k if k.startswith("text_model.") else f"text_model.{k}"): f.get_tensor(k) for k in f.keys()
        }
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


def build_tiny_model(out_dir: Path) -> Path:
    """Build the tiny pipeline and save it to `out_dir` (replacing what is there); return `out_dir`."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="tiny_tokenizer_") as tmp:
        tok_dir = Path(tmp)
        tokenizer = build_tokenizer(tok_dir)
        pipe = StableDiffusionPipeline(
            **build_components(tokenizer),
            safety_checker=None,
            requires_safety_checker=False,
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        # Keep the plain vocab/merges files too (the slow CLIPTokenizer of transformers 4 needs them).
        for name in ("vocab.json", "merges.txt"):
            target = out_dir / "tokenizer" / name
            if not target.exists():
                shutil.copyfile(tok_dir / name, target)
    _normalise_model_index(out_dir)
    _prefix_text_encoder_keys(out_dir)

    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    log.info("saved tiny model to %s (%.2f MB)", out_dir, total / 1e6)
    return out_dir


def _mean_image_embedding(model_dir: Path):
    """Mean `image_embeds` of the tiny image encoder over fixed reference inputs (float64, rounded to 1e-3).

    References: 8 solid colours and 8 seeded uniform-noise images, already at the encoder's
    input size and CLIP-normalised (the feature extractor's job in the pipeline).
    """
    import torch
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder").double().eval()
    size = encoder.config.image_size
    gen = torch.Generator().manual_seed(SEED)
    colours = torch.tensor([[r, g, b] for r in (0.1, 0.9) for g in (0.1, 0.9) for b in (0.1, 0.9)], dtype=torch.float64)
    pixels = torch.cat([
        colours[:, :, None, None].expand(-1, -1, size, size),
        torch.rand(8, 3, size, size, generator=gen, dtype=torch.float64),
    ])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64)[None, :, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64)[None, :, None, None]
    with torch.no_grad():
        embeds = encoder(pixel_values=(pixels - mean) / std).image_embeds
    return torch.round(embeds.mean(dim=0) * 1000) / 1000


def build_tiny_ip_adapter(model_dir: Path, out_dir: Path) -> Path:
    """Write a seeded random IP-Adapter for the tiny model in `model_dir`; return the weight file.

    `out_dir/ip-adapter_tiny.safetensors` has the layout of h94/IP-Adapter's original
    `ip-adapter_sd15.safetensors` (not plus / full-face / FaceID), which diffusers'
    `pipe.load_ip_adapter(out_dir, subfolder="", weight_name="ip-adapter_tiny.safetensors")`
    reads:

    * `image_proj.proj.{weight,bias}`, `image_proj.norm.{weight,bias}`: an `ImageProjection`
      from the image encoder's `projection_dim` to `IP_ADAPTER_NUM_TOKENS` tokens of the
      UNet's `cross_attention_dim` (diffusers sees `proj.weight` and builds that class,
      with 4 tokens and cross_attention_dim = rows / 4);
    * `ip_adapter.{k}.to_k_ip.weight` / `.to_v_ip.weight` (cross_attention_dim -> hidden size,
      no bias) with k = 1, 3, 5, ... for the cross-attention (`attn2`) processors in the order
      of `unet.attn_processors` (for UNet2DConditionModel: down blocks, then up blocks, then
      the mid block), exactly as `UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers`
      numbers them, with its hidden sizes (block_out_channels per block).

    The projection is centred on the tiny image encoder (`model_dir/image_encoder`): its
    bias cancels the mean image embedding of a fixed set of reference inputs, so the
    image-dependent part of the embedding (small next to the common part for a random
    encoder: cosine ~0.98 between unrelated images) decides the image tokens and different
    image prompts give visibly different outputs. The mean is computed in float64 and
    rounded, so the file is the same bytes on every run. No image encoder is written: the
    tiny pipeline has its own.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    unet_config = UNet2DConditionModel.load_config(model_dir / "unet")
    unet = UNet2DConditionModel.from_config(unet_config)  # random weights; only its processor names are used
    cross_dim = unet.config.cross_attention_dim
    blocks = list(unet.config.block_out_channels)
    mean_embed = _mean_image_embedding(model_dir)  # float64, (projection_dim,)
    image_dim = mean_embed.numel()

    gen = torch.Generator().manual_seed(SEED)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * std).contiguous()

    proj_weight = normal(IP_ADAPTER_NUM_TOKENS * cross_dim, image_dim, std=image_dim ** -0.5)
    proj_bias = -(proj_weight.double() * mean_embed).sum(dim=1)  # W @ (e - mean): centred
    tensors = {
        "image_proj.proj.weight": proj_weight,
        "image_proj.proj.bias": proj_bias.float().contiguous(),
        "image_proj.norm.weight": 1.0 + normal(cross_dim, std=0.02),
        "image_proj.norm.bias": normal(cross_dim, std=0.02),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue  # self-attention: no IP weights, and no key id
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name.split(".")[1])]
        else:
            hidden = blocks[int(name.split(".")[1])]
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = normal(hidden, cross_dim, std=IP_ADAPTER_KV_STD)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = normal(hidden, cross_dim, std=IP_ADAPTER_KV_STD)
        key_id += 2

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / IP_ADAPTER_WEIGHT_NAME
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})
    log.info("saved tiny IP-Adapter to %s (%d cross-attention layers, %.1f kB)",
             path, (key_id - 1) // 2, path.stat().st_size / 1e3)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"output folder (default: {DEFAULT_OUT_DIR})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_dir = build_tiny_model(args.out_dir)
    build_tiny_ip_adapter(model_dir, model_dir.parent / IP_ADAPTER_DIR_NAME)


if __name__ == "__main__":
    main()
