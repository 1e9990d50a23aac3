"""Offline BERT WordPiece and CLIP BPE tokenizers built from the vocabularies in `src/assets/vocab/`.

Both return a callable `tok(phrases, max_len) -> (ids, mask)` (LongTensors of shape (B, max_len)) with the
attribute `vocab_size` (see docs/CONTRACTS.md, "Tokenizers"). The word splitting itself is done by
transformers' tokenizers (the Rust `tokenizers` backend); truncation, the special tokens and the padding
are done here, so that they follow the official MaPPER loader exactly (the tokenizer call's `truncation=`
and `padding=` do not promise its pair rule below or CLIP's cleaning; tests/test_tokenizers.py holds both
to the official ids):

* BERT: `phrase.lower().strip()`, uncased WordPiece (accents stripped, punctuation split), the first
  `max_len - 2` pieces, `[CLS] ... [SEP]`, zero padding, mask 1 on real tokens.
* CLIP: OpenAI CLIP's text cleaning (optional ftfy, HTML unescaping, whitespace collapsing, lower case),
  byte-level BPE, the first `max_len - 2` tokens, `<|startoftext|> ... <|endoftext|>`, zero padding,
  mask 1 on real tokens.
"""

from __future__ import annotations

import gzip
import html
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

VOCAB_DIR = Path(__file__).resolve().parents[1] / "assets" / "vocab"
BERT_VOCAB = VOCAB_DIR / "bert-base-uncased-vocab.txt"
CLIP_DIR = VOCAB_DIR / "clip"

# OpenAI's bpe_simple_vocab_16e6: line 0 is a header; lines 1 .. 48894 are the merges that CLIP uses
# (49152 - 256 - 2 of them, so that the vocabulary holds 2 * 256 + 48894 + 2 = 49408 entries).
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_SOT = "<|startoftext|>"
CLIP_EOT = "<|endoftext|>"
CLIP_MERGES_HEADER = "#version: 0.2"
# OpenAI CLIP's word pattern (compiled with IGNORECASE, as OpenAI does).
CLIP_WORD_PATTERN = "|".join(
    [r"<\|startoftext\|>", r"<\|endoftext\|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    + [r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+"]
)

_WHITESPACE = re.compile(r"\s+")
# The official loader's sentence-pair syntax (TransVG's read_examples): "A ||| B".
_BERT_PAIR = re.compile(r"^(.*) \|\|\| (.*)$")


def _check_max_len(max_len: int) -> None:
    """Reject a length that cannot hold the two special tokens, so that no phrase is silently lost."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (room for the two special tokens), got {max_len}")


def _pad(rows: Sequence[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad id lists (each at most max_len long) into (ids, mask) LongTensors; mask 1 = real token."""
    ids = torch.zeros(len(rows), max_len, dtype=torch.long)
    mask = torch.zeros(len(rows), max_len, dtype=torch.long)
    for row, seq in enumerate(rows):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _as_list(phrases: Sequence[str] | str) -> list[str]:
    """Accept one phrase or a sequence of phrases, so that a lone string is not split into characters."""
    return [phrases] if isinstance(phrases, str) else list(phrases)


# ----------------------------------------------------------------------------------------------------- BERT


def read_bert_vocab(path: str | Path) -> dict[str, int]:
    """Read a one-token-per-line WordPiece vocabulary into {token: line index}, as BERT numbers it."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        vocab[token.rstrip("\r")] = index
    return vocab


class BertWordPiece:
    """Uncased BERT WordPiece tokenizer with the official MaPPER truncation, special tokens and padding."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        """Build the tokenizer offline from a vocab.txt (default: the bundled bert-base-uncased one)."""
        from transformers import BertTokenizer

        self.vocab_path = Path(vocab_path) if vocab_path is not None else BERT_VOCAB
        vocab = read_bert_vocab(self.vocab_path)
        # transformers 5 ignores `vocab_file=`; the vocabulary must be handed over as `vocab=`.
        self.hf = BertTokenizer(vocab=vocab, do_lower_case=True, strip_accents=None)
        if self.hf.vocab_size != len(vocab) or self.hf.convert_tokens_to_ids("[SEP]") != vocab["[SEP]"]:
            raise RuntimeError(f"transformers did not take the vocabulary from {self.vocab_path}")
        self.vocab_size: int = len(vocab)
        self.pad_id: int = vocab["[PAD]"]
        self.unk_id: int = vocab["[UNK]"]
        self.cls_id: int = vocab["[CLS]"]
        self.sep_id: int = vocab["[SEP]"]

    def pieces(self, phrases: Sequence[str] | str) -> list[list[int]]:
        """WordPiece ids of each phrase (lower-cased, stripped), without special tokens or truncation."""
        texts = [p.lower().strip() for p in _as_list(phrases)]
        if not texts:
            return []
        return [list(x) for x in self.hf(texts, add_special_tokens=False)["input_ids"]]

    def tokens(self, phrase: str) -> list[str]:
        """WordPiece strings of one phrase, without special tokens, for inspection and tests."""
        return self.hf.convert_ids_to_tokens(self.pieces(phrase)[0])

    def encode(self, phrases: Sequence[str] | str, max_len: int) -> list[list[int]]:
        """Unpadded id lists, built exactly like the official loader (read_examples + convert_examples).

        A phrase is `[CLS] a [SEP]` with a truncated to max_len-2 pieces. As in the official loader, a
        (stripped) phrase of the form "A ||| B" is a sentence pair: `[CLS] a [SEP] b [SEP]`, the longer of
        a and b losing its last piece until both fit in max_len-3 (RefCOCO phrases never contain " ||| ").
        """
        _check_max_len(max_len)
        texts = [p.lower().strip() for p in _as_list(phrases)]
        parts: list[tuple[str, str | None]] = []
        for text in texts:
            pair = _BERT_PAIR.match(text)
            parts.append((pair.group(1), pair.group(2)) if pair else (text, None))
        flat = [segment for a, b in parts for segment in ((a,) if b is None else (a, b))]
        encoded = iter(self.hf(flat, add_special_tokens=False)["input_ids"] if flat else [])
        rows: list[list[int]] = []
        for _, b in parts:
            first = list(next(encoded))
            second = list(next(encoded)) if b is not None else []
            if not second:
                rows.append([self.cls_id, *first[: max_len - 2], self.sep_id])
                continue
            if max_len < 3:
                raise ValueError(f"max_len must be at least 3 for a sentence pair, got {max_len}")
            while len(first) + len(second) > max_len - 3:
                (first if len(first) > len(second) else second).pop()
            rows.append([self.cls_id, *first, self.sep_id, *second, self.sep_id])
        return rows

    def __call__(self, phrases: Sequence[str] | str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids, mask), LongTensors (B, max_len): [CLS] + first max_len-2 pieces + [SEP], 0-padded."""
        return _pad(self.encode(phrases, max_len), max_len)


def bert_tokenizer(vocab_path: str | Path | None = None) -> BertWordPiece:
    """Build the offline uncased BERT tokenizer that reproduces the official MaPPER loader's ids."""
    return BertWordPiece(vocab_path)


# ----------------------------------------------------------------------------------------------------- CLIP


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, the alphabet of byte-level BPE (GPT-2 / CLIP convention).

    Printable Latin-1 bytes map to themselves; the other bytes, in increasing order, take the characters
    from U+0100 on, so that no byte maps to whitespace or a control character. The dict's order (printable
    bytes first, then the others) is the order of the first 256 vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def derive_clip_vocab(bpe_gz: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's token -> id table and merge list from OpenAI's bpe_simple_vocab_16e6.txt.gz.

    Same order as OpenAI's simple tokenizer: the 256 byte characters, the same with `</w>`, the merged
    pair of each of lines 1 .. 48894 of the file, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
    """
    lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    merges: list[tuple[str, str]] = []
    for line in lines[1 : CLIP_NUM_MERGES + 1]:
        left, right = line.split()
        merges.append((left, right))
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + [a + b for a, b in merges] + [CLIP_SOT, CLIP_EOT]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{bpe_gz}: the derived CLIP vocabulary has duplicate entries")
    return vocab, merges


def clip_vocab_files(bpe_gz: str | Path) -> dict[str, bytes]:
    """Serialise the derived CLIP vocabulary as the bytes of HF's `vocab.json` and `merges.txt`."""
    vocab, merges = derive_clip_vocab(bpe_gz)
    vocab_json = json.dumps(vocab, ensure_ascii=False) + "\n"
    merges_txt = "\n".join([CLIP_MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n"
    return {"vocab.json": vocab_json.encode("utf-8"), "merges.txt": merges_txt.encode("utf-8")}


def write_clip_vocab(bpe_gz: str | Path, folder: str | Path = CLIP_DIR) -> None:
    """(Re)generate the bundled `vocab.json` and `merges.txt` in folder from OpenAI's merges file."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in clip_vocab_files(bpe_gz).items():
        (out / name).write_bytes(data)


def read_clip_vocab(folder: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read HF-format `vocab.json` and `merges.txt` from folder into a vocabulary and a merge list."""
    folder = Path(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges: list[tuple[str, str]] = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n"):
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    return vocab, merges


def clip_clean(text: str, use_ftfy: bool = False) -> str:
    """OpenAI CLIP's text cleaning: (ftfy), HTML unescape twice, strip, collapse whitespace, lower case."""
    if use_ftfy:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipBPE:
    """CLIP byte-level BPE tokenizer with the contract's truncation, special tokens and zero padding.

    The text is cleaned and split into words here, exactly as OpenAI's simple tokenizer does (its word
    pattern is case-insensitive, so e.g. "'\u017f" is the contraction "'s", and a special-token string is
    only recognised where a word starts). The words then go through transformers' CLIP BPE model
    (byte-level alphabet, `</w>` end-of-word suffix) without its own normaliser and word splitter.
    """

    def __init__(self, folder: str | Path | None = None, use_ftfy: bool = False) -> None:
        """Build the tokenizer offline from a folder holding vocab.json and merges.txt (default: bundled)."""
        import regex
        from tokenizers import Tokenizer, pre_tokenizers
        from transformers import CLIPTokenizer

        self.folder = Path(folder) if folder is not None else CLIP_DIR
        self.use_ftfy = use_ftfy
        vocab, merges = read_clip_vocab(self.folder)
        self.hf = CLIPTokenizer(vocab=vocab, merges=merges)
        if self.hf.vocab_size != len(vocab) or self.hf.convert_tokens_to_ids(CLIP_EOT) != vocab[CLIP_EOT]:
            raise RuntimeError(f"transformers did not take the vocabulary from {self.folder}")
        # A private copy of the Rust pipeline that only maps bytes and applies BPE to given words; the
        # special tokens stay registered, and since no other word can contain them, only a whole word
        # equal to one becomes its id.
        backend = Tokenizer.from_str(self.hf.backend_tokenizer.to_str())
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.post_processor = None
        self.backend = backend
        self.words = regex.compile(CLIP_WORD_PATTERN, regex.IGNORECASE)
        self.vocab_size: int = len(vocab)
        self.pad_id: int = 0
        self.sot_id: int = vocab[CLIP_SOT]
        self.eot_id: int = vocab[CLIP_EOT]

    def split(self, phrase: str) -> list[str]:
        """Clean one (lower-cased) phrase and split it into OpenAI CLIP's pre-BPE words."""
        return self.words.findall(clip_clean(phrase.lower(), self.use_ftfy))

    def pieces(self, phrases: Sequence[str] | str) -> list[list[int]]:
        """BPE ids of each (cleaned, lower-cased) phrase, without special tokens or truncation."""
        words = [self.split(p) for p in _as_list(phrases)]
        if not words:
            return []
        encodings = self.backend.encode_batch(words, is_pretokenized=True, add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def tokens(self, phrase: str) -> list[str]:
        """BPE token strings of one phrase, without special tokens, for inspection and tests."""
        return self.hf.convert_ids_to_tokens(self.pieces(phrase)[0])

    def __call__(self, phrases: Sequence[str] | str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids, mask), each LongTensor (B, max_len): SOT + first max_len-2 tokens + EOT, 0-padded."""
        _check_max_len(max_len)
        return _pad([[self.sot_id, *p[: max_len - 2], self.eot_id] for p in self.pieces(phrases)], max_len)


def clip_tokenizer(folder: str | Path | None = None, use_ftfy: bool = False) -> ClipBPE:
    """Build the offline CLIP BPE tokenizer (OpenAI CLIP ids) from the bundled or a given vocab folder."""
    return ClipBPE(folder, use_ftfy)


# The contract's type: tok(phrases, max_len) -> (ids, mask).
Tokenizer = Callable[[Sequence[str], int], tuple[torch.Tensor, torch.Tensor]]
