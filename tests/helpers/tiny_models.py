"""Small third-party-style architectures for the end-to-end tests (imported by --arch paths)."""

from __future__ import annotations

import torch
from torch import nn


class TokenEncoder(nn.Module):
    """A transformer encoder over token ids with a padding mask, like a tiny BERT.

    forward(input_ids: (B, T) long, attention_mask: (B, T) bool/int, 1 = real token) -> (B, n_classes).
    """

    def __init__(self, vocab_size: int = 50, d_model: int = 16, n_heads: int = 2, n_layers: int = 2, n_classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=~attention_mask.bool())
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))


class SequenceClassifier(nn.Module):
    """An LSTM over (B, T, F) features; forward returns (B, n_classes)."""

    def __init__(self, n_features: int = 4, hidden: int = 8, n_classes: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True, num_layers=2)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x)
        return self.head(output[:, -1])
