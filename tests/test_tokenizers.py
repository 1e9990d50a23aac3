"""Offline BERT / CLIP tokenizers give the real tokenizers' ids (docs/CONTRACTS.md, "Tokenizers").

The golden ids below were produced by the reference implementations themselves: BERT by
pytorch-pretrained-bert 0.6.2's `BertTokenizer` run through the official MaPPER loader's steps
(lower, strip, tokenize, truncate to L-2, [CLS]/[SEP], zero-pad), CLIP by OpenAI CLIP's
`SimpleTokenizer.encode(phrase.lower())`, plus the ids published in OpenAI CLIP's README.
Tests that read ../shared skip cleanly when it is absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from src.data.tokenizers import (
    BERT_VOCAB,
    CLIP_DIR,
    BertWordPiece,
    ClipBPE,
    bert_tokenizer,
    bytes_to_unicode,
    clip_tokenizer,
    clip_vocab_files,
    read_clip_vocab,
)
from tests.conftest import SHARED

SHARED_VOCAB = SHARED / "data" / "vocab"
CASES = sorted((SHARED / "parity" / "cases").glob("*.json")) if SHARED.is_dir() else []


def _need_shared(path: Path) -> Path:
    """Skip the calling test when a ../shared file is not there (e.g. outside the steering checkout)."""
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not available here)")
    return path


@pytest.fixture(scope="module")
def bert() -> BertWordPiece:
    """One bundled-vocabulary BERT tokenizer for the whole module (building it takes ~0.1 s)."""
    return bert_tokenizer()


@pytest.fixture(scope="module")
def clip() -> ClipBPE:
    """One bundled-vocabulary CLIP tokenizer for the whole module."""
    return clip_tokenizer()


# ------------------------------------------------------------------------------------------------------ BERT


def test_bert_special_ids_and_known_words(bert: BertWordPiece) -> None:
    """The bundled vocabulary is bert-base-uncased: known special-token and word ids."""
    assert bert.vocab_size == 30522
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id) == (0, 100, 101, 102)
    assert bert.hf.convert_tokens_to_ids(["man", "left"]) == [2158, 2187]
    ids, mask = bert(["man left"], 6)
    assert ids.tolist() == [[101, 2158, 2187, 102, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("Man on the LEFT", [101, 2158, 2006, 1996, 2187, 102]),  # lower case
        (
            "  the man's shirt, left-side.  ",
            [101, 1996, 2158, 1005, 1055, 3797, 1010, 2187, 1011, 2217, 1012, 102],
        ),
        ("Café naïve Ångström", [101, 7668, 15743, 17076, 15687, 102]),  # accents stripped, ##pieces
        ("2nd from left, 123 456", [101, 3416, 2013, 2187, 1010, 13138, 3429, 2575, 102]),  # digits
        ("guy with ☃ and 😀", [101, 3124, 2007, 100, 1998, 100, 102]),  # unknown characters -> [UNK]
        ("[UNK] [cls]", [101, 1031, 4895, 2243, 1033, 1031, 18856, 2015, 1033, 102]),  # lowered: not special
        ("中国 人", [101, 1746, 1799, 1756, 102]),  # CJK characters are split one by one
        ("a" * 101, [101, 100, 102]),  # a word longer than 100 characters is [UNK]
        ("unbelievably", [101, 4895, 8671, 2666, 3567, 6321, 102]),
    ],
)
def test_bert_golden_ids(bert: BertWordPiece, phrase: str, expected: list[int]) -> None:
    """Ids equal pytorch-pretrained-bert's through the official loader's steps (max_len 20)."""
    ids, mask = bert([phrase], 20)
    assert ids[0].tolist() == expected + [0] * (20 - len(expected))
    assert mask[0].tolist() == [1] * len(expected) + [0] * (20 - len(expected))


def test_bert_truncation_keeps_first_pieces(bert: BertWordPiece) -> None:
    """Only the first max_len-2 pieces are kept, then [SEP]; a full row has no padding."""
    ids, mask = bert(["the tall man holding an umbrella"], 6)
    assert ids.tolist() == [[101, 1996, 4206, 2158, 3173, 102]]
    assert mask.tolist() == [[1] * 6]
    ids, mask = bert(["the tall man"], 2)
    assert ids.tolist() == [[101, 102]] and mask.tolist() == [[1, 1]]
    with pytest.raises(ValueError):
        bert(["the tall man"], 1)


def test_bert_sentence_pair_like_official_loader(bert: BertWordPiece) -> None:
    """A phrase "A ||| B" is a sentence pair in the official loader; the longer side is trimmed first."""
    ids, _ = bert(["left man ||| right woman in red"], 8)
    assert ids.tolist() == [[101, 2187, 2158, 102, 2157, 2450, 1999, 102]]


def test_bert_batch_shapes_and_inputs(bert: BertWordPiece) -> None:
    """Batches pad to max_len with zeros; a lone string is one phrase; an empty batch is (0, L)."""
    ids, mask = bert(["white dog", "", "the tall man holding an umbrella"], 10)
    assert ids.shape == mask.shape == (3, 10) and ids.dtype == mask.dtype == torch.long
    assert ids[1].tolist() == [101, 102] + [0] * 8
    assert mask.sum(1).tolist() == [4, 2, 8]
    assert torch.equal(ids[ids == 0], torch.zeros_like(ids[ids == 0]))
    assert torch.equal(bert("white dog", 10)[0], bert(["white dog"], 10)[0])
    assert bert([], 10)[0].shape == (0, 10)


def test_bert_bundled_vocab_equals_shared() -> None:
    """The bundled vocab.txt is the shared bert-base-uncased one, byte for byte."""
    shared = _need_shared(SHARED_VOCAB / "bert-base-uncased-vocab.txt")
    assert BERT_VOCAB.read_bytes() == shared.read_bytes()


@pytest.mark.parametrize("case", CASES or [None], ids=[c.stem for c in CASES] or ["no-cases"])
def test_bert_matches_parity_cases(bert: BertWordPiece, case: Path | None) -> None:
    """Every parity case's phrases tokenise to the ids and masks the official code produced."""
    if case is None:
        pytest.skip(f"no parity case files in {SHARED / 'parity' / 'cases'} (../shared is absent)")
    data = json.loads(case.read_text())
    max_len = data["inputs"]["max_query_len"]
    samples = data["inputs"]["samples"]
    ids, mask = bert([s["phrase"] for s in samples], max_len)
    for row, sample in enumerate(samples):
        assert ids[row].tolist() == sample["input_ids"], sample["phrase"]
        assert mask[row].tolist() == sample["attention_mask"], sample["phrase"]
        if "tokens" in sample:
            real = int(mask[row].sum())
            assert bert.hf.convert_ids_to_tokens(ids[row, :real].tolist()) == sample["tokens"]


def test_parity_cases_present_when_shared_is() -> None:
    """Guard the parametrised test above against silently running on zero cases."""
    _need_shared(SHARED / "parity" / "cases")
    assert CASES, "no parity case files found"


def test_bert_vocab_path_argument(tmp_path: Path) -> None:
    """A given vocab file is really used (transformers 5 ignores `vocab_file=`, so this is checked)."""
    tiny = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "white"]
    (tmp_path / "vocab.txt").write_text("\n".join(tiny) + "\n")
    tok = bert_tokenizer(tmp_path / "vocab.txt")
    assert tok.vocab_size == 7
    assert tok(["White dog cat"], 6)[0].tolist() == [[2, 6, 5, 1, 3, 0]]


# ------------------------------------------------------------------------------------------------------ CLIP


def test_clip_special_ids(clip: ClipBPE) -> None:
    """SOT/EOT ids and vocabulary size of OpenAI CLIP."""
    assert clip.vocab_size == 49408
    assert (clip.sot_id, clip.eot_id, clip.pad_id) == (49406, 49407, 0)


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        # published in OpenAI CLIP's README / notebooks
        ("a photo of a cat", [320, 1125, 539, 320, 2368]),
        ("a diagram", [320, 22697]),
        ("a dog", [320, 1929]),
        ("a cat", [320, 2368]),
        # produced by OpenAI CLIP's SimpleTokenizer.encode(phrase.lower())
        ("the man's red shirt, left-side.", [518, 786, 568, 736, 2523, 267, 1823, 268, 1145, 269]),
        ("café 2nd from left 123", [15304, 273, 1764, 633, 1823, 272, 273, 274]),
        ("guy with 😀", [2149, 593, 7334]),
        ("Tom &amp; Jerry", [2435, 261, 9164]),
        ("antidisestablishmentarianism", [3120, 4262, 7726, 12658, 1585, 44351]),
        ("zebra-striped giraffes", [22548, 268, 22192, 16949, 46441]),
        (
            "<|endoftext|> x<|endoftext|> $<|endoftext|>",
            [49407, 343, 49407, 3, 27, 347, 40786, 4160, 91, 285],
        ),
    ],
)
def test_clip_golden_ids(clip: ClipBPE, phrase: str, expected: list[int]) -> None:
    """Ids equal OpenAI CLIP's simple tokenizer, wrapped in SOT/EOT and zero-padded (max_len 20)."""
    ids, mask = clip([phrase], 20)
    full = [49406, *expected, 49407]
    assert ids[0].tolist() == full + [0] * (20 - len(full))
    assert mask[0].tolist() == [1] * len(full) + [0] * (20 - len(full))


def test_clip_cleaning_lower_case_and_whitespace(clip: ClipBPE) -> None:
    """Upper case and runs of whitespace do not change the ids (OpenAI's whitespace_clean + lower)."""
    assert clip.pieces(["  A\tPhoto \n of  a CAT "]) == [[320, 1125, 539, 320, 2368]]


def test_clip_truncation_padding_and_masks(clip: ClipBPE) -> None:
    """First max_len-2 tokens are kept, then EOT; shorter phrases are zero-padded with mask 0."""
    ids, mask = clip(["a photo of a cat", "a dog", ""], 5)
    assert ids.tolist() == [
        [49406, 320, 1125, 539, 49407],
        [49406, 320, 1929, 49407, 0],
        [49406, 49407, 0, 0, 0],
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    assert clip(["a dog"], 2)[0].tolist() == [[49406, 49407]]
    assert clip([], 7)[0].shape == (0, 7)
    with pytest.raises(ValueError):
        clip(["a dog"], 1)


def test_clip_ftfy_option() -> None:
    """With ftfy (as OpenAI CLIP uses), curly quotes are straightened before BPE."""
    if importlib.util.find_spec("ftfy") is None:
        pytest.skip("ftfy is not installed (optional)")
    tok = clip_tokenizer(use_ftfy=True)
    assert tok.pieces(["don’t"]) == tok.pieces(["don't"])


def test_clip_bundled_files_structure() -> None:
    """Bundled vocab.json / merges.txt have CLIP's layout: bytes, bytes+</w>, merges, SOT, EOT."""
    vocab, merges = read_clip_vocab(CLIP_DIR)
    assert len(vocab) == 49408 and len(merges) == 48894
    assert sorted(vocab.values()) == list(range(49408))
    alphabet = list(bytes_to_unicode().values())
    assert len(set(alphabet)) == 256
    by_id = {i: t for t, i in vocab.items()}
    assert [by_id[i] for i in range(256)] == alphabet
    assert [by_id[256 + i] for i in range(256)] == [a + "</w>" for a in alphabet]
    assert merges[0] == ("i", "n") and by_id[512] == "in"
    assert all(vocab[a + b] == 512 + k for k, (a, b) in enumerate(merges))
    assert by_id[49406] == "<|startoftext|>" and by_id[49407] == "<|endoftext|>"


def test_clip_bundled_files_rederived_from_shared() -> None:
    """Re-deriving vocab.json and merges.txt from the shared OpenAI merges file gives identical bytes."""
    gz = _need_shared(SHARED_VOCAB / "bpe_simple_vocab_16e6.txt.gz")
    for name, data in clip_vocab_files(gz).items():
        bundled = (CLIP_DIR / name).read_bytes()
        assert hashlib.sha256(bundled).hexdigest() == hashlib.sha256(data).hexdigest(), name
