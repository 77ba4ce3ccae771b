"""The T5 tokenizer shipped with the Flux configs (models/flux/tokenizer_2): small, deterministic, built here.

flux-random has random weights, so any T5-layout vocabulary serves; this one leaves no prompt text unknown.

T5's id layout: <pad>=0, </s>=1, <unk>=2, the pieces, then <extra_id_99>..<extra_id_0>.
Pieces: "▁" and every printable ASCII character, alone and after "▁" (word starts), so any
English prompt tokenizes without <unk>; scores make word-start pieces preferred.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram


def write(out: Path) -> None:
    """Write tokenizer.json, special_tokens_map.json and tokenizer_config.json into OUT."""
    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")]
                           + [AddedToken(f"<extra_id_{i}>", special=True, normalized=False) for i in range(100)])
    tok.save(str(out / "tokenizer.json"))
    extra = [f"<extra_id_{i}>" for i in range(100)]
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "additional_special_tokens": extra, "clean_up_tokenization_spaces": True, "eos_token": "</s>", "extra_ids": 100,
        "legacy": True, "model_max_length": 512, "pad_token": "<pad>", "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>"}, indent=2) + "\n")


if __name__ == "__main__":  # python -m batch.toy.t5_tokenizer [OUT]
    import sys

    from batch.models import MODELS_DIR

    write(Path(sys.argv[1]) if len(sys.argv) > 1 else MODELS_DIR / "flux" / "tokenizer_2")
