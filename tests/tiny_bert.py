"""Build a tiny random-weight BERT embedding model (sentence-transformers layout) with a WordPiece tokenizer."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from mlx_manager_nb.bert import Bert, read_spec

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Cats and dogs are pets; a cat sleeps all day and a dog barks at night.",
    "Embeddings map sentences to vectors so that similar meanings end up close together.",
    "def add(a, b): return a + b",
    "0123456789 {}[]()<>.,;:!?'\"-_=+*/\\|@#$%^&~`",
]
MAX_LENGTH = 32
CONFIG = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "pad_token_id": 0,
    "matryoshka_dimensions": [8, 16],
}


def train_tokenizer(vocab_size: int = 200) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS * 4, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                                 show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tok


def build_tiny_bert(path: Path, seed: int = 0) -> Path:
    """Write a tiny BERT embedding model to `path` (mean pooling, normalized, 32 tokens at most)."""
    path = Path(path)
    (path / "1_Pooling").mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    config = dict(CONFIG, vocab_size=tok.get_vocab_size())
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": CONFIG["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LENGTH}))
    mx.random.seed(seed)
    model = Bert(config, read_spec(path, config))
    weights = {k: (mx.random.normal(v.shape) * 0.5 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())}
    # as in Hugging Face checkpoints: a buffer and a pooler head that an encoder does not use
    weights["embeddings.position_ids"] = mx.arange(CONFIG["max_position_embeddings"])[None]
    weights["pooler.dense.weight"] = mx.zeros((32, 32))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    return path
