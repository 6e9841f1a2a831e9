"""Build a tiny random-weight llama model with a tokenizer trained on the spot."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a tiny model that could talk.",
    "user assistant system: answer the question in one sentence.",
    "0123456789 {}[]()<>.,;:!?'\"-_=+*/\\|@#$%^&~`",
]

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def build_tiny_model(path: Path, seed: int = 0, chat_template: bool = True, model_type: str = "llama",
                     **sizes: int) -> Path:
    """Write an mlx-lm folder with random weights to `path` and return it.

    ``model_type`` names an mlx-lm family with llama's config keys ("qwen2" has pipeline parallelism);
    a weight index is written too, as multi-file checkpoints have (pipeline loading reads it).
    ``sizes`` override CONFIG's (e.g. ``hidden_size=512`` for a benchmark)."""
    import importlib

    family = importlib.import_module(f"mlx_lm.models.{model_type}")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    config = dict(
        CONFIG,
        **sizes,
        model_type=model_type,
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=eos,
    )
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 512,
        "add_bos_token": False,
    }
    if chat_template:
        tok_config["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))

    mx.random.seed(seed)
    model = family.Model(family.ModelArgs.from_dict(config))
    # Larger than default init so that greedy decoding varies from token to token.
    weights = {
        k: (mx.random.normal(v.shape) * 0.5).astype(mx.float32)
        if k.endswith("weight") and v.ndim == 2
        else v
        for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in weights}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path
