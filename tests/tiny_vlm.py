"""Build a tiny random-weight Idefics3 (SmolVLM) folder: Hugging Face's weight names and processor files.

Its processor configuration is SmolVLM-256M-Instruct's with smaller sizes: 64-pixel tiles of 16-pixel
patches, pixel shuffle by 2 (4 image tokens per tile), images resized to at most 128 pixels (so up to 2 x 2
tiles and a global one when splitting). ``lm_head`` is scaled so greedy answers are not one token repeated.
"""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlx_manager_nb import vision

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
           "<end_of_utterance>", "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]
CORPUS = ["User: What is in this image? Assistant: A plot of a sine wave. The capital of France is Paris.",
          "Describe the picture in one sentence. It shows red and blue squares on a white page."]
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def _hf_name(key: str) -> str:
    if key.startswith("vision."):
        return "model." + key.removeprefix("vision.")
    if key.startswith("model."):
        return "model.text_model." + key.removeprefix("model.")
    return key


def build_tiny_vlm(path: Path, seed: int = 0, splitting: bool = True, tile: int = 64, patch: int = 16, scale: int = 2,
                   **vision_config: int) -> Path:
    """Write the tiny VLM to ``path``: ``splitting`` is the processor's do_image_splitting; ``tile``, ``patch`` and
    ``scale`` the tile's and a patch's pixels and the pixel shuffle; ``vision_config`` overrides the tower's sizes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 2048,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "processor_class": "Idefics3Processor"}))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": True, "do_image_splitting": splitting, "do_normalize": True, "do_pad": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Idefics3ImageProcessor", "max_image_size": {"longest_edge": tile},
        "processor_class": "Idefics3Processor", "resample": 1, "rescale_factor": 1 / 255,
        "size": {"longest_edge": 2 * tile}}))
    (path / "processor_config.json").write_text(json.dumps({
        "image_seq_len": (tile // patch) ** 2 // scale**2, "processor_class": "Idefics3Processor"}))
    config = {
        "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
        "image_token_id": tok.token_to_id("<image>"), "scale_factor": scale, "vocab_size": vocab,
        "eos_token_id": tok.token_to_id("<end_of_utterance>"),
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
                        "rope_theta": 100000.0, "vocab_size": vocab, "max_position_embeddings": 2048,
                        "tie_word_embeddings": False},
        "vision_config": {"model_type": "idefics3_vision", "hidden_size": 32, "intermediate_size": 64,
                          "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": patch, "image_size": tile,
                          "layer_norm_eps": 1e-6, **vision_config},
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    mx.random.seed(seed)
    model = vision.make(config)
    weights = {}
    for key, value in tree_flatten(model.parameters()):
        value = value * 20 if key == "lm_head.weight" else value
        if key.endswith("patch_embedding.weight"):
            value = value.transpose(0, 3, 1, 2)  # PyTorch's layout, as Hugging Face checkpoints hold it
        weights[_hf_name(key)] = value
    weights["model.vision_model.embeddings.position_ids"] = mx.arange((tile // patch) ** 2)[None]
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    return path
