"""A small Hugging Face BERT classifier (4 layers, width 128, 3,000 words, 16 sentences of 48
tokens, the last 8 padded; needs ``pip install 'placer[hf]'``), its example inputs a dict as a
Trainer's batch: ``input_ids``, ``attention_mask``, ``labels`` (benchmarks/results/model_styles.md).
"""

import torch
from transformers import BertConfig, BertForSequenceClassification


def get_model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=3000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)

def get_example_inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 3000, (16, 48))
    mask = torch.ones(16, 48, dtype=torch.long)
    mask[:, 40:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (16,))}
