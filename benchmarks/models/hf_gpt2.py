"""A small Hugging Face GPT-2 (6 layers, width 256, 4,000 words, batch 16 x 64; needs
``pip install 'placer[hf]'``). torch.export captures it with the batch dimension symbolic, so
its micro-batches and DDP shares run (benchmarks/results/model_styles.md). ``use_cache=False``:
training does not use the key/value cache, and torch.export cannot return it.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def get_model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=4000, n_positions=128, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randint(0, 4000, (16, 64)),)


def get_loss(out, ids):
    logits = out.logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
