"""The hierarchical planner's network: a grouper and a seq2seq placer with attention.

Pure torch, independent of stable-baselines3, so the PPO policy
(:mod:`placer.agents.hierarchical.policy`) and the REINFORCE loop
(:mod:`placer.agents.reinforce`) share it.

Shapes (B = batch, M = max_nodes, E = max_edges, G = groups, D = devices, H = hidden):

* observation (docs/contracts.md "Gymnasium environments"): ``node_features`` [B, M, F],
  ``node_mask`` [B, M], ``edge_index`` [B, 2, E], ``edge_mask`` [B, E],
  ``device_features`` [B, D, F_dev];
* hierarchical action: [B, M + G] — a group per node, then a device per group;
* flat action (``num_groups=None``): [B, M] — a device per node.

Grouper: a feed-forward net over each node's features (plus one round of neighbour
aggregation and a positional code of its topological index) gives a softmax over G groups.
Placer: group embeddings (mean of member embeddings, log member count, mean of neighbouring
groups under the group graph the sampled grouping induces) run through an LSTM encoder; an
LSTM decoder emits one device per group, fed the previous device's embedding, with
Luong-style attention over the encoder states after the recurrence.  Because attention does
not feed back into the recurrence, re-evaluating given actions (teacher forcing) is a single
``nn.LSTM`` call over the whole sequence, while sampling steps the same LSTM one group at a
time — the two give the same log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

Obs = dict[str, torch.Tensor]


@dataclass
class PolicyOutput:
    """What one pass of the network gives for a batch.

    Attributes:
        actions: [B, A] long, the env action (hierarchical: groups then devices; flat: devices).
        log_prob: [B] joint log-probability (grouper's + placer's).
        entropy: [B] summed entropy of every categorical that was sampled.
        value: [B] state-value estimate.
    """

    actions: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor


def _positional_code(num: int, dim: int, device: torch.device) -> torch.Tensor:
    """[num, dim] sinusoidal code of positions 0..num-1 (nodes come in topological order)."""
    pos = torch.arange(num, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(1000.0) / dim))
    code = torch.zeros(num, dim, device=device)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return code


def _masked_log_prob_entropy(
    logits: torch.Tensor, actions: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over positions of log p(action) and entropy, each position weighted (0 = ignored).

    logits [B, K, C], actions [B, K] long, weight [B, K] -> ([B], [B]).
    """
    logp = F.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return (chosen * weight).sum(-1), (ent * weight).sum(-1)


def _sample_rows(probs: torch.Tensor) -> torch.Tensor:
    """One category per row of probs [R, C] by inverse CDF (cheaper than multinomial on CPU)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    return (cdf < u).sum(-1).clamp(max=probs.shape[-1] - 1)


class PlacementNetwork(nn.Module):
    """Grouper + seq2seq placer + value head (see the module docstring).

    Args:
        node_feature_dim: F.
        device_feature_dim: F_dev.
        max_nodes: M.
        num_devices: D.
        num_groups: G, or ``None`` for the flat placer (a device per node, no grouper).
        hidden: width H of every embedding.
    """

    def __init__(
        self,
        node_feature_dim: int,
        device_feature_dim: int,
        max_nodes: int,
        num_devices: int,
        num_groups: int | None,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.max_nodes = int(max_nodes)
        self.num_devices = int(num_devices)
        self.num_groups = None if num_groups is None else int(num_groups)
        self.hidden = int(hidden)
        h = self.hidden
        pos_dim = 16
        self.pos_dim = pos_dim
        self.node_in = nn.Sequential(nn.Linear(node_feature_dim + pos_dim, h), nn.ReLU(), nn.Linear(h, h))
        # One round of message passing: own embedding, mean of predecessors, mean of successors.
        self.node_mix = nn.Sequential(nn.Linear(3 * h, h), nn.ReLU())
        if self.num_groups is not None:
            self.grouper = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, self.num_groups))
            self.group_in = nn.Sequential(nn.Linear(2 * h + 1, h), nn.ReLU())
        else:
            self.grouper = None
            self.group_in = None
        # Devices: their features plus a learned identity, so identical devices stay distinguishable.
        self.device_in = nn.Sequential(nn.Linear(device_feature_dim, h), nn.ReLU(), nn.Linear(h, h))
        self.device_id = nn.Embedding(self.num_devices, h)
        self.start = nn.Parameter(torch.zeros(h))
        self.encoder = nn.LSTM(h, h, batch_first=True)
        self.decoder = nn.LSTM(2 * h, h, batch_first=True)
        self.attn = nn.Linear(h, h, bias=False)
        self.combine = nn.Linear(2 * h, h)
        self.value_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    @property
    def hierarchical(self) -> bool:
        return self.num_groups is not None

    @property
    def action_dim(self) -> int:
        return self.max_nodes + (self.num_groups or 0)

    # ----------------------------------------------------------------- encoders
    def _encode_nodes(self, obs: Obs) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, H] node embeddings and [B, M] mask."""
        x = obs["node_features"].float()
        mask = obs["node_mask"].float()
        b, m, _ = x.shape
        pos = _positional_code(m, self.pos_dim, x.device).expand(b, m, self.pos_dim)
        h0 = self.node_in(torch.cat([x, pos], dim=-1)) * mask.unsqueeze(-1)
        edges = obs["edge_index"].long().clamp(0, m - 1)
        emask = obs["edge_mask"].float()
        offset = (torch.arange(b, device=x.device) * m)[:, None]
        src = (edges[:, 0] + offset).reshape(-1)
        dst = (edges[:, 1] + offset).reshape(-1)
        w = emask.reshape(-1, 1)
        flat = h0.reshape(b * m, -1)
        hdim = flat.shape[1]
        pred_sum = torch.zeros_like(flat).index_add_(0, dst, flat[src] * w)
        succ_sum = torch.zeros_like(flat).index_add_(0, src, flat[dst] * w)
        ones = emask.reshape(-1)
        n_pred = torch.zeros(b * m, device=x.device).index_add_(0, dst, ones).clamp(min=1).unsqueeze(-1)
        n_succ = torch.zeros(b * m, device=x.device).index_add_(0, src, ones).clamp(min=1).unsqueeze(-1)
        mixed = torch.cat([flat, pred_sum / n_pred, succ_sum / n_succ], dim=-1).reshape(b, m, 3 * hdim)
        h = (h0 + self.node_mix(mixed)) * mask.unsqueeze(-1)
        return h, mask

    def _encode_devices(self, obs: Obs) -> torch.Tensor:
        """[B, D, H] device embeddings."""
        dev = obs["device_features"].float()
        ids = torch.arange(dev.shape[1], device=dev.device)
        return self.device_in(dev) + self.device_id(ids).unsqueeze(0)

    def _group_embeddings(
        self, h: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, obs: Obs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, G, H] of the groups a grouping [B, M] induces, and [B, G] "non-empty".

        Scatter-adds over nodes and edges (O(B (M + E) H)) rather than one-hot matrix
        products, which cost O(B G M H) and O(B G^2 E) and dominated at 200 groups.
        """
        g = self.num_groups
        assert g is not None
        b, m, hdim = h.shape
        base = (torch.arange(b, device=h.device) * g)[:, None]
        slot = (groups + base).reshape(-1)  # [B*M] flat group index
        w = mask.reshape(-1, 1)
        total = torch.zeros(b * g, hdim, device=h.device).index_add_(0, slot, h.reshape(b * m, hdim) * w)
        count = torch.zeros(b * g, device=h.device).index_add_(0, slot, mask.reshape(-1))
        mean = total / count.clamp(min=1).unsqueeze(-1)  # [B*G, H]
        # Group graph: neighbouring groups through the member ops' edges (internal edges excluded).
        edges = obs["edge_index"].long().clamp(0, m - 1)
        src = (torch.gather(groups, 1, edges[:, 0]) + base).reshape(-1)
        dst = (torch.gather(groups, 1, edges[:, 1]) + base).reshape(-1)
        ew = obs["edge_mask"].float().reshape(-1) * (src != dst).float()
        nbr = torch.zeros_like(mean).index_add_(0, dst, mean[src] * ew[:, None])
        nbr = nbr.index_add_(0, src, mean[dst] * ew[:, None])
        deg = torch.zeros(b * g, device=h.device).index_add_(0, dst, ew).index_add_(0, src, ew)
        nbr = nbr / deg.clamp(min=1).unsqueeze(-1)
        feats = torch.cat([mean, nbr, torch.log1p(count).unsqueeze(-1)], dim=-1).view(b, g, 2 * hdim + 1)
        return self.group_in(feats), (count.view(b, g) > 0).float()

    # ----------------------------------------------------------------- placer
    def _attend(self, dec: torch.Tensor, enc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Luong attention: dec [B, T, H] over enc [B, G, H] (invalid keys masked) -> [B, T, H]."""
        scores = torch.bmm(self.attn(dec), enc.transpose(1, 2)) / math.sqrt(self.hidden)
        scores = scores.masked_fill(valid.unsqueeze(1) <= 0, -1e9)
        ctx = torch.bmm(torch.softmax(scores, dim=-1), enc)
        return torch.tanh(self.combine(torch.cat([dec, ctx], dim=-1)))

    def _device_logits(self, q: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
        """[B, T, D] logits: query q [B, T, H] scored against device embeddings [B, D, H]."""
        return torch.bmm(q, dev.transpose(1, 2)) / math.sqrt(self.hidden)

    def _decode_teacher(
        self, enc: torch.Tensor, state, valid: torch.Tensor, dev: torch.Tensor, devices: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, G, D] of every decoding step given the chosen devices (teacher forcing)."""
        b = enc.shape[0]
        prev = torch.gather(dev, 1, devices[:, :-1].unsqueeze(-1).expand(-1, -1, self.hidden))
        prev = torch.cat([self.start.expand(b, 1, -1), prev], dim=1)
        out, _ = self.decoder(torch.cat([prev, enc], dim=-1), state)
        return self._device_logits(self._attend(out, enc, valid), dev)

    def _decode_sample(
        self, enc: torch.Tensor, state, valid: torch.Tensor, dev: torch.Tensor, deterministic: bool
    ) -> torch.Tensor:
        """Devices [B, G] decoded autoregressively (sampled, or greedy when deterministic)."""
        b, steps, _ = enc.shape
        prev = self.start.expand(b, 1, -1)
        chosen = []
        for t in range(steps):
            out, state = self.decoder(torch.cat([prev, enc[:, t : t + 1]], dim=-1), state)
            logits = self._device_logits(self._attend(out, enc, valid), dev)[:, 0]
            if deterministic:
                d = logits.argmax(-1)
            else:
                d = _sample_rows(torch.softmax(logits, dim=-1))
            chosen.append(d)
            prev = torch.gather(dev, 1, d.view(b, 1, 1).expand(-1, 1, self.hidden))
        return torch.stack(chosen, dim=1)

    # ----------------------------------------------------------------- public
    def value(self, obs: Obs) -> torch.Tensor:
        """[B] state values."""
        h, mask = self._encode_nodes(obs)
        return self._value_from(h, mask)

    def _value_from(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.value_head(pooled).squeeze(-1)

    def _encode_shared(self, obs: Obs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Node embeddings, mask, device embeddings and grouper logits of a batch.

        A placement search feeds the same graph to every row of the batch; then the
        encoders and the grouper (whose [M, G] output layer is the largest matrix product
        of the network) run once and are broadcast, saving B-fold work.
        """
        b = obs["node_features"].shape[0]
        same = b > 1 and all(bool((v == v[:1]).all()) for v in obs.values())
        src = {k: v[:1] for k, v in obs.items()} if same else obs
        h, mask = self._encode_nodes(src)
        dev = self._encode_devices(src)
        glogits = self.grouper(h) if self.hierarchical else None
        if same:
            h, mask, dev = h.expand(b, -1, -1), mask.expand(b, -1), dev.expand(b, -1, -1)
            glogits = None if glogits is None else glogits.expand(b, -1, -1)
        return h, mask, dev, glogits

    def forward(self, obs: Obs, actions: torch.Tensor | None = None, deterministic: bool = False) -> PolicyOutput:
        """Sample (``actions=None``) or re-evaluate ``actions`` [B, A] (any numeric dtype)."""
        h, mask, dev, glogits = self._encode_shared(obs)
        value = self._value_from(h, mask)
        b, m, _ = h.shape
        if actions is not None:
            actions = actions.long()
        if self.hierarchical:
            if actions is None:
                if deterministic:
                    groups = glogits.argmax(-1)
                else:
                    groups = _sample_rows(torch.softmax(glogits, -1).reshape(b * m, -1)).view(b, m)
                groups = groups * (mask > 0).long()  # padded nodes: group 0, ignored by the env
            else:
                groups = actions[:, :m]
            g_logp, g_ent = _masked_log_prob_entropy(glogits, groups, mask)
            seq, valid = self._group_embeddings(h, mask, groups, obs)
        else:
            groups = None
            g_logp = g_ent = torch.zeros(b, device=h.device)
            seq, valid = h, mask
        enc, state = self.encoder(seq)
        if actions is None:
            devices = self._decode_sample(enc, state, valid, dev, deterministic)
        else:
            devices = actions[:, m:] if self.hierarchical else actions
        logits = self._decode_teacher(enc, state, valid, dev, devices)
        p_logp, p_ent = _masked_log_prob_entropy(logits, devices, valid)
        full = torch.cat([groups, devices], dim=1) if self.hierarchical else devices
        return PolicyOutput(actions=full, log_prob=g_logp + p_logp, entropy=g_ent + p_ent, value=value)

