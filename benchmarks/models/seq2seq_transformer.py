"""A translation model on ``nn.Transformer`` in its default sequence-first layout: 4 encoder and
4 decoder layers of width 256, 4,000 words, source 20 and target 18 tokens x 32 sentences;
``batch_dim = 1`` (benchmarks/results/model_styles.md).
"""

import torch
from torch import nn

batch_dim = 1


class Seq2Seq(nn.Module):
    def __init__(self, vocab=4000, width=256, layers=4):
        super().__init__()
        self.src_emb, self.tgt_emb = nn.Embedding(vocab, width), nn.Embedding(vocab, width)
        self.core = nn.Transformer(width, 4, num_encoder_layers=layers, num_decoder_layers=layers,
                                   dim_feedforward=4 * width, dropout=0.0)
        self.out = nn.Linear(width, vocab)

    def forward(self, src, tgt_in, tgt_out):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(0))
        return self.out(self.core(self.src_emb(src), self.tgt_emb(tgt_in), tgt_mask=mask))


def get_model():
    torch.manual_seed(0)
    return Seq2Seq()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randint(0, 4000, (20, 32)), torch.randint(0, 4000, (18, 32)), torch.randint(0, 4000, (18, 32)))


def get_loss(logits, src, tgt_in, tgt_out):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1))
