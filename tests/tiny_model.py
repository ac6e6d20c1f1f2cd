"""A tiny, randomly initialised Llama that vLLM's CPU build can run: no weights are downloaded.

The config and a byte-level BPE tokenizer (with a chat template) are written to a directory; vLLM
loads it with load_format="dummy", so outputs are gibberish but token counts, finish reasons,
sampling parameters and the chat template are all real.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# vLLM's CPU attention needs head_dim >= 32 (64 here: 128 hidden / 2 heads).
ENGINE_ARGS = {
    "load_format": "dummy",
    "dtype": "float32",
    "max_model_len": 256,
    "enforce_eager": True,
    "max_num_seqs": 32,
    "seed": 0,
}


# Shapes of the generated model. "tiny" is what the tests run; "small" (~30M parameters) makes the
# engine, not the queue, dominate on CPU, as a real model does on a GPU.
SIZES = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
}


def make_tiny_model(directory: Path, size: str = "tiny", weights: bool = False) -> Path:
    """weights: also save seeded random weights (about 1.7 MB for "tiny"), to load with
    load_format="auto". vLLM's dummy weights are so small that every logit is nearly equal: a LoRA
    adapter on them changes no greedy token, so the adapter tests need these."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "queues keep gpus busy", "hello world"] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=512,
        **SIZES[size],
        max_position_embeddings=2048,  # room for a long stream to abort midway (test_vllm_abort)
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    config.save_pretrained(directory)
    # Some transformers versions drop the template from tokenizer_config; keep a copy beside it.
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    json.loads((directory / "config.json").read_text())
    if weights:
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def make_lora_adapter(directory: Path, base: Path, seed: int, rank: int = 8) -> Path:
    """A random LoRA adapter for the tiny model in PEFT's layout (adapter_config.json and
    adapter_model.safetensors), on the attention output and MLP down projections of every layer."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, fan_in in (("self_attn.o_proj", hidden), ("mlp.down_proj", inner)):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) * 0.5
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": ["o_proj", "down_proj"], "fan_in_fan_out": False, "base_model_name_or_path": str(base),
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    return directory


if __name__ == "__main__":
    import sys

    print(make_tiny_model(Path(sys.argv[1])))
