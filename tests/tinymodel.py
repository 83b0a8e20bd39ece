"""Tiny, random-init chat models built offline for tests.

The tokenizer is a byte-level BPE trained in a second on a fixed corpus, with SmolLM2's ChatML chat
template, so masks and templates behave as they do on the embedded default model. The model is a
two-layer Llama built from a config. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

# SmolLM2-135M-Instruct's chat template, verbatim (the embedded default model serves with it).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A train leaves the station at 3 pm and travels 60 miles per hour.",
    "Restate the quantities, compute step by step, and end with Answer: 42.",
    "You are a helpful assistant. Think carefully before you answer the question.",
    "Verification: the initial answer is wrong because 7 times 8 is 56, not 54.",
    "Below is a context and an instruction. Based on the information provided in the context, "
    "write a response for the instruction.",
    "### Context: ### Instruction: [INST] [/INST] system user assistant",
    "def add(a, b):\n    return a + b\n",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 + - * / = ( ) : ; , . ? !",
    "Alice has 12 apples and gives 5 to Bob. How many apples does Alice have left? Answer: 7",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
]


def build_tokenizer(vocab_size: int = 600):
    """A fast byte-level BPE tokenizer with ChatML specials and offsets that map back to characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model_dir(path: Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a random-init Llama chat model with its tokenizer to ``path`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
