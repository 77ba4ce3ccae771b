"""What a training job's data loader does with `sdbatch export --format webdataset` shards.

A `webdataset.WebDataset` over the tar shards, decoded to tensors and batched by a torch
`DataLoader`, as a diffusion or CLIP fine-tuning script would read them; here one pass
counts the samples and the captions, standing in for the optimisation steps.

Usage: python examples/read_shards.py DIR [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import torch
    import webdataset as wds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path, help="the folder `sdbatch export --to` wrote")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    shards = [str(args.shards / s["name"]) for s in json.loads((args.shards / "export.json").read_text())["shards"]]
    dataset = (wds.WebDataset(shards, shardshuffle=False, empty_check=False)
               .decode("torchrgb").to_tuple("png", "txt", "json"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=lambda batch: list(zip(*batch)))
    samples, captions = 0, set()
    for images, texts, params in loader:
        pixels = torch.stack(images)  # (B, 3, H, W) in [0, 1]: what the model would be trained on
        assert pixels.shape[1] == 3
        samples += len(texts)
        captions.update(texts)
    print(f"read {samples} samples ({len(captions)} distinct captions) from {len(shards)} shards in {args.shards}")


if __name__ == "__main__":
    main()
