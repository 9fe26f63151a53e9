"""Tiny random-weight llama models in real formats, generated with fixed seeds.

The same weights and tokenizer as an HF-style MLX folder (``mlx_lm.load`` opens it) and as a
GGUF (``llama_cpp.Llama`` opens it), so the runner conformance suite runs the same checks on
both in seconds. Nothing here is committed: the test session builds them once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 1234
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
CONTEXT = 512
VOCAB_TARGET = 400
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WEIGHT_SCALE = 0.5
"""Large enough that greedy decoding wanders instead of repeating one token."""
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello world! How are you today? I am fine, thank you very much.",
    "Numbers like 12, 345 and 6789 appear in text; so do symbols: $ % & * ( ) - + =.",
    "Once upon a time there was a small model that generated tiny stories about cats.",
    "Apple Silicon runs MLX models quickly; llama.cpp runs GGUF files everywhere else.",
    "A stop string must never leak into the output, even when it spans several tokens.",
    "Café, naïve, résumé, 日本語, and emoji 🙂 are multi-byte characters in UTF-8.",
]


@dataclass(frozen=True)
class TinyModels:
    hf_folder: Path
    gguf_path: Path


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


def _weights(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    head_dim = HIDDEN // HEADS

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * WEIGHT_SCALE / np.sqrt(cols)).astype(
            np.float32
        )

    weights = {
        "model.embed_tokens.weight": matrix(vocab, HIDDEN) * 4,
        "model.norm.weight": np.ones(HIDDEN, dtype=np.float32),
        "lm_head.weight": matrix(vocab, HIDDEN) * 8,
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        weights.update(
            {
                f"{prefix}.self_attn.q_proj.weight": matrix(HEADS * head_dim, HIDDEN),
                f"{prefix}.self_attn.k_proj.weight": matrix(KV_HEADS * head_dim, HIDDEN),
                f"{prefix}.self_attn.v_proj.weight": matrix(KV_HEADS * head_dim, HIDDEN),
                f"{prefix}.self_attn.o_proj.weight": matrix(HIDDEN, HEADS * head_dim),
                f"{prefix}.mlp.gate_proj.weight": matrix(INTERMEDIATE, HIDDEN),
                f"{prefix}.mlp.up_proj.weight": matrix(INTERMEDIATE, HIDDEN),
                f"{prefix}.mlp.down_proj.weight": matrix(HIDDEN, INTERMEDIATE),
                f"{prefix}.input_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
                f"{prefix}.post_attention_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
            }
        )
    return weights


def _hf_config(vocab: int) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def make_tiny_hf_model(folder: Path) -> Path:
    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    save_file(_weights(vocab), str(folder / "model.safetensors"), metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(_hf_config(vocab), indent=2))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(folder))
    return folder


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of each Q/K head."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base == "model.embed_tokens":
        return "token_embd.weight"
    if base == "model.norm":
        return "output_norm.weight"
    if base == "lm_head":
        return "output.weight"
    _, _, layer, module = base.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def make_tiny_gguf(path: Path, hf_folder: Path) -> Path:
    """The HF folder's weights and tokenizer, written as llama.cpp's converter would."""
    import gguf
    from safetensors.numpy import load_file

    tokenizer = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    types = [
        gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else gguf.TokenType.NORMAL
        for token in tokens
    ]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_license("Apache-2.0")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in sorted(load_file(str(hf_folder / "model.safetensors")).items()):
        if name.endswith("q_proj.weight"):
            value = _permute(value, HEADS)
        elif name.endswith("k_proj.weight"):
            value = _permute(value, KV_HEADS)
        writer.add_tensor(_gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_tiny_models(root: Path) -> TinyModels:
    folder = make_tiny_hf_model(root / "tiny-llama")
    return TinyModels(folder, make_tiny_gguf(root / "tiny-llama.F32.gguf", folder))
