"""APTQ (Guan et al., DAC 2024): attention-aware Hessians for q/k/v, used by GPTQ's solver.

GPTQ minimises each linear's own output error ||dW X||^2. APTQ measures the error of q/k/v at the output of
the attention (softmax included), o_i = sum_j p_ij v_j with p_i = softmax_j(s * q_i.k_j + mask), and takes
the Gauss-Newton (Levenberg-Marquardt) approximation of its Hessian. Per query head h (derivation and the
approximations in docs/aptq.md; s = the attention's score scale, c = a scale the model applies to q itself):

- V (exact, o is linear in W_v given P):  H_v[g] = 2/n sum_{h in g} (P_h X)^T (P_h X)  per KV head g.
- Q (token-weighted):  H_q[h] = 2/n sum_i w_i x_i x_i^T,  w_i = (s c)^2 ||G_i||_F^2 / d_h,
                       G_i = sum_j p_ij (v_j - o_i)(k_j - kbar_i)^T,  kbar_i = sum_j p_ij k_j.
  (The exact Gauss-Newton matrix couples the d_h rows of a head through G_i^T G_i; replacing that by its mean
  eigenvalue keeps rows independent, so GPTQ runs unchanged, and keeps the trace exactly.)
- K (token-weighted): H_k[g] = 2/n sum_{h in g} sum_j w'_j x_j x_j^T,
                       w'_j = s^2 / d_h * sum_i p_ij^2 ||q_i||^2 ||v_j - o_i||^2   (cross terms j != j' dropped).

RoPE rotates q_i and k_j by orthogonal matrices, which leaves every norm above unchanged, so the formulas
use the rotated q, k that the attention actually sees. The probabilities come from the model's own attention
call: `attention_probe` routes it through a recorder for the duration of a pass.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .. import distributed


def attention_probs(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
    """Softmax probabilities [B, Hq, T, S] in float32, as eager attention computes them (GQA: KV heads are
    shared by consecutive query heads). A missing mask means causal, as in SDPA's `is_causal` path."""
    rep = query.shape[1] // key.shape[1]
    scores = query.float() @ key.float().repeat_interleave(rep, dim=1).transpose(-1, -2) * scaling
    t, s = scores.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :s], float("-inf"))
    else:
        scores = scores + attention_mask[..., :s].float()
    return torch.softmax(scores, dim=-1)


def attention_token_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor,
                            query_factor: float, key_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """APTQ's token weights for one query head: w_q[b, i] for query tokens and w_k[b, j] for key tokens.

    q, k, v: [B, T, d_h] (k, v of the KV head this query head reads), probs: [B, T, T].
    query_factor = s * c (d s_ij / d(W_q x_i) . k_j), key_factor = s.
    ||G_i||_F^2 is expanded so no d_h x d_h matrix per token is formed:
      ||sum_j p_ij v_j k_j^T - o_i kbar_i^T||^2 = p_i^T (VV^T o KK^T) p_i - 2 sum_j p_ij (o_i.v_j)(kbar_i.k_j)
                                                 + ||o_i||^2 ||kbar_i||^2.
    """
    d_h = q.shape[-1]
    o, kbar = probs @ v, probs @ k
    kernel = (v @ v.transpose(-1, -2)) * (k @ k.transpose(-1, -2))
    g2 = ((probs @ kernel) * probs).sum(-1) \
        - 2 * (probs * (o @ v.transpose(-1, -2)) * (kbar @ k.transpose(-1, -2))).sum(-1) \
        + o.square().sum(-1) * kbar.square().sum(-1)
    w_q = query_factor ** 2 / d_h * g2.clamp(min=0)
    p2q = probs.square() * q.square().sum(-1)[..., :, None]                 # p_ij^2 ||q_i||^2, [B, Ti, Tj]
    dev = v.square().sum(-1) * p2q.sum(-2) - 2 * ((p2q.transpose(-1, -2) @ o) * v).sum(-1) \
        + (p2q * o.square().sum(-1)[..., :, None]).sum(-2)                  # sum_i p2q_ij ||v_j - o_i||^2
    w_k = key_factor ** 2 / d_h * dev.clamp(min=0)
    return w_q, w_k


class AttentionHessians:
    """Running sums of APTQ's q/k/v Hessians for one layer (or only their traces, for bit allocation)."""

    def __init__(self, d_in: int, q_heads: int, kv_heads: int, query_scale: float = 1.0,
                 traces_only: bool = False, device: torch.device | str = "cpu"):
        self.d_in, self.q_heads, self.kv_heads = d_in, q_heads, kv_heads
        self.query_scale, self.traces_only, self.tokens = query_scale, traces_only, 0
        z = (lambda n: None) if traces_only else (
            lambda n: torch.zeros(n, d_in, d_in, dtype=torch.float32, device=device))
        self.sum_q, self.sum_k, self.sum_v = z(q_heads), z(kv_heads), z(kv_heads)
        self.trace_sum = {p: torch.zeros(n, dtype=torch.float64, device=device)
                          for p, n in (("q", q_heads), ("k", kv_heads), ("v", kv_heads))}

    def add_batch(self, x: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  probs: torch.Tensor, scaling: float) -> None:
        """x: the q/k/v input [B, T, d]; query [B, Hq, T, d_h]; key, value [B, Hkv, T, d_h]; probs [B, Hq, T, T]."""
        b, hq, t, _ = query.shape
        if hq != self.q_heads or key.shape[1] != self.kv_heads:
            raise ValueError(f"attention has {hq}/{key.shape[1]} heads, expected {self.q_heads}/{self.kv_heads}")
        rep = hq // self.kv_heads
        x = x.reshape(b, t, self.d_in).float()
        flat = x.reshape(b * t, self.d_in)
        sq = flat.square().sum(-1)                                           # ||x_i||^2
        self.tokens += b * t
        key_weight = torch.zeros(self.kv_heads, b * t, dtype=torch.float32, device=x.device)
        for h in range(hq):
            g = h // rep
            p = probs[:, h].float()
            w_q, w_k = attention_token_weights(query[:, h].float(), key[:, g].float(), value[:, g].float(), p,
                                               scaling * self.query_scale, scaling)
            w_q, w_k = w_q.reshape(-1), w_k.reshape(-1)
            mixed = (p @ x).reshape(b * t, self.d_in)                         # rows of P_h X
            key_weight[g] += w_k
            self.trace_sum["q"][h] += float((w_q * sq).sum())
            self.trace_sum["v"][g] += float(mixed.square().sum())
            if not self.traces_only:
                self.sum_q[h].addmm_((flat * w_q[:, None]).T, flat)
                self.sum_v[g].addmm_(mixed.T, mixed)
        for g in range(self.kv_heads):
            self.trace_sum["k"][g] += float((key_weight[g] * sq).sum())
            if not self.traces_only:
                self.sum_k[g].addmm_((flat * key_weight[g][:, None]).T, flat)

    def hessian(self, which: str) -> torch.Tensor:
        """H for `which` in q/k/v: [heads, d, d], 2/n times the sums (n = tokens)."""
        if self.traces_only:
            raise RuntimeError("these attention statistics were gathered for traces only")
        total = {"q": self.sum_q, "k": self.sum_k, "v": self.sum_v}[which]
        return total * (2.0 / max(self.tokens, 1))

    def mean_diagonal(self, which: str) -> float:
        """Mean Hessian diagonal over every weight of the projection: trace / (heads * d), each head's trace
        counted once per row it governs (rows split evenly over heads)."""
        heads = self.trace_sum[which].numel()
        return float(self.trace_sum[which].sum()) * 2.0 / max(self.tokens, 1) / (heads * self.d_in)


@contextlib.contextmanager
def attention_probe(model: torch.nn.Module, record: Callable):
    """While active, every attention call of `model` first calls `record(module, query, key, value, probs,
    scaling)` with the post-RoPE query/key, the values and the softmax probabilities, then runs the model's
    own attention implementation, so outputs are unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had_local, previous = impl in local, local.get(impl)
    original = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None

    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = module.scaling if scaling is None else scaling
        probs = attention_probs(query, key, attention_mask, scale)
        record(module, query, key, value, probs, scale)
        if original is not None:
            return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        rep = query.shape[1] // value.shape[1]   # eager: the probabilities we just computed
        out = probs.to(value.dtype) @ value.repeat_interleave(rep, dim=1)
        return out.transpose(1, 2).contiguous(), probs

    local[impl] = probe
    try:
        yield
    finally:
        if had_local:
            local[impl] = previous
        else:
            del local[impl]


def collect_aptq_stats(engine, layer: torch.nn.Module, hidden: torch.Tensor, traces_only: bool = False):
    """One pass of `layer` over the calibration windows gathering the plain input statistics of every linear
    (with XX^T unless `traces_only`) and APTQ's attention Hessians of q/k/v. Returns (stats, attention)."""
    adapter = engine.adapter
    q_name = adapter.attention_qkv[0]
    x_seen: dict = {}
    found: dict = {}

    def record(module, query, key, value, probs, scaling):
        if "hessians" not in found:
            found["hessians"] = AttentionHessians(x_seen["x"].shape[-1], query.shape[1], key.shape[1],
                                                  adapter.query_scale(layer), traces_only, hidden.device)
        found["hessians"].add_batch(x_seen["x"], query, key, value, probs, scaling)

    hook = layer.get_submodule(q_name).register_forward_pre_hook(lambda m, a: x_seen.__setitem__("x", a[0]))
    try:
        with attention_probe(engine.model, record):
            stats = engine.collect_stats(layer, hidden, hessian=not traces_only)
    finally:
        hook.remove()
    if "hessians" not in found:
        raise RuntimeError("APTQ: the attention of this layer was never called through the attention interface")
    attention = found["hessians"]
    (attention.tokens,) = distributed.all_reduce_sums(
        [attention.sum_q, attention.sum_k, attention.sum_v, *attention.trace_sum.values()], [attention.tokens])
    return stats, attention
