"""The hierarchical planner's network: a grouper and a seq2seq placer with attention.

Pure torch, independent of stable-baselines3, so the PPO policy
(:mod:`placer.search.agents.hierarchical.policy`) and the REINFORCE loop
(:mod:`placer.search.agents.reinforce`) share it.

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
LSTM decoder emits one device per group, fed the encoder state of that group plus the
previous device's embedding, with Luong-style attention over the encoder states after the
recurrence.  Because attention does not feed back into the recurrence, re-evaluating given
actions (teacher forcing) is a single ``nn.LSTM`` call over the whole sequence, while
sampling steps the same LSTM one group at a time and accumulates the same log-probabilities
as it goes.

Speed (a search feeds the same graph to every row of a batch): the node encoder, the
grouper's softmax and its entropy and the value run once per batch and are shared; only
what depends on the sampled grouping (group embeddings, encoder, decoder) runs per row.
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


def _sample_rows(probs: torch.Tensor) -> torch.Tensor:
    """One category per row of probs [R, C] by inverse CDF (cheaper than multinomial on CPU)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    return (cdf < u).sum(-1).clamp(max=probs.shape[-1] - 1)


def _sample_shared(probs: torch.Tensor, b: int) -> torch.Tensor:
    """``b`` draws [b, R] from each row of ONE set of categoricals probs [R, C].

    The CDF is built once and every draw is a binary search in it (O(b R log C)), instead
    of b copies of the CDF.
    """
    cdf = probs.cumsum(-1).contiguous()
    u = torch.rand(probs.shape[0], b, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp(max=probs.shape[-1] - 1).t()


def _rows_equal(v: torch.Tensor) -> bool:
    """Every row of ``v`` [B, ...] equals the first (numpy's comparison is ~10x faster on CPU)."""
    if v.stride(0) == 0:
        return True
    if v.device.type == "cpu" and not v.requires_grad:
        a = v.numpy()
        return bool((a == a[:1]).all())
    return bool((v == v[:1]).all())


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
        hidden: int = 16,
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
        # The decoder's input at step t is enc_in(encoder state t) + prev_in(previous device):
        # a linear map of [previous device; encoder state] computed outside the recurrence, so
        # the LSTM's own input is H wide (its training pass costs ~half of a 2H-wide input).
        self.enc_in = nn.Linear(h, h)
        self.prev_in = nn.Linear(h, h, bias=False)
        self.decoder = nn.LSTM(h, h, batch_first=True)
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

        ``h``, ``mask`` and ``obs`` have a leading dim of B or 1 (one graph shared by the
        batch).  Member means are one scatter-add over nodes (padded nodes go to a spare
        slot that is dropped, so no mask product); the group graph is a [B, G, G] count of
        the edges between groups (scalars only), and neighbour means one batched matmul of
        it with the member means — cheaper forward and backward than gathering [B, E, H]
        rows per edge.
        """
        g = self.num_groups
        assert g is not None
        b, m = groups.shape
        hdim = h.shape[-1]
        spare = torch.where(mask > 0, groups, torch.full_like(groups, g))  # padded nodes -> slot g
        base = (torch.arange(b, device=h.device) * (g + 1))[:, None]
        slot = (spare + base).reshape(-1)
        total = torch.zeros(b * (g + 1), hdim, device=h.device).index_add_(0, slot, h.expand(b, m, hdim).reshape(b * m, hdim))
        count = torch.bincount(slot, minlength=b * (g + 1)).to(h.dtype)
        mean = (total / count.clamp(min=1).unsqueeze(-1)).view(b, g + 1, hdim)[:, :g]
        count = count.view(b, g + 1)[:, :g]
        # Group graph: edges between different groups, counted both ways (internal edges excluded).
        edges = obs["edge_index"].long().clamp(0, m - 1)
        e = edges.shape[-1]
        gsrc = torch.gather(groups, 1, edges[:, 0].expand(b, e))
        gdst = torch.gather(groups, 1, edges[:, 1].expand(b, e))
        ew = obs["edge_mask"].to(h.dtype).expand(b, e) * (gsrc != gdst).to(h.dtype)
        base_gg = (torch.arange(b, device=h.device) * (g * g))[:, None]
        ew = ew.reshape(-1)
        # Counted both ways into one buffer (a symmetric adjacency without a transpose copy).
        adj = torch.zeros(b * g * g, device=h.device, dtype=h.dtype)
        adj.index_add_(0, (gdst * g + gsrc + base_gg).reshape(-1), ew)
        adj = adj.index_add_(0, (gsrc * g + gdst + base_gg).reshape(-1), ew).view(b, g, g)
        deg = adj.sum(-1, keepdim=True).clamp(min=1)
        nbr = torch.bmm(adj, mean) / deg
        feats = torch.cat([mean, nbr, torch.log1p(count).unsqueeze(-1)], dim=-1)
        return self.group_in(feats), (count > 0).to(h.dtype)

    # ----------------------------------------------------------------- placer
    # Both decoding paths compute, for step t with previous device d_{t-1}:
    #   x_t = enc_in(enc_t) + prev_in(dev[d_{t-1}])            (start token at t = 0)
    #   h_t = LSTM(x_t, h_{t-1})                                 (self.decoder's weights)
    #   a_t = softmax(h_t . attn(enc_g) / sqrt(H) over non-empty groups g)
    #   z_t = tanh(combine([h_t; sum_g a_tg enc_g]))
    #   logits_t = z_t . dev_d / sqrt(H)
    # Teacher forcing runs it vectorised over t (one nn.LSTM call); sampling steps it, with
    # every per-sequence product (input projections, keys, the context's share of
    # ``combine``) hoisted out of the loop.

    def _attention_parts(self, enc: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys [B, H, G] (h . attn(enc) == h . (enc attn.W) — project the G keys once, not
        every query), an additive mask [B, 1, G] (-1e9 on empty groups) and the context's
        share of ``combine`` applied to every encoder state [B, G, H] (it is linear, so
        combine(ctx) = sum_g a_g combine_ctx(enc_g))."""
        hdim = self.hidden
        keys = (F.linear(enc, self.attn.weight.t()) / math.sqrt(hdim)).transpose(1, 2)
        bias = ((valid <= 0).to(enc.dtype) * -1e9).unsqueeze(1)
        enc_c = F.linear(enc, self.combine.weight[:, hdim:])
        return keys, bias, enc_c

    def _dev_t(self, dev: torch.Tensor) -> torch.Tensor:
        """Device embeddings as the [B or 1, H, D] right operand of the logits (scaled)."""
        return dev.transpose(1, 2) / math.sqrt(self.hidden)

    def _decode_teacher(
        self, enc: torch.Tensor, state, valid: torch.Tensor, dev: torch.Tensor, devices: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, G, D] of every decoding step given the chosen devices (teacher forcing)."""
        b, steps, hdim = enc.shape
        prev_emb = self.prev_in(dev)  # [B or 1, D, H]
        if prev_emb.shape[0] == 1:
            prev = prev_emb[0][devices[:, :-1]]
        else:
            prev = torch.gather(prev_emb, 1, devices[:, :-1].unsqueeze(-1).expand(-1, -1, hdim))
        prev = torch.cat([self.prev_in(self.start).expand(b, 1, hdim), prev], dim=1)
        out, _ = self.decoder(self.enc_in(enc) + prev, state)
        keys, bias, enc_c = self._attention_parts(enc, valid)
        attn = torch.softmax(torch.baddbmm(bias, out, keys), dim=-1)
        z = torch.tanh(F.linear(out, self.combine.weight[:, :hdim], self.combine.bias) + torch.bmm(attn, enc_c))
        dev_t = self._dev_t(dev)
        return torch.matmul(z, dev_t[0]) if dev_t.shape[0] == 1 else torch.bmm(z, dev_t)

    def _decode_sample(
        self, enc: torch.Tensor, state, valid: torch.Tensor, dev: torch.Tensor, deterministic: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Devices [B, G] decoded autoregressively (sampled by Gumbel-max, or greedy when
        deterministic) and the logits [B, G, D] they were drawn from.

        The LSTM cell is written out (same weights and gate order as ``nn.LSTM``): one
        ``addmm`` and a few element-wise ops per step instead of an ``nn.LSTM`` call, whose
        per-call set-up dominated at one step.
        """
        b, steps, hdim = enc.shape
        lstm = self.decoder
        # Step-major [G, B, 4H], so each step's slice is contiguous.
        enc_x = F.linear(self.enc_in(enc), lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0).transpose(0, 1)
        enc_x = enc_x.contiguous()
        dev_x = F.linear(self.prev_in(dev), lstm.weight_ih_l0)  # [B or 1, D, 4H]
        x_prev = F.linear(self.prev_in(self.start), lstm.weight_ih_l0).expand(b, 4 * hdim)
        w_hh = lstm.weight_hh_l0.t()
        keys, bias, enc_c = self._attention_parts(enc, valid)
        w_dec, b_comb = self.combine.weight[:, :hdim].t(), self.combine.bias
        dev_t = self._dev_t(dev)
        shared = dev_t.shape[0] == 1
        dev_t0, dev_x0 = dev_t[0], dev_x[0]
        rows = torch.arange(b, device=enc.device)
        ndev = dev_t.shape[-1]
        if not deterministic:
            # Gumbel-max: argmax(logits + G) with G = -log(-log U) is an exact categorical draw.
            noise = torch.rand(steps, b, ndev, device=enc.device).clamp_(min=1e-20).log_().neg_().log_().neg_()
        h, c = state[0][0], state[1][0]
        chosen, all_logits = [], []
        for t in range(steps):
            gates = torch.addmm(enc_x[t] + x_prev, h, w_hh)
            s = torch.sigmoid(gates)  # i, f, (g), o — g's sigmoid is unused, one op is cheaper than three
            c = torch.addcmul(s[:, hdim: 2 * hdim] * c, s[:, :hdim], torch.tanh(gates[:, 2 * hdim: 3 * hdim]))
            h = s[:, 3 * hdim:] * torch.tanh(c)
            h3 = h.unsqueeze(1)
            attn = torch.softmax(torch.baddbmm(bias, h3, keys), dim=-1)
            z = torch.tanh(torch.baddbmm(torch.addmm(b_comb, h, w_dec).unsqueeze(1), attn, enc_c))
            logits = (z @ dev_t0 if shared else torch.bmm(z, dev_t)).squeeze(1)
            d = logits.argmax(-1) if deterministic else (logits + noise[t]).argmax(-1)
            all_logits.append(logits)
            chosen.append(d)
            x_prev = dev_x0.index_select(0, d) if shared else dev_x[rows, d]
        return torch.stack(chosen, dim=1), torch.stack(all_logits, dim=1)

    # ----------------------------------------------------------------- public
    def value(self, obs: Obs) -> torch.Tensor:
        """[B] state values."""
        h, mask = self._encode_nodes(self._shared_rows(obs))
        return self._value_from(h, mask).expand(obs["node_features"].shape[0])

    def _value_from(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.value_head(pooled).squeeze(-1)

    @staticmethod
    def _shared_rows(obs: Obs) -> Obs:
        """``obs`` cut to its first row when every row is the same graph (a search's batch), else ``obs``."""
        b = obs["node_features"].shape[0]
        if b > 1 and all(_rows_equal(v) for v in obs.values()):
            return {k: v[:1] for k, v in obs.items()}
        return obs

    def forward(self, obs: Obs, actions: torch.Tensor | None = None, deterministic: bool = False) -> PolicyOutput:
        """Sample (``actions=None``) or re-evaluate ``actions`` [B, A] (any numeric dtype)."""
        b = obs["node_features"].shape[0]
        src = self._shared_rows(obs)
        h, mask = self._encode_nodes(src)  # leading dim 1 when the graph is shared
        dev = self._encode_devices(src)
        value = self._value_from(h, mask).expand(b)
        m = h.shape[1]
        if actions is not None:
            actions = actions.long()
        if self.hierarchical:
            groups, g_logp, g_ent = self._group(h, mask, b, actions, deterministic)
            seq, valid = self._group_embeddings(h, mask, groups, src)
        else:
            groups = None
            g_logp = g_ent = torch.zeros(b, device=h.device)
            seq, valid = h, mask.expand(b, -1)
        enc, state = self.encoder(seq)
        if enc.shape[0] != b:  # flat placer on a shared graph: one encoder pass serves every row
            enc = enc.expand(b, -1, -1)
            state = tuple(s.expand(-1, b, -1).contiguous() for s in state)
        if actions is None:
            devices, logits = self._decode_sample(enc, state, valid, dev, deterministic)
        else:
            devices = actions[:, m:] if self.hierarchical else actions
            logits = self._decode_teacher(enc, state, valid, dev, devices)
        logp = F.log_softmax(logits, dim=-1)
        p_logp = (logp.gather(-1, devices.unsqueeze(-1)).squeeze(-1) * valid).sum(-1)
        p_ent = (-(logp.exp() * logp).sum(-1) * valid).sum(-1)
        full = torch.cat([groups, devices], dim=1) if self.hierarchical else devices
        return PolicyOutput(actions=full, log_prob=g_logp + p_logp, entropy=g_ent + p_ent, value=value)

    def _group(self, h: torch.Tensor, mask: torch.Tensor, b: int, actions: torch.Tensor | None,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The grouping [B, M] (sampled, greedy, or read from ``actions``), its log-prob [B]
        and entropy [B].  With a shared graph the grouper's softmax and entropy are computed
        once, and each row's log-prob is a gather from the one [M, G] table."""
        glogp = F.log_softmax(self.grouper(h), dim=-1)  # [1 or B, M, G]
        m, g = glogp.shape[1], glogp.shape[2]
        ent = (-(glogp.exp() * glogp).sum(-1) * mask).sum(-1).expand(b)
        if actions is not None:
            groups = actions[:, :m]
        elif deterministic:
            groups = glogp.argmax(-1).expand(b, m)
        elif glogp.shape[0] == 1:
            groups = _sample_shared(glogp[0].exp(), b)
        else:
            groups = _sample_rows(glogp.exp().reshape(b * m, g)).view(b, m)
        groups = groups * (mask > 0).long()  # padded nodes: group 0, ignored by the env
        if glogp.shape[0] == 1:
            flat = glogp.reshape(-1)
            chosen = flat[groups + torch.arange(m, device=h.device) * g]
        else:
            chosen = glogp.gather(-1, groups.unsqueeze(-1)).squeeze(-1)
        return groups, (chosen * mask).sum(-1), ent
