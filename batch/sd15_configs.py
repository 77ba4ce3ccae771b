"""Regenerate the real CLIP ViT-L/14 tokenizer files of `models/sd15/tokenizer/`.

`models/sd15/` holds the diffusers configs of stable-diffusion-v1-5 (no weights): it is the
local `config=` folder for `StableDiffusionPipeline.from_single_file(...)` and the source
of the random-weight SD 1.5 architecture. The config JSONs are committed as they are;
only the tokenizer's `vocab.json` and `merges.txt` are generated, from the CLIP BPE
file `bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP; also shipped inside the PyPI package
`open_clip_torch`), exactly as OpenAI's `simple_tokenizer.py` and transformers'
`CLIPTokenizer` build them: 49408 tokens (256 byte characters, the same with "</w>",
48894 merges, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407).

Usage:
    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python -m batch.sd15_configs /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz [OUT_DIR]
        (OUT_DIR defaults to the shipped models/sd15/tokenizer: the checkout's, or the installed package's)

Output is deterministic (same bytes for the same input file).
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from batch.models import SD15_CONFIGS
from batch.toy.tokenizer import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode

DEFAULT_OUT_DIR = SD15_CONFIGS / "tokenizer"

VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48894: what CLIP keeps of the BPE file's merges
MAX_LENGTH = 77

# openai/clip-vit-large-patch14's tokenizer_config.json / special_tokens_map.json, as SD 1.5
# ships them, less the load-time keys (name_or_path, special_tokens_map_file) and with the
# special tokens as plain strings (both transformers 4 and 5 read those).
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": BOS_TOKEN,
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": EOS_TOKEN,
    "errors": "replace",
    "model_max_length": MAX_LENGTH,
    "pad_token": EOS_TOKEN,
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": EOS_TOKEN,
}
SPECIAL_TOKENS_MAP = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
}


def clip_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and merge lines from `bpe_simple_vocab_16e6.txt.gz`."""
    text = gzip.open(bpe_path, "rb").read().decode("utf-8")
    merge_lines = text.split("\n")[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    merges = [tuple(line.split()) for line in merge_lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {NUM_MERGES} merge lines of two symbols each")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: got {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, [" ".join(m) for m in merges]


def write_tokenizer(bpe_path: Path, out_dir: Path = DEFAULT_OUT_DIR) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json to `out_dir`."""
    vocab, merges = clip_vocab_and_merges(Path(bpe_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compact JSON, as the vocab.json of openai/clip-vit-large-patch14 (~0.9 MB).
    (out_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8"
    )
    for name, content in (("tokenizer_config.json", TOKENIZER_CONFIG), ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
        (out_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_file", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT_DIR,
                        help=f"output folder (default: {DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    out = write_tokenizer(args.bpe_file, args.out_dir)
    print(f"wrote CLIP tokenizer ({VOCAB_SIZE} tokens) to {out}")


if __name__ == "__main__":
    main()
