"""CLIP scores of an output folder's images, as torchmetrics defines them, kept in the checkpoint.

`clip_score` = 100 · max(cos(image embedding, prompt embedding), 0), computed with transformers'
`CLIPModel` and `CLIPProcessor` the way `torchmetrics.functional.multimodal.clip_score` does
(the processor's resize, crop and normalisation; `get_image_features` / `get_text_features`).
One difference, on purpose: a prompt longer than the text tower's context is truncated by the
tokenizer, which keeps its end-of-text token (the embedding CLIP reads), where torchmetrics cuts
the token ids and loses it; prompts that fit are scored alike.

Scores live in checkpoint.sqlite (table `clip_scores`, keyed by image key and CLIP model), written
one batch per transaction, so an interrupted `score` resumes where it stopped and a second one
computes nothing. metadata.jsonl shows the scores of the CLIP model used last (`clip_score`,
`clip_model`) and is rewritten from the checkpoint, atomically, as a run does.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import FILE_NAME, Checkpoint, Outcome
from .errors import ModelError, OutputError
from .interrupt import Stop, StopRequested
from .writer import read_written

log = logging.getLogger(__name__)

SHIPPED = {"tiny-clip": "tiny-clip"}  # names of the CLIP models shipped in models/ -> their folder
DEFAULT_BATCH_SIZE = 32
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ClipSource:
    """A CLIP model: its name as given, where it loads from, and the identity its scores are kept under."""

    name: str  # as the user wrote it: tiny-clip, org/name, a folder
    location: str  # folder path or hub id
    identity: str  # name + a digest of its weights (folders) or its commit (hub): the checkpoint's key


@dataclass(frozen=True)
class ScoreResult:
    """What `score_folder` did."""

    out: Path
    model: str
    scored: int  # computed now
    earlier: int  # already in the checkpoint
    skipped: int  # no text prompt to score against (clip_embed rows, image prompts without text)
    unreadable: list[str]  # image files missing or not decodable
    interrupted: bool

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            from .interrupt import EXIT_INTERRUPTED

            return EXIT_INTERRUPTED
        return 1 if self.unreadable else 0


@functools.lru_cache(maxsize=None)  # once per process: `run --clip-score` checks it up front, then loads it
def resolve_clip(name: str) -> ClipSource:
    """A CLIP model name (`tiny-clip`, a folder, a hub id) to its source; ModelError if it is not there."""
    from .models import HUB_ID, MODELS_DIR

    if name in SHIPPED:
        folder = MODELS_DIR / SHIPPED[name]
        if not (folder / "config.json").exists():
            raise ModelError(f"the shipped CLIP model '{name}' is missing at {folder}: reinstall sdbatch, or in a "
                             f"checkout run `python -m batch.toy.clip --out models/{SHIPPED[name]}`")
        return ClipSource(name, str(folder), f"{name}@{_folder_digest(folder)}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"--clip {name}: not a transformers CLIP folder (no config.json)")
        return ClipSource(name, str(path.resolve()), f"{path.resolve()}@{_folder_digest(path)}")
    if HUB_ID.fullmatch(name):
        return ClipSource(name, name, f"{name}@{_hub_revision(name)}")
    raise ModelError(f"--clip {name}: neither a CLIP model folder nor a hub id like 'openai/clip-vit-large-patch14' "
                     f"(nor {', '.join(SHIPPED)})")


def _folder_digest(folder: Path) -> str:
    """sha256 of the weights file (12 hex digits): retrained weights at the same path are another model."""
    for name in WEIGHT_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()[:12]
    raise ModelError(f"--clip {folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def _hub_revision(name: str) -> str:
    """The commit of the cached snapshot (12 characters); ModelError if the model is not cached and cannot be."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                   local_files_only=constants.HF_HUB_OFFLINE)
    except Exception as e:  # not cached offline, no network, no such repo: one line, exit 2
        raise ModelError(f"--clip {name}: cannot be found or fetched ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"download it with `hf download {name}` where there is a network, or give a local "
                         "folder") from None
    return Path(folder).name[:12]


class ClipScorer:
    """A CLIP model and its processor on one device: scores (image, prompt) pairs in batches."""

    def __init__(self, source: ClipSource, device: str = "cpu"):
        from .models import quiet_libraries

        quiet_libraries()  # our progress bar, not transformers' "Loading weights" one
        from transformers import CLIPModel, CLIPProcessor

        self.source, self.device = source, device
        try:
            self.model = CLIPModel.from_pretrained(source.location).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(source.location)
        except (OSError, ValueError) as e:
            raise ModelError(f"--clip {source.name}: cannot be loaded as a CLIPModel and CLIPProcessor "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.seconds = 0.0

    def score(self, images: list, prompts: list[str]) -> list[float]:
        """100 · max(cos(image, prompt), 0) for each pair; images are PIL images."""
        import numpy as np
        import torch

        started = time.perf_counter()
        # torchmetrics hands the processor CHW uint8 tensors: the same here, so pixels resample alike
        tensors = [torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) for image in images]
        with torch.inference_mode():
            pixels = self.processor(images=tensors, return_tensors="pt", padding=True)["pixel_values"]
            image = _features(self.model.get_image_features(pixels.to(self.device)))
            text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.max_length)
            words = _features(self.model.get_text_features(text["input_ids"].to(self.device),
                                                           text["attention_mask"].to(self.device)))
            image = image / image.norm(p=2, dim=-1, keepdim=True)
            words = words / words.norm(p=2, dim=-1, keepdim=True)
            scores = (100 * (image * words).sum(dim=-1)).clamp(min=0).float().cpu().tolist()
        self.seconds += time.perf_counter() - started
        return scores


def _features(output):
    """The projected embedding: transformers 4 returns the tensor, 5 an output whose pooler_output it is."""
    return output if hasattr(output, "norm") else output.pooler_output


def prompt_of(meta: dict) -> str | None:
    """The text an image is scored against, or None: clip_embed rows ignore their text, and an image
    prompt may come without one."""
    if meta.get("image_prompt_method") == "clip_embed":
        return None
    prompt = meta.get("prompt")
    return prompt if isinstance(prompt, str) and prompt.strip() else None


@dataclass
class Tally:
    """What a scoring pass has done so far (kept when it is interrupted)."""

    scored: int = 0
    unreadable: list = field(default_factory=list)  # files missing or not decodable


def score_images(scorer: ClipScorer, checkpoint: Checkpoint, images_dir: Path, todo: list[tuple[str, str, str]],
                 batch_size: int, stop: Stop, tally: Tally, progress=None) -> None:
    """Score (key, file, prompt) items in batches, one transaction per batch, counting into `tally`.

    StopRequested between batches once `stop` is asked for: every committed batch stays.
    """
    for start in range(0, len(todo), batch_size):
        stop.check()
        batch = todo[start : start + batch_size]
        readable = []
        for key, file, prompt in batch:
            picture = read_written(images_dir / file)
            if picture is None:
                log.warning("cannot read %s: not scored", images_dir / file)
                tally.unreadable.append(file)
            else:
                readable.append((key, picture, prompt))
        if readable:
            values = scorer.score([p for _, p, _ in readable], [t for _, _, t in readable])
            checkpoint.save_clip_scores(scorer.source.identity, [(key, v) for (key, _, _), v in zip(readable, values)])
            tally.scored += len(readable)
        if progress is not None:
            progress.advance(len(batch))


def score_folder(out: Path, clip: str, device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE,
                 quiet: bool = False, stop: Stop | None = None) -> ScoreResult:
    """`sdbatch score OUT --clip MODEL`: score every done image this CLIP model has not scored yet,
    then rewrite metadata.jsonl and the reports from the checkpoint."""
    from .lock import FolderLock
    from .models import resolve_device
    from .runner import finish_outputs

    out, stop = Path(out), stop if stop is not None else Stop()
    if not (out / FILE_NAME).exists():
        raise OutputError(f"no checkpoint at {out / FILE_NAME}: is this an sdbatch output folder?")
    if batch_size < 1:
        raise OutputError(f"--batch-size must be >= 1, got {batch_size}")
    source = resolve_clip(clip)
    device = resolve_device(device)
    with FolderLock(out):  # a run writing OUT, or another score, would race this one's commits and rewrites
        checkpoint = Checkpoint(out / FILE_NAME)
        try:
            checkpoint.absorb_journals(out)  # what the ranks of a multi-process run recorded
            checkpoint.use_clip_model(source.identity, source.name)
            tally, pending = Tally(), Pending.of(checkpoint, source.identity)
            log.info("%d image(s) to score with %s; %d scored earlier; %d skipped: no text prompt (clip_embed rows, "
                     "image prompts without text)", len(pending.todo), source.name, pending.earlier, pending.skipped)
            interrupted = False
            if pending.todo:
                try:
                    score_pending(pending, ClipScorer(source, device), checkpoint, out / "images", batch_size, stop,
                                  tally, quiet)
                except (KeyboardInterrupt, StopRequested):
                    interrupted = True
                    log.warning("interrupted after %d image(s): their scores are kept; run the same command to "
                                "score the rest", tally.scored)
            finish_outputs(out, checkpoint)
        finally:
            checkpoint.close()
    return ScoreResult(out, source.name, tally.scored, pending.earlier, pending.skipped, tally.unreadable, interrupted)


@dataclass(frozen=True)
class Pending:
    """A folder's done images as a CLIP model finds them: still to score, scored earlier, without a prompt."""

    todo: list  # (key, file, prompt), in manifest order
    earlier: int
    skipped: int

    @classmethod
    def of(cls, checkpoint: Checkpoint, model: str) -> Pending:
        todo, skipped = [], 0
        for key, file, meta in checkpoint.unscored_images(model):
            prompt = prompt_of(json.loads(meta))
            if prompt is None:
                skipped += 1
            else:
                todo.append((key, file, prompt))
        return cls(todo, len(checkpoint.clip_scores(model)), skipped)


def score_pending(pending: Pending, scorer: ClipScorer, checkpoint: Checkpoint, images_dir: Path, batch_size: int,
                  stop: Stop, tally: Tally, quiet: bool = False) -> None:
    """`pending.todo` in batches under a progress bar; StopRequested as `score_images`."""
    from .progress import Progress

    started = time.perf_counter()
    with Progress(len(pending.todo), quiet=quiet) as progress:
        progress.set_group(f"clip score ({scorer.source.name})")
        score_images(scorer, checkpoint, images_dir, pending.todo, batch_size, stop, tally, progress)
    log.info("scored %d image(s) with %s on %s in %.1f s", tally.scored, scorer.source.name, scorer.device,
             time.perf_counter() - started)


class RunScorer:
    """`run --clip-score`: scores each batch's images, read back from their files, once they are recorded."""

    def __init__(self, clip: str, device: str, images_dir: Path, checkpoint: Checkpoint):
        self.scorer = ClipScorer(resolve_clip(clip), device)
        self.images_dir = images_dir
        self.tally = Tally()
        checkpoint.use_clip_model(self.scorer.source.identity, self.scorer.source.name)

    def record(self, outcomes: list[Outcome], checkpoint: Checkpoint) -> None:
        """Score the done images among `outcomes`; their scores are one transaction."""
        todo = [(o.task.key, o.file, prompt_of(o.meta)) for o in outcomes if o.ok and o.file and o.meta]
        todo = [item for item in todo if item[2] is not None]
        if todo:
            score_images(self.scorer, checkpoint, self.images_dir, todo, len(todo), Stop(), self.tally)


def score_rest(clip: str, device: str, checkpoint: Checkpoint, out: Path, batch_size: int, stop: Stop,
               quiet: bool = False) -> bool:
    """The end of `run --clip-score`: score the done images the run did not make (done earlier, adopted),
    loading the CLIP model only if there are any; True if stopped on the way."""
    source = resolve_clip(clip)
    pending = Pending.of(checkpoint, source.identity)
    if not pending.todo:
        return False
    log.info("scoring %d image(s) made before this run with %s", len(pending.todo), source.name)
    try:
        score_pending(pending, ClipScorer(source, device), checkpoint, Path(out) / "images", batch_size, stop, Tally(),
                      quiet)
    except (KeyboardInterrupt, StopRequested):
        log.warning("interrupted while scoring: the scores computed so far are kept")
        return True
    return False
