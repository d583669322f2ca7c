"""The offline tiny backbone's tokenizer: a CLIP BPE tokenizer whose vocabulary and merges are learnt here.

The merges come from a fixed corpus of portrait-prompt words, deterministically, so the tiny backbone needs no
download; `model_max_length=77` as SD's. `write_vocab_files` gives any CLIP tokenizer folder the
`vocab.json` + `merges.txt` pair that SD folders (and older loaders) expect.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from transformers import CLIPTokenizer

# The corpus the tiny tokenizer's BPE merges are learnt from: words of portrait prompts.
TOKENIZER_CORPUS = """
a photo of a person portrait face smiling woman man child people group friends family team
at the beach in a park studio light close up headshot wearing glasses hat shirt dress suit
astronaut space helmet red blue green yellow black white brown hair eyes nose mouth beard
happy sad serious looking camera left right center standing sitting together outdoors indoors
high quality detailed realistic photograph painting oil watercolor cinematic lighting sunset
city street mountain forest snow winter summer autumn spring wedding party office school
two three four five six seven eight persons faces small large background foreground blurry
"""


def write_vocab_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Write `vocab.json` + `merges.txt` beside `tokenizer.json`, the layout of SD 1.5's tokenizer folder.

    transformers 5 saves only `tokenizer.json`; SD folders (and older loaders) expect the two BPE files.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (every byte gets a visible character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, chars = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, chars), strict=True))


def build_clip_vocab(corpus: str = TOKENIZER_CORPUS, n_merges: int = 400) -> tuple[dict[str, int], list[str]]:
    """Learn a CLIP-style BPE vocabulary (with `</w>` word ends) from `corpus`, deterministically.

    Returns:
        (vocab token -> id, merges as "a b" strings in rank order).
    """
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    words = collections.Counter(corpus.lower().split())
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, parts in splits.items():
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] += words[word]
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the result never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for word, parts in splits.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = tuple(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_tiny_tokenizer(n_merges: int = 400) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the project's own vocabulary, `model_max_length=77`.

    transformers 5's `CLIPTokenizer` ignores `vocab_file=`/`merges_file=` (it silently builds a 3-token
    tokenizer), so the vocabulary is passed as objects.
    """
    vocab, merges = build_clip_vocab(n_merges=n_merges)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer
