"""The embedded model's CLIP tokenizer, built here: a byte-level BPE learnt from a word list.

Nothing is downloaded: `build_tokenizer` writes `vocab.json` and `merges.txt` in the layout
of openai/clip-vit-large-patch14 and loads them with transformers' `CLIPTokenizer`. The
output is deterministic. `batch.sd15_configs` reuses the byte table and special tokens.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LENGTH = 77  # CLIP context length, as SD 1.5
MAX_MERGES = 2000
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

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
