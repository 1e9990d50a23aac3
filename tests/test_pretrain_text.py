"""The cached synthetic pretraining stage for random text towers (src/pretraining/text.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from src.data.synthetic import ensure_synthetic, record_attributes, split_path
from src.data.tokenizers import bert_tokenizer, clip_tokenizer
from src.models.encoders import PriorSettings, TextSettings, build_clip_text, build_text
from src.pretraining.text import (
    TextPretraining,
    clip_tower,
    ensure_pretrained_text,
    expression_fields,
    phrase_labels,
    text_tower,
    train_tokens,
)

BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
CLIP = {**BERT, "projection_dim": 32}
MAX_LEN = 16


def corpus(tmp_path: Path, scenes: int = 8) -> Path:
    return ensure_synthetic(tmp_path / "data", seed=5, n_train=scenes, n_val=0, n_test=0)


def tiny_bert():
    return text_tower(TextSettings(config=BERT))


def test_expression_fields_flatten_the_structure_without_the_surface_form():
    expression = {"kind": "relation", "np": {"size": "", "colour": "red", "shape": "circle"}, "direction": "left",
                  "anchor": {"size": "", "colour": "blue", "shape": "square"}, "forms": [1, 2, 3]}
    assert expression_fields(expression) == {
        "kind": "relation", "np.size": "", "np.colour": "red", "np.shape": "circle", "direction": "left",
        "anchor.size": "", "anchor.colour": "blue", "anchor.shape": "square",
    }


def test_phrase_labels_index_each_field_of_each_phrase(tmp_path: Path):
    root = corpus(tmp_path)
    phrases, vocab, labels = phrase_labels(root)
    records = torch.load(split_path(root, "train"), weights_only=True)
    assert phrases == [r[3] for r in records]
    assert labels.shape == (len(records), len(vocab))
    for row, record in zip(labels.tolist(), records, strict=True):
        fields = expression_fields(record_attributes(record)["expression"])
        decoded = {name: values[k] for (name, values), k in zip(vocab.items(), row, strict=True)}
        assert decoded == {name: fields.get(name, "") for name in vocab}
        colour = decoded["np.colour"]
        assert colour == "" or colour in record[3]  # the label is what the phrase says


def test_training_makes_every_token_predict_its_phrase(tmp_path: Path):
    phrases, vocab, labels = phrase_labels(corpus(tmp_path, scenes=40))
    ids, mask = bert_tokenizer()(phrases, MAX_LEN)
    torch.manual_seed(0)
    module, features = tiny_bert()
    classes = [len(v) for v in vocab.values()]
    untrained = train_tokens(module, features, ids, mask, labels, classes, TextPretraining(steps=1, lr=1e-9))
    torch.manual_seed(0)
    module, features = tiny_bert()
    trained = train_tokens(module, features, ids, mask, labels, classes, TextPretraining(steps=150, lr=3e-3))
    assert trained < 0.5 * untrained


def test_stage_trains_once_caches_and_loads_into_both_towers(tmp_path: Path):
    root, cache = corpus(tmp_path), tmp_path / "cache"
    settings = TextPretraining(steps=2, batch_size=4)
    path = ensure_pretrained_text(root, "bert", BERT, tiny_bert, bert_tokenizer(), MAX_LEN, settings, cache)
    stamp = path.stat().st_mtime_ns
    assert ensure_pretrained_text(root, "bert", BERT, tiny_bert, bert_tokenizer(), MAX_LEN, settings, cache) == path
    assert path.stat().st_mtime_ns == stamp  # cached, not retrained
    other = ensure_pretrained_text(root, "bert", BERT, tiny_bert, bert_tokenizer(), MAX_LEN,
                                   TextPretraining(steps=3, batch_size=4), cache)
    assert other != path
    loaded = build_text(TextSettings(config=BERT, init_checkpoint=str(path)), pretrained=False, token_type=True)
    saved = torch.load(path, weights_only=True)
    assert torch.equal(loaded.embeddings.word_embeddings.weight, saved["embeddings.word_embeddings.weight"])

    def tiny_clip():
        return clip_tower(PriorSettings(config=CLIP))

    clip_path = ensure_pretrained_text(root, "clip", CLIP, tiny_clip, clip_tokenizer(), MAX_LEN, settings, cache)
    clip = build_clip_text(PriorSettings(config=CLIP, init_checkpoint=str(clip_path)), pretrained=False)
    saved = torch.load(clip_path, weights_only=True)
    assert torch.equal(clip.text_projection.weight, saved["text_projection.weight"])
