"""
gpt.py: the shared library of slimchat. Every stage imports it; it does no work at import.

The model is the late-2025 nanoGPT-family decoder (REFERENCE.md §3, "E"). Differences from GPT-2:
- rotary position embeddings (base 10,000, half-split dims) instead of learned positions
- QK-norm: q and k are RMS-normalised after RoPE
- RMSNorm without learnable parameters, also right after the token embedding
- ReLU² MLP (4x wide) instead of GELU
- untied token embedding and lm_head, no biases anywhere
- grouped-query attention through `n_kv_head` (n_kv_head == n_head is plain multi-head)
- logits soft-capped with 15·tanh(logits/15), computed in fp32
- zero-init output projections (attn.c_proj, mlp.c_proj) and lm_head, so every block starts
  as the identity and the first steps only train the head
- fp32 master weights; matmuls run in a compute dtype (bf16 on GPUs that have it), loss in fp32

Also here (sections in this order): the Muon + AdamW optimizer (one class for one or many
ranks), inference (KVCache, the server's RowCache, sampling, the tool-use calculator, Engine,
the server's BatchDecoder), runtime plumbing (devices, dtypes, torch.distributed, print0,
--name=value overrides), checkpoints and downloads. The Hugging Face format is hf.py's.
"""
import ast
import difflib
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections import deque
from dataclasses import asdict, dataclass

try:  # advisory file locks for concurrent downloads; Windows has none, there we skip locking
    import fcntl
except ImportError:
    fcntl = None

import requests
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bpe

ROPE_BASE = 10000.0       # rotary base at E (H moved to 100k)
ROPE_CACHE_FACTOR = 10    # rotary tables cover 10x sequence_len positions, for long generations
LOGIT_SOFTCAP = 15.0      # logits = 15·tanh(logits/15)
NORM_EPS = torch.finfo(torch.float32).eps   # F.rms_norm's default eps, for fp32 and bf16 inputs alike
HEAD_DIM = 128            # config_from_depth: heads of 128 dims (REFERENCE §3.2)
ASPECT = 64               # config_from_depth: width = 64·depth
# Elements per token per layer, in units of n_embd, that a training forward saves for the backward.
# Compiled: the block's input and its normed copies (5), q and k as rotated (2), q, k, v and the
# attention output as the attention kernel takes them (4), the MLP's 4x-wide pre- and post-
# activation (8); measured on CPU with torch.compile's partitioner and inductor's decompositions.
# Eager saves 3 more (tests/test_memory.py checks both).
SAVED_PER_LAYER = {"compiled": 19, "eager": 22}

# ---------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6          # query heads
    n_kv_head: int = 6       # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    norm_eps: float = NORM_EPS   # RMSNorm's eps; other values only come from imported models


def config_from_depth(depth, vocab_size, sequence_len):
    """The one dial: width 64·depth, heads of 128 dims (fewer dims only below width 128)."""
    n_embd = ASPECT * depth
    n_head = max(1, math.ceil(n_embd / HEAD_DIM))
    if depth < 1 or n_embd % n_head:
        raise ValueError(f"depth={depth} gives width {n_embd} that {n_head} heads cannot split; use an even depth")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd)

# ---------------------------------------------------------------------------
# small functional pieces, attention, MLP, block


def norm(x, eps=NORM_EPS):
    """RMSNorm with no learnable parameters, over the last dim."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + D/2]) by the position angle. x: (B, T, H, D)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rotary_tables(seq_len, head_dim, device):
    """cos, sin of shape (1, seq_len, 1, head_dim/2), fp32, broadcastable over (B, T, H, D/2)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


class Linear(nn.Linear):
    """A bias-free linear layer whose fp32 master weight is cast to the activation dtype."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.eps = config.norm_eps
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0, \
            f"n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_head} must divide evenly"
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, cos, sin, layer, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)     # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        q, k = norm(apply_rotary(q, cos, sin), self.eps), norm(apply_rotary(k, cos, sin), self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H*, T, D)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None:   # training, evaluation: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(kv_cache, RowCache):   # rows of different lengths: each sees its own prefix
            k, v = kv_cache.insert(layer, k, v)                    # (B, Hkv, Tk, D), prefix included
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask, enable_gqa=gqa)
        else:                  # the whole cache, each query masked to the positions up to its own
            k, v, mask = kv_cache.insert(layer, k, v)              # (B, Hkv, S, D), (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)                     # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = Attention(config)
        self.mlp = MLP(config)
        self.eps = config.norm_eps

    def forward(self, x, cos, sin, layer, kv_cache):
        x = x + self.attn(norm(x, self.eps), cos, sin, layer, kv_cache)
        return x + self.mlp(norm(x, self.eps))

# ---------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    """
    FOOTGUN: __init__ only allocates (cheaply, e.g. on the meta device); nothing is initialised
    until init_weights(). Use new_model(), or call init_weights() yourself.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.compute_dtype = torch.float32   # new_model / load_checkpoint set the real one
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        head_dim = config.n_embd // config.n_head
        rope_len = ROPE_CACHE_FACTOR * config.sequence_len
        self.register_buffer("cos", torch.empty(1, rope_len, 1, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(1, rope_len, 1, head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """
        Every initialisation in one place (REFERENCE §3.1 E):
        | tensor                    | init                                              |
        |---------------------------|---------------------------------------------------|
        | wte                       | N(0, 1)                                           |
        | c_q, c_k, c_v, mlp.c_fc   | N(0, 1/√fan_in · min(1, √(fan_out/fan_in)))       |
        |                           |   (arXiv 2310.17813, spectral scaling)            |
        | attn.c_proj, mlp.c_proj   | 0 (blocks start as the identity)                  |
        | lm_head                   | 0 (uniform predictions at step 0)                 |
        | cos, sin (buffers)        | rotary tables, base 10,000                        |
        """
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = lin.weight.shape
                nn.init.normal_(lin.weight, std=fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in)))
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(self.lm_head.weight)
        cos, sin = rotary_tables(self.cos.size(1), 2 * self.cos.size(3), self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx (B, T) token ids. Returns fp32 logits (B, T, V), or with targets (B, T) the
        cross-entropy (ignore_index -1): a scalar for "mean"/"sum", a (B, T) tensor for "none".
        With a kv_cache, idx continues the cached sequence at position kv_cache.pos (with a
        RowCache, each row at its own length).
        """
        B, T = idx.shape
        if isinstance(kv_cache, RowCache):   # every row continues at its own length
            at = kv_cache.start(T)                                 # (B, T) positions
            cos, sin = self.cos[0, at], self.sin[0, at]            # (B, T, 1, D/2)
        elif kv_cache is None:
            assert T <= self.cos.size(1), f"{T} positions, beyond the rotary table ({self.cos.size(1)})"
            cos, sin = self.cos[:, :T], self.sin[:, :T]          # (1, T, 1, D/2)
        else:   # positions from a tensor: one compiled decode step serves every position
            pos = kv_cache.pos + torch.arange(T, device=idx.device)
            cos, sin = self.cos[:, pos], self.sin[:, pos]        # (1, T, 1, D/2)
        cos, sin = cos.to(self.compute_dtype), sin.to(self.compute_dtype)
        x = norm(self.wte(idx).to(self.compute_dtype), self.config.norm_eps)   # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, layer, kv_cache)
        if isinstance(kv_cache, KVCache):
            kv_cache.pos += T
        logits = self.lm_head(norm(x, self.config.norm_eps)).float()   # (B, T, V), fp32 from here
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def num_params(self):
        """Parameter counts by group: embedding, head, transformer matrices, total."""
        counts = {"wte": self.wte.weight.numel(), "lm_head": self.lm_head.weight.numel(),
                  "matrices": sum(p.numel() for p in self.blocks.parameters())}
        counts["total"] = sum(counts.values())
        return counts

    def estimate_flops(self):
        """FLOPs per token for forward+backward: 6·(N − N_wte) + 12·L·H·Q·T (REFERENCE §3.2 E)."""
        c = self.config
        n = self.num_params()
        return 6 * (n["total"] - n["wte"]) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def estimate_memory(self, batch_size, world_size=1, compiled=True, seq_len=None):
        """
        Estimated bytes per GPU of a training step on `batch_size` rows of seq_len tokens (default
        sequence_len), by part. Weights and grads are fp32; the optimizer state is this rank's
        share (AdamW moments of wte/lm_head and Muon momentum are split over the ranks). The
        forward saves, per token,
        SAVED_PER_LAYER·n_embd elements in each layer and the last block's output and its norm
        (2·n_embd) in self.compute_dtype, plus the logits: once in the compute dtype when compiled,
        three fp32 copies (cast, soft-cap, log-softmax) in eager; and a compute-dtype copy of every
        weight but wte. Not modelled: transients (the logits' gradient, the optimizer's stacked
        grads), the CUDA context, fragmentation.
        """
        c, n, dtype_bytes = self.config, self.num_params(), self.compute_dtype.itemsize
        tokens, per_layer = batch_size * (seq_len or c.sequence_len), SAVED_PER_LAYER["compiled" if compiled else "eager"]
        muon = sum(math.ceil(len(group) / world_size) * group[0].numel() * 4
                   for group in _same_shape_groups(self.blocks.parameters()))
        return {"weights": 4 * n["total"], "grads": 4 * n["total"],
                "optimizer": 8 * (n["wte"] + n["lm_head"]) // world_size + muon,
                "weight copies": dtype_bytes * (n["total"] - n["wte"]),
                "activations": tokens * (dtype_bytes * (per_layer * c.n_embd * c.n_layer + 2 * c.n_embd)
                                         + (dtype_bytes if compiled else 12) * c.vocab_size)}

    def setup_optimizer(self, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0):
        """
        Muon for the block matrices (one group per shape, so the distributed step can stack
        them), AdamW for wte and lm_head with LRs scaled by (n_embd/768)^-0.5: wider models
        take smaller embedding steps (REFERENCE §4.1). weight_decay applies to the AdamW groups.
        """
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, **adamw),
                  dict(params=[self.wte.weight], lr=embedding_lr * scale, **adamw)]
        for params in _same_shape_groups(self.blocks.parameters()):
            groups.append(dict(params=params, kind="muon", lr=matrix_lr, momentum=0.95, ns_steps=5))
        return MuonAdamW(groups)

    @torch.inference_mode()
    def naive_generate(self, tokens, max_tokens, temperature=0.0, top_k=None, seed=42):
        """The test reference: batch 1, no cache, a full forward per new token. Returns the new tokens."""
        device = self.wte.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        out = []
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            nxt = sample_next_token(logits, rng, temperature, top_k)   # (1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            out.append(nxt.item())
        return out


def _same_shape_groups(params):
    """Lists of params of one shape, in sorted shape order (Muon's groups)."""
    by_shape = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    return [by_shape[shape] for shape in sorted(by_shape)]


def new_model(config, device, dtype=None):
    """Build on the meta device (no memory, no init), move to `device` empty, then init_weights()."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.compute_dtype = dtype or compute_dtype(torch.device(device))[0]
    return model


class _OneDtypeMatmuls(TorchDispatchMode):
    """Fail on a matmul that mixes dtypes: the meta device computes it, a GPU refuses it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "bmm", "addmm", "baddbmm"):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            if len(dtypes) > 1:
                raise TypeError(f"{func} mixes dtypes {sorted(map(str, dtypes))}")
        return func(*args, **(kwargs or {}))


def preflight(model, batch_size, seq_len, world_size, memory, memory_why, compiled=True):
    """
    Take one step of each kind at full size on a model built on the meta device (shapes, devices
    and dtypes are checked, nothing is allocated or computed): a training step (forward, backward,
    optimizer step), an eval forward as evaluate_bpb makes it, and a KV-cache prefill plus one
    decode step. A tensor made on another device, or a matmul mixing dtypes, stops it with a
    SystemExit naming the step. Returns (the estimated peak memory per GPU as a line for the plan,
    a message when that peak does not fit in `memory` less MEMORY_RESERVE_GIB, else None).
    """
    x = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    optimizer = model.setup_optimizer()   # the learning rates change no shape
    step = "training step"
    try:
        with _OneDtypeMatmuls():
            model(x, x).backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            step = "eval step"
            with torch.no_grad():
                model(x, x, loss_reduction="none")
            step = "KV-cache decode step"
            with torch.inference_mode():
                cache = KVCache.for_model(model, batch_size, seq_len)
                model(x[:, :-1], kv_cache=cache)
                model(x[:, -1:], kv_cache=cache)
    except (RuntimeError, TypeError) as e:
        raise SystemExit(f"preflight: the {step} fails at full size: {e}") from None
    estimate = model.estimate_memory(batch_size, world_size, compiled=compiled, seq_len=seq_len)
    line = (f"{sum(estimate.values()) / 2**30:.1f} GiB estimated, of {memory_why} ("
            + ", ".join(f"{k} {v / 2**30:.1f}" for k, v in estimate.items()) + ")")
    if sum(estimate.values()) <= memory - MEMORY_RESERVE_GIB * 2**30:
        return line, None
    return line, (f"preflight: {batch_size} rows per GPU do not fit: {line}, and {MEMORY_RESERVE_GIB} GiB "
                  f"stay reserved; lower --device_batch_size")


def inference_model(model, copy=None):
    """
    The model for work that only runs forwards (samples, evals, serving, RL rollouts): an eval-mode
    copy with its weights stored in the compute dtype, so that no forward casts the fp32 weights
    again (at d20 in bf16 those casts read 4 and write 2 bytes for each of 477M weights, 2.9 GB per
    forward, where a decode step is bound by memory traffic). In fp32 it is the model itself. The
    copy does not follow the model's training: pass it back as `copy` after an optimizer step to
    refresh it in place.
    """
    if model.compute_dtype == torch.float32:
        return model
    if copy is None:
        with torch.device("meta"):
            copy = GPT(model.config).to(model.compute_dtype)
        copy.to_empty(device=model.wte.weight.device)
        copy.compute_dtype = model.compute_dtype
        copy.eval().requires_grad_(False)
    with torch.no_grad():
        for dst, src in zip([*copy.parameters(), *copy.buffers()], [*model.parameters(), *model.buffers()]):
            dst.copy_(src)
    return copy


# ---------------------------------------------------------------------------
# optimizer: Muon + AdamW in one class, for one or many ranks

# Polar Express coefficients, one (a, b, c) per iteration (Amsel et al., arXiv 2505.16932; the
# same list is in modded-nanogpt). Each step maps singular values s -> a·s + b·s³ + c·s⁵ with its
# own (a, b, c). Measured here on a 256x128 matrix with singular values spread over 1..1e-2: bf16
# Polar Express lands them in [0.85, 1.14]; the fixed quintic (3.4445, -4.7750, 2.0315) of Keller
# Jordan's original Muon in [0.67, 1.20]. That tighter fit is why we use it.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
ADAMW_SHARD_MIN_NUMEL = 1024   # smaller AdamW params are all-reduced and updated on every rank


def orthogonalize(G, steps=5):
    """
    Approximate the nearest semi-orthogonal matrix U·Vᵀ of each G = U·S·Vᵀ in a stack (K, m, n),
    in bf16. Works on the wide orientation so the Gram matrix X·Xᵀ is the small one.
    """
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    # the 1.01 safety margin keeps the top singular value below 1 despite bf16 rounding
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class MuonAdamW(torch.optim.Optimizer):
    """
    Muon (Keller Jordan, 2024: Nesterov momentum, then orthogonalized) for 2-D block matrices,
    AdamW for the embedding and the head. Do not use Muon for embeddings, the head, or any
    non-2-D parameter: its update ignores per-row scale, which those need.

    Groups carry g["kind"] ("muon" or "adamw"), g["lr"], and g["initial_lr"] (set here) so a
    schedule writes g["lr"] = g["initial_lr"] * multiplier; Muon groups also carry g["momentum"].
    Muon steps by lr·√max(1, rows/cols) (shape-aware: tall matrices take larger steps).

    Gradients are reduced inside step(); never wrap the model in DDP. With W ranks:
    1. every grad reduction is launched asynchronously. AdamW params of ≥1024 elements whose
       first dim divides by W are reduce-scattered along dim 0 and each rank keeps Adam state
       for its slice only (ZeRO-2); smaller ones are all-reduced and updated everywhere.
       Each Muon group (all one shape) stacks its K grads, zero-pads to a multiple of W and
       reduce-scatters, so rank r owns params [r·K/W, (r+1)·K/W) and keeps their momentum.
    2. per group: wait, update the owned share, launch an all-gather of the new values.
    3. wait for the gathers and copy the values into the params.
    With W = 1 there is no communication and the same code runs on everything.
    state_dict() is per rank: save one file per rank, restore with the same world size.
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        for g in self.param_groups:
            assert g["kind"] in ("muon", "adamw"), f"unknown group kind {g['kind']!r}"
            g.setdefault("initial_lr", g["lr"])
            if g["kind"] == "muon":
                shapes = {tuple(p.shape) for p in g["params"]}
                assert len(shapes) == 1 and len(next(iter(shapes))) == 2, f"a muon group needs 2-D params of one shape, got {shapes}"
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1

    def _launch(self, op, *args):
        """Start a collective (or do nothing at world size 1); returns a handle or None."""
        return op(*args, op=dist.ReduceOp.AVG, async_op=True) if self.world > 1 else None

    def _shards(self, p):
        return self.world > 1 and p.numel() >= ADAMW_SHARD_MIN_NUMEL and p.size(0) % self.world == 0

    @torch.no_grad()
    def step(self):
        W, r = self.world, self.rank
        # phase 1: launch every reduction
        pending = []
        for g in self.param_groups:
            if g["kind"] == "adamw":
                for p in g["params"]:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    if self._shards(p):
                        part = torch.empty_like(grad[: p.size(0) // W])
                        pending.append((g, p, part, self._launch(dist.reduce_scatter_single, part, grad)))
                    else:
                        pending.append((g, p, grad, self._launch(dist.all_reduce, grad)))
            else:
                params = g["params"]
                per_rank = math.ceil(len(params) / W)
                stacked = torch.zeros(per_rank * W, *params[0].shape, dtype=torch.float32, device=params[0].device)
                for i, p in enumerate(params):
                    if p.grad is not None:
                        stacked[i].copy_(p.grad)
                part = stacked[r * per_rank:(r + 1) * per_rank] if W == 1 else torch.empty_like(stacked[:per_rank])
                pending.append((g, params, part, self._launch(dist.reduce_scatter_single, part, stacked)))
        # phase 2: wait, update our share, launch the gathers
        gathers = []
        for g, target, grad, handle in pending:
            if handle is not None:
                handle.wait()
            if g["kind"] == "adamw":
                gathers.append(self._adamw_update(g, target, grad))
            else:
                gathers.append(self._muon_update(g, target, grad))
        # phase 3: wait and copy the new values (stacked: values[i] is params[i]) into the params
        for handle, values, params in gathers:
            if handle is not None:
                handle.wait()
            for p, value in zip(params, values):
                p.copy_(value)

    def _adamw_update(self, g, p, grad):
        """Adam with decoupled weight decay on p or on this rank's slice of p (fp32 math)."""
        sharded = self._shards(p)
        rows = p.size(0) // self.world
        param = p[self.rank * rows:(self.rank + 1) * rows] if sharded else p
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        state["step"] += 1
        beta1, beta2 = g["betas"]
        lr, t = g["lr"], state["step"]
        new = param.float() * (1 - lr * g["weight_decay"])
        state["exp_avg"].lerp_(grad.float(), 1 - beta1)
        state["exp_avg_sq"].lerp_(grad.float().square(), 1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(g["eps"])
        new.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
        new = new.to(p.dtype)
        if not sharded:
            return None, new[None], [p]
        full = torch.empty_like(p)
        return dist.all_gather_single(full, new, async_op=True), full[None], [p]

    def _muon_update(self, g, params, grads):
        """Nesterov momentum + orthogonalization for the params this rank owns in a same-shape group.
        grads (per_rank, rows, cols) is this rank's share of the stacked, averaged grads."""
        per_rank, rows, cols = grads.shape
        owned = params[self.rank * per_rank:(self.rank + 1) * per_rank]   # may be short or empty
        share = torch.zeros_like(grads)                                    # padding rows stay zero
        if owned:
            for p in owned:
                self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            buf = torch.stack([self.state[p]["momentum_buffer"] for p in owned])   # (k, rows, cols)
            grad = grads[:len(owned)]
            buf.lerp_(grad, 1 - g["momentum"])
            for b, p in zip(buf, owned):
                self.state[p]["momentum_buffer"].copy_(b)
            update = orthogonalize(grad.lerp(buf, g["momentum"]), g["ns_steps"]).float()
            share[:len(owned)] = torch.stack([p.float() for p in owned])
            share[:len(owned)] -= g["lr"] * math.sqrt(max(1.0, rows / cols)) * update
        if self.world == 1:
            return None, share, params
        full = torch.empty(per_rank * self.world, rows, cols, dtype=share.dtype, device=share.device)
        return dist.all_gather_single(full, share, async_op=True), full, params

# ---------------------------------------------------------------------------
# inference: KV cache, sampling, the calculator tool, Engine


class KVCache:
    """
    Keys and values of every layer for B rows, preallocated for `seq_len` positions:
    k, v have shape (n_layer, B, n_kv_head, seq_len, head_dim). `pos` (a 0-d tensor, so that a
    compiled decode step does not specialise on it and recompile at every token) counts the filled
    positions; the model advances it after the last layer. Attention always reads the whole cache
    through a mask, so every decode step has the same shapes.
    """

    def __init__(self, batch_size, num_kv_heads, seq_len, head_dim, num_layers, device, dtype):
        shape = (num_layers, batch_size, num_kv_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        c = model.config
        # positions are never checked again (a check would read pos back from the GPU at every token)
        assert seq_len <= model.cos.size(1), f"{seq_len} positions, beyond the rotary table ({model.cos.size(1)})"
        return cls(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer,
                   model.wte.weight.device, model.compute_dtype)

    def insert(self, layer, k, v):
        """Store k, v (B, Hkv, T, D) at pos..pos+T-1. Returns this layer's whole cache (B, Hkv, S, D)
        and the mask (T, S) of the positions each new query may see: the filled ones up to its own."""
        pos = self.pos + torch.arange(k.size(2), device=k.device)               # (T,)
        self.k[layer].index_copy_(2, pos, k)   # fails with "index out of range" when the cache is full
        self.v[layer].index_copy_(2, pos, v)
        mask = torch.arange(self.k.size(3), device=k.device) <= pos[:, None]    # (T, S)
        return self.k[layer], self.v[layer], mask

    def prefill(self, other):
        """Copy a filled batch-1 cache into every row of this (empty, larger) cache."""
        n = int(other.pos)
        assert other.k.size(1) == 1 and n <= self.k.size(3), "prefill needs a batch-1 cache that fits"
        self.k[:, :, :, :n] = other.k[:, :, :, :n]
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.pos.fill_(n)


class RowCache:
    """
    The server's KV cache: up to `max_rows` independent sequences, each with its own length,
    so conversations can join and leave a batch that keeps decoding. The active rows are kept
    packed at the front (rows 0..n-1): add() fills row n from a prefilled batch-1 KVCache,
    remove() moves the last row into the hole. A forward pass on n rows appends T tokens to
    each at its own position; the mask hides from each row what lies past its own length.
    Memory follows the load: room for rows doubles as they are needed, up to max_rows.
    """

    def __init__(self, max_rows, num_kv_heads, seq_len, head_dim, num_layers, device, dtype):
        shape = (num_layers, 1, num_kv_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_rows = max_rows
        self.lengths = []          # filled positions of each active row (host ints: no GPU sync to read)
        self.at, self.mask = None, None

    @classmethod
    def for_model(cls, model, max_rows, seq_len):
        c = model.config
        return cls(max_rows, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer,
                   model.wte.weight.device, model.compute_dtype)

    def add(self, prefilled):
        """Copy a filled batch-1 KVCache into the next free row."""
        row, n = len(self.lengths), int(prefilled.pos)
        assert row < self.max_rows and n <= self.k.size(3), f"no room: row {row}, {n} positions"
        if row == self.k.size(1):
            grow = list(self.k.shape)
            grow[1] = min(row, self.max_rows - row)
            self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=1)
            self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=1)
        self.k[:, row, :, :n] = prefilled.k[:, 0, :, :n]
        self.v[:, row, :, :n] = prefilled.v[:, 0, :, :n]
        self.lengths.append(n)

    def remove(self, row):
        """Free `row`: the last row moves into it, so the active rows stay packed."""
        last = len(self.lengths) - 1
        if row != last:
            n = self.lengths[last]
            self.k[:, row, :, :n] = self.k[:, last, :, :n]
            self.v[:, row, :, :n] = self.v[:, last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()

    def start(self, T):
        """Before a forward of T tokens per active row: -> their positions (B, T); sets the mask."""
        device = self.k.device
        assert max(self.lengths) + T <= self.k.size(3), f"KV cache full: {max(self.lengths) + T} > {self.k.size(3)}"
        self.at = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(T, device=device)
        keys = torch.arange(max(self.lengths) + T, device=device)
        self.mask = keys[None, None, None, :] <= self.at[:, None, :, None]    # (B, 1, T, Tk)
        return self.at

    def insert(self, layer, k, v):
        """Store k, v (B, Hkv, T, D) at each row's positions; return keys, values up to the longest row."""
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        self.k[layer][rows, :, self.at] = k.transpose(1, 2)      # indexed view is (B, T, Hkv, D)
        self.v[layer][rows, :, self.at] = v.transpose(1, 2)
        if layer == self.k.size(0) - 1:
            self.lengths = [n + k.size(2) for n in self.lengths]
        Tk = self.mask.size(-1)
        return self.k[layer, :k.size(0), :, :Tk], self.v[layer, :k.size(0), :, :Tk]


def sample_next_token(logits, rng, temperature, top_k, top_p=None):
    """
    logits (B, V) -> ids (B, 1): argmax at temperature 0; else softmax(logits/T) over the top-k
    (optional), cut to the smallest set of most likely tokens whose mass reaches top_p (optional).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    vals, idx = logits.topk(min(top_k, logits.size(-1)), dim=-1) if top_k is not None else (logits, None)
    probs = F.softmax(vals / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        if idx is None:
            probs, idx = probs.sort(dim=-1, descending=True)
        probs = probs * (probs.cumsum(dim=-1) - probs < top_p)   # keep a token if the mass before it is short of top_p
    choice = torch.multinomial(probs, 1, generator=rng)
    return choice if idx is None else idx.gather(1, choice)


CALC_MAX_CHARS = 1000       # longer tool calls are refused outright
CALC_MAX_NODES = 200        # AST nodes evaluated per call (work limit)
CALC_MAX_MAGNITUDE = 1e18   # any intermediate number beyond this aborts the call
_CALC_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
                ast.Pow: lambda a, b: a ** b}


def _calc_eval(node, budget):
    """Evaluate one whitelisted AST node; raise ValueError for anything else or over a limit."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("expression too long")
    if isinstance(node, ast.Expression):
        return _calc_eval(node.body, budget)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        x = _calc_eval(node.operand, budget)
        value = -x if isinstance(node.op, ast.USub) else +x
    elif isinstance(node, ast.BinOp) and type(node.op) in _CALC_BINOPS:
        a, b = _calc_eval(node.left, budget), _calc_eval(node.right, budget)
        if isinstance(a, str) or isinstance(b, str):
            raise ValueError("no arithmetic on strings")
        if isinstance(node.op, ast.Pow) and abs(a) > 1 and abs(b) * math.log10(abs(a)) > math.log10(CALC_MAX_MAGNITUDE):
            raise ValueError("power too large")   # checked before computing: 9**9**9 never runs
        value = _CALC_BINOPS[type(node.op)](a, b)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
          and len(node.args) == 1 and not node.keywords):
        text, sub = _calc_eval(node.func.value, budget), _calc_eval(node.args[0], budget)
        if not (isinstance(text, str) and isinstance(sub, str)):
            raise ValueError("count works on string literals only")
        value = text.count(sub)
    else:
        raise ValueError(f"not allowed: {type(node).__name__}")
    if isinstance(value, complex) or (not isinstance(value, str) and not abs(value) <= CALC_MAX_MAGNITUDE):
        raise ValueError("number too large")
    return value


def use_calculator(expr):
    """
    The tool behind <|python_start|>expr<|python_end|>: numbers, + - * / // % **, parentheses,
    unary minus, and 'text'.count('x') on string literals. A small AST interpreter with limits
    on size, magnitude and work (no eval/exec, no signals, so it runs anywhere). Thousands
    separators ("1,000") are accepted. Returns str() of the Python value, or None for anything
    refused or failing: the model sees no output and generation goes on.
    """
    expr = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expr.strip())
    if not expr or len(expr) > CALC_MAX_CHARS:
        return None
    try:
        with warnings.catch_warnings():   # e.g. "1a" warns of an invalid decimal literal: stay silent
            warnings.simplefilter("ignore")
            tree = ast.parse(expr, mode="eval")
        return str(_calc_eval(tree, [CALC_MAX_NODES]))
    # untrusted input boundary: any failure (syntax, zero division, overflow, deep nesting) is "no result"
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError, TypeError):
        return None


class Engine:
    """
    Batched sampling with a KV cache and the calculator tool. Knows token ids only; the
    tokenizer gives the special ids and encodes/decodes the tool text.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        sp = tokenizer.special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.stop_ids = {sp("<|assistant_end|>"), sp("<|bos|>")}

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42, top_p=None):
        """
        Prefill `tokens` once at batch 1, copy the cache to num_samples rows, then decode.
        Yields (token_column, mask_column), one entry per row; mask 1 = sampled, 0 = forced
        tool output. Stops after max_tokens or when every row has emitted <|assistant_end|>/<|bos|>
        (rows already done keep receiving tokens, which callers ignore).
        """
        assert len(tokens) > 0, "generate needs at least one prompt token (e.g. <|bos|>)"
        model, device = self.model, self.model.wte.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        prefill = KVCache.for_model(model, 1, len(tokens))
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill)
        cache = KVCache.for_model(model, num_samples, len(tokens) + max_tokens)
        cache.prefill(prefill)
        # every row samples its own first token from the shared prefill logits
        logits = logits[:, -1, :].expand(num_samples, -1)
        rows = [{"forced": deque(), "expr": None, "done": False} for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p).view(-1).tolist()
            column, masks = [], []
            for row, tok in zip(rows, sampled):
                is_forced = bool(row["forced"])
                tok = row["forced"].popleft() if is_forced else tok
                column.append(tok)
                masks.append(0 if is_forced else 1)
                self._tool_step(row, tok)
            yield column, masks
            if all(row["done"] for row in rows) or step == max_tokens - 1:
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).view(num_samples, 1)
            logits = model(ids, kv_cache=cache)[:, -1, :]

    def _tool_step(self, row, tok):
        """The per-row state machine: collect a python block, queue the calculator's answer, stop."""
        if tok in self.stop_ids:
            row["done"] = True
        elif tok == self.python_start:
            row["expr"] = []
        elif tok == self.python_end and row["expr"] is not None:
            result = use_calculator(self.tokenizer.decode(row["expr"]))
            row["expr"] = None
            if result is not None:
                row["forced"].extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row["expr"] is not None:
            row["expr"].append(tok)

    def generate_batch(self, tokens, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        """All samples at once: (sequences, masks), each the prompt plus what was generated up to
        (not including) the stop token; masks are 0 on the prompt and on forced tool output."""
        seqs = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed):
            for i, (tok, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if tok in self.stop_ids:
                    done[i] = True
                else:
                    seqs[i].append(tok)
                    masks[i].append(m)
            if all(done):
                break
        return seqs, masks


class BatchDecoder:
    """
    Continuous batching for the server: independent conversations decoded together, one token
    per row per step(). A conversation joins with add() (its prompt prefilled alone, then copied
    into a free row of a RowCache) and leaves when it ends or with remove(). Each row keeps its
    own sampling settings, random generator (seeded like Engine.generate's, so a row's tokens are
    the ones it would get alone) and tool-use state. Rows move when others leave, so callers hold
    a row's dict (the handle add() returns), never its index.
    """

    def __init__(self, engine, max_rows, seq_len, stop_ids):
        self.engine, self.stop_ids = engine, set(stop_ids)
        self.cache = RowCache.for_model(engine.model, max_rows, seq_len)
        self.rows = []        # handles, in cache-row order
        self.logits = None    # (rows, V): each row's next-token logits

    @torch.inference_mode()
    def add(self, tokens, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=42, logprobs=None):
        """Prefill a prompt and give it a row; -> its handle. Its first token comes at the next step().
        With logprobs=k, each step also leaves in handle["logprob"] the token's log-probability under
        the model (before temperature, top-k, top-p) and the k likeliest tokens': (lp, [(id, lp), ...])."""
        assert tokens and max_tokens > 0, "add needs a prompt and room for at least one token"
        model, device = self.engine.model, self.engine.model.wte.weight.device
        prefill = KVCache.for_model(model, 1, len(tokens))
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill)[:, -1, :]
        self.cache.add(prefill)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        row = {"forced": deque(), "expr": None, "done": False, "left": max_tokens,
               "rng": torch.Generator(device=device).manual_seed(seed),
               "temperature": temperature, "top_k": top_k, "top_p": top_p, "logprobs": logprobs, "logprob": None}
        self.rows.append(row)
        return row

    @torch.inference_mode()
    def remove(self, row):
        """Free a row now (its client left)."""
        i = self.rows.index(row)
        self.cache.remove(i)
        self.logits[i] = self.logits[-1]
        self.logits = self.logits[:-1]
        self.rows[i] = self.rows[-1]
        self.rows.pop()

    @torch.inference_mode()
    def step(self):
        """One token for every row -> [(handle, token, ended)]. Ended rows (a stop token, or
        max_tokens reached) are removed before the survivors' tokens go through the model."""
        if not self.rows:
            return []
        picks = [sample_next_token(self.logits[i:i + 1], row["rng"], row["temperature"], row["top_k"], row["top_p"])
                 for i, row in enumerate(self.rows)]
        # a forced row (tool output) still drew above: its RNG stream stays the one it has alone
        tokens = [row["forced"].popleft() if row["forced"] else tok
                  for row, tok in zip(self.rows, torch.cat(picks).view(-1).tolist())]
        for i, (row, tok) in enumerate(zip(self.rows, tokens)):
            if row["logprobs"] is not None:
                lp = F.log_softmax(self.logits[i].float(), dim=-1)
                top = lp.topk(row["logprobs"]) if row["logprobs"] else None
                alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
                row["logprob"] = (lp[tok].item(), alternatives)
        out = []
        for row, tok in zip(list(self.rows), tokens):
            self.engine._tool_step(row, tok)
            row["token"], row["left"] = tok, row["left"] - 1
            ended = tok in self.stop_ids or row["left"] == 0
            out.append((row, tok, ended))
            if ended:
                self.remove(row)
        if self.rows:
            ids = torch.tensor([row["token"] for row in self.rows], device=self.logits.device)
            self.logits = self.engine.model(ids.view(-1, 1), kv_cache=self.cache)[:, -1, :]
        return out

# ---------------------------------------------------------------------------
# runtime: home, devices, dtypes, torch.distributed, printing, overrides


STAGE_SCRIPTS = {"base": "pretrain.py", "mid": "midtrain.py", "sft": "sft.py", "rl": "rl.py"}   # who writes each stage


def default_home():
    return os.path.join(os.path.expanduser("~"), ".cache", "slimchat")


def home():
    """Where every artifact lives: $SLIMCHAT_HOME, or ~/.cache/slimchat."""
    return os.environ.get("SLIMCHAT_HOME") or default_home()


def check_stage(stage):
    """SystemExit unless `stage` names a stage (base, mid, sft, rl)."""
    if stage not in STAGE_SCRIPTS:
        sys.exit(f"unknown stage {stage!r}: use one of {', '.join(STAGE_SCRIPTS)}")


def other_homes(pattern):
    """The slimchat homes beside the default one (~/.cache/slimchat*, e.g. the tiny preset's
    ~/.cache/slimchat-tiny), other than home(), that hold a file matching `pattern` (a glob under a
    home), newest first: where to point a user whose home has nothing."""
    found = {}
    for d in glob.glob(glob.escape(default_home()) + "*"):
        if os.path.isdir(d) and os.path.abspath(d) != os.path.abspath(home()):
            times = [os.path.getmtime(f) for f in glob.glob(os.path.join(glob.escape(d), pattern))]
            if times:
                found[d] = max(times)
    return sorted(found, key=found.get, reverse=True)


def _elsewhere(what, pattern):
    """'' or the sentence that says which other homes have `what` and how to use one."""
    homes = other_homes(pattern)
    if not homes:
        return ""
    return f"; {what} exists under {', '.join(homes)}: run with SLIMCHAT_HOME={homes[0]} to use it"


def print0(*args, **kwargs):
    """print() on rank 0 only (torchrun sets RANK before torch.distributed is up)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def nvidia_driver():
    """The NVIDIA driver version that nvidia-smi reports, or None (no nvidia-smi, or it sees no GPU)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def no_cuda_message(driver):
    """Why torch sees no GPU here, and the fix: the usual cause is a torch built for a newer CUDA
    than the driver runs (PyPI's default torch needs a 580-series driver, README "What the speedrun needs")."""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    version = torch.__version__.split("+")[0]
    return (f"torch sees no CUDA GPU: torch {torch.__version__} is built for {build}, the NVIDIA driver is "
            f"{driver or 'not found (nvidia-smi is missing or sees no GPU)'}. Fix: install the torch build "
            f"that this driver runs (bash run_all.sh picks it; by hand, with BUILD from README's table, e.g. "
            f"cu126 for drivers from 560.28.03: pip install torch=={version}+BUILD --index-url "
            f"https://download.pytorch.org/whl/BUILD), or upgrade the driver. To use the CPU anyway: --device=cpu")


def compute_init(device=""):
    """
    Set up compute for this process: pick the device ("" = cuda > mps > cpu), join the process
    group when launched by torchrun (nccl on cuda, gloo otherwise), seed every RNG with 42 so
    all ranks build identical models. Returns (ddp, rank, local_rank, world_size, device).
    Stops when torch sees no GPU although cuda was asked for, or nvidia-smi lists GPUs: training
    on the CPU there would run for days without an error.
    """
    device_type = device.split(":")[0] if device else autodetect_device()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {device!r}: use cuda, mps, cpu, or '' to autodetect")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(no_cuda_message(nvidia_driver()))
    if not device and device_type != "cuda" and (driver := nvidia_driver()):
        raise SystemExit(no_cuda_message(driver))
    ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        torch.set_float32_matmul_precision("high")   # tf32 for the few fp32 matmuls
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device_type)
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                device_id=dev if device_type == "cuda" else None)
    torch.manual_seed(42)
    return ddp, rank, local_rank, world_size, dev


# A training stage stopped by Ctrl-C or SIGTERM saves a checkpoint, then exits with this status
# ("stopped early, checkpoint saved"; sysexits.h's EX_TEMPFAIL, "try again later"). run_all.sh
# then stops the pipeline without stamping the stage, and its next run resumes it.
STOPPED_EXIT_CODE = 75


def compute_cleanup(stopped=False):
    """Leave the process group at the end of a stage. Under torchrun this also ends the process.
    stopped: a stop request (Ctrl-C, SIGTERM) ended the run early, after saving a checkpoint; the
    process then exits with STOPPED_EXIT_CODE, so that no caller takes it for a finished stage."""
    code = STOPPED_EXIT_CODE if stopped else 0
    if stopped:
        print0(f"stopped early: the checkpoint is saved, --resume=1 continues (exit status {code})")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        # Skip the interpreter's shutdown: there, after destroy_process_group, torch 2.13's gloo
        # sometimes aborts ("terminate called without an active exception"; about 1 run in 10 on a
        # loaded 2-core box, always after every rank had finished and saved), and torchrun then
        # reports a finished run as a failed rank. Everything this stage wrote is closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if stopped:
        sys.exit(code)


MEMORY_RESERVE_GIB = 4      # per GPU, outside GPT.estimate_memory: CUDA context, NCCL buffers, allocator slack
ASSUMED_GPU = ("H100", 80)  # what a plan made without a GPU is for (the speedrun's node): name, GiB


def planned_world_size():
    """Ranks a preflight plans for: torchrun's, else this machine's GPUs, else the speedrun's 8."""
    return int(os.environ.get("WORLD_SIZE", 0)) or torch.cuda.device_count() or 8


def gpu_memory(memory_gib=-1.0):
    """(bytes, where the figure comes from) of one GPU: memory_gib when > 0, else this process's
    CUDA device's (a preflight on a GPU node plans for its GPUs), else ASSUMED_GPU's."""
    if memory_gib > 0:
        return memory_gib * 2**30, f"{memory_gib:g} GiB (--gpu_memory_gib)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.total_memory / 2**30:.1f} GiB ({props.name})"
    return ASSUMED_GPU[1] * 2**30, f"{ASSUMED_GPU[1]} GiB (an {ASSUMED_GPU[0]}'s: no GPU here)"


def compute_dtype(device):
    """The dtype for activations and matmuls, with the reason (print it). Weights stay fp32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bf16: this CUDA GPU supports it"
    return torch.float32, f"fp32: no bf16-capable CUDA GPU ({device.type})"


def compute_setup(device="", preflight=False):
    """compute_init then compute_dtype: (ddp, rank, local_rank, world_size, device, dtype, why).
    With preflight, the planned GPUs' run on the meta device: no process group, nothing allocated."""
    if preflight:
        return False, 0, 0, planned_world_size(), torch.device("meta"), torch.bfloat16, "bf16: planned for GPUs that have it"
    ddp, rank, local_rank, world_size, dev = compute_init(device)
    return (ddp, rank, local_rank, world_size, dev, *compute_dtype(dev))


def synthetic_data(home_dir=None):
    """True when the pretraining shards under the home are the synthetic mirror of tests/tinyworld.py
    (it marks its parquet files), so reports and the chat page can say what the model knows."""
    import pyarrow.parquet as pq
    try:
        meta = pq.read_schema(os.path.join(home_dir or home(), "data", "shard_01822.parquet")).metadata or {}
    except (OSError, ValueError):   # no shard (yet), or not parquet
        return False
    return meta.get(b"slimchat_source") == b"tinyworld"


# Peak dense (no 2:4 sparsity) bf16 tensor-core FLOP/s with fp32 accumulation, by device name
# without the "NVIDIA " prefix, matched whole and case-blind, for MFU. Figures from NVIDIA's
# datasheets (sparse figures halved); GeForce cards accumulate fp32 at half their fp16 rate. A
# name not listed gets no MFU: a wrong denominator is worse than none (the RTX 4090 D and the laptop
# 4090 are slower chips under almost the same name).
PEAK_FLOPS = [
    (r"H100( SXM5?)?( \d+GB)?( HBM3)?", 989e12),   # "H100 80GB HBM3" is the SXM part
    (r"H100 PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H200( SXM)?( \d+GB)?( HBM3e)?", 989e12),    # an H100 die with more, faster memory
    (r"H200 NVL", 835e12),
    (r"GH200( \d+GB)?", 989e12),
    (r"A100([- ].*)?", 312e12),                     # SXM4 and PCIe, 40 and 80 GB alike
    (r"L40S", 362e12),
    (r"L40", 181e12),
    (r"L4", 121e12),
    (r"GeForce RTX 4090", 165e12),
    (r"B100", 1.75e15),
    (r"B200", 2.25e15),
    (r"GB200", 2.5e15),
]


def peak_flops(device_name):
    """Peak dense bf16 FLOP/s of a GPU from its name (torch.cuda.get_device_name), or None when unknown."""
    name = device_name.strip().removeprefix("NVIDIA ").strip()
    return next((flops for pattern, flops in PEAK_FLOPS if re.fullmatch(pattern, name, flags=re.I)), None)


def reset_peak_memory(device):
    """Start measuring a new peak for peak_memory_gib (nothing to do off cuda)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """The most GPU memory held by tensors since reset_peak_memory, in GiB (the allocator's cache and
    fragmentation come on top); None off cuda, where there is no such figure."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def memory_text(gib):
    """' | mem 12.3GiB' for a log line, or '' when there is no figure."""
    return "" if gib is None else f" | mem {gib:.1f}GiB"


def load_tokenizer():
    """The trained tokenizer at $SLIMCHAT_HOME/tokenizer/tokenizer.json."""
    path = os.path.join(home(), "tokenizer", "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: train one with `python bpe.py train`"
                                + _elsewhere("a tokenizer", os.path.join("tokenizer", "tokenizer.json")))
    return bpe.Tokenizer.load(path)


def _knob_comments(scope):
    """name -> trailing comment of its `name = value  # comment` line in the scope's source file."""
    path = scope.get("__file__")
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(re.findall(r"^([a-z_][a-z0-9_]*)\s*=.*?#\s*(.*)$", f.read(), flags=re.M))


def _parse_knob(name, text, default):
    """Convert --name=text to the type of the default; SystemExit with a readable message if it can't."""
    kind = type(default)
    if kind is bool and text.lower() not in ("1", "0", "true", "false"):
        sys.exit(f"--{name}={text}: expected 1, 0, true or false (default {default!r})")
    try:
        if kind is bool:
            return text.lower() in ("1", "true")
        if default is None:  # an "inherit" knob: take a Python literal, else the text as a string
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        return kind(text)
    except ValueError:
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        sys.exit(f"--{name}={text}: expected {article} {kind.__name__} like the default {default!r}")


def apply_overrides(scope, argv=None):
    """
    Set the knobs of a stage (lowercase module globals of type int, float, bool, str, or None)
    from --name=value arguments; --help lists them. Returns every knob as a dict (log it, save it).
    """
    knobs = {k: v for k, v in scope.items()
             if not k.startswith("_") and k == k.lower() and (v is None or type(v) in (int, float, bool, str))}
    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" in args or "-h" in args:
        comments = _knob_comments(scope)
        about = (scope.get("__doc__") or "").strip().split("\n\n")[0]
        script = os.path.basename(scope.get("__file__") or "script.py")
        print(" ".join(about.split()) or script)
        print(f"\nusage: python {script} [--name=value ...]\nknobs, with their defaults:")
        for k, v in knobs.items():
            print(f"  --{k}={v!r}".ljust(36) + (f"  # {comments[k]}" if k in comments else ""))
        sys.exit(0)
    for arg in args:
        name, eq, text = arg[2:].partition("=")
        if not (arg.startswith("--") and eq and name):
            sys.exit(f"expected --name=value, got {arg!r} (see --help)")
        if name not in knobs:
            hint = difflib.get_close_matches(name, list(knobs), n=1)
            sys.exit(f"unknown knob --{name}" + (f" (did you mean --{hint[0]}?)" if hint else " (see --help)"))
        knobs[name] = scope[name] = _parse_knob(name, text, knobs[name])
    print0("config: " + " ".join(f"{k}={v}" for k, v in knobs.items()))
    return knobs

# ---------------------------------------------------------------------------
# run records and rank agreement: the code's git state, cross-rank reductions, stop signals, JSONL logs


def git_info():
    """Commit and dirty flag of the code being run, for the log (None outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout.strip())
    except OSError:
        return None
    return {"commit": commit or None, "dirty": dirty}


def _rank_reduce(values, ddp, device, op):
    # float64 so progress fractions and counts survive; on the cpu unless nccl needs the GPU
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if ddp:
        dist.all_reduce(t, op=op)
    return t.tolist()


def rank_max(values, ddp, device):
    """Element-wise max of a list of floats over all ranks: every rank must call it at the same point."""
    return _rank_reduce(values, ddp, device, dist.ReduceOp.MAX)


def rank_sum(values, ddp, device):
    """Element-wise sum of a list of floats over all ranks: every rank must call it at the same point."""
    return _rank_reduce(values, ddp, device, dist.ReduceOp.SUM)


def rank_gather(obj, ddp):
    """[obj of rank 0, obj of rank 1, ...] (any picklable object): every rank must call it at the same point."""
    if not ddp:
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def stop_requests():
    """Make Ctrl-C and SIGTERM (what torchrun sends its workers when interrupted) only append the
    signal to the list returned: the loop checks it at the top of each step, rank_max-ed so that
    every rank saves and stops at the same step."""
    requests = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: requests.append(signum))
    return requests


def rewind_log(path, keep_before):
    """Start the JSONL log at `path` for a run: keep only the records with step < keep_before (a
    resumed run redoes the later steps a killed run may have logged); None starts an empty log.
    A line a killed run left half-written is dropped."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = []
    if keep_before is not None and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if line.endswith("\n") and isinstance(record, dict) and record.get("step", 0) < keep_before:
                    lines.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def log_jsonl(path, record):
    """Append one record (a dict) to the JSONL log, stamped with the wall clock ("time", Unix
    seconds: the report card's wall time per stage); rank 0 only."""
    with open(path, "a") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

# ---------------------------------------------------------------------------
# checkpoints: $SLIMCHAT_HOME/checkpoints/<stage>/<tag>/{model,meta,optim}_<step>


def _atomic_write(path, write):
    """write(tmp_path) then rename: readers see the old file or the whole new one, never a part.
    A write that fails or is interrupted (a full disk, Ctrl-C) removes its temp file; the temp
    file's name says which process on which machine writes it (see _remove_temp_files)."""
    tmp = f"{path}.tmp{os.getpid()}-{socket.gethostname()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _writer_gone(pid, host):
    """True when the process that writes a temp file no longer runs (known for this machine only)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass   # alive, another user's
    return False


def _remove_temp_files(ckpt_dir, only_dead_writers):
    """Delete the <name>.tmp<pid>-<host> files that killed saves left in ckpt_dir (gigabytes each
    at d20). With only_dead_writers, delete only those whose writer is gone: a reader may load
    while a training run, on this machine or another, saves into the same folder."""
    for name in os.listdir(ckpt_dir):
        m = re.fullmatch(r".+\.tmp(\d+)-(.+)", name)
        if m and (not only_dead_writers or _writer_gone(int(m.group(1)), m.group(2))):
            try:
                os.remove(os.path.join(ckpt_dir, name))
            except FileNotFoundError:
                pass   # a reader in another process removed it first


def _checkpoint_dir(stage, tag):
    """The tag's directory; with tag None, the stage's only tag or the most recently saved one."""
    root = os.path.join(home(), "checkpoints", stage)
    if tag is not None:
        return os.path.join(root, tag)
    tags = [t for t in (os.listdir(root) if os.path.isdir(root) else []) if os.path.isdir(os.path.join(root, t))]
    if not tags:
        return None
    return max((os.path.join(root, t) for t in tags), key=os.path.getmtime)


def _steps(ckpt_dir):
    """Steps with a meta file; meta is written last, so these checkpoints are complete."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := re.fullmatch(r"meta_(\d+)\.json", f)))


def _newest_first(ckpt_dir, steps):
    """The steps, the one saved last first (by its meta file's time, then by step), not the highest:
    a fresh run into a folder that still holds a longer old run must resume, and hand on, its own."""
    return sorted(steps, key=lambda s: (os.stat(os.path.join(ckpt_dir, f"meta_{s:06d}.json")).st_mtime_ns, s),
                  reverse=True)


def read_meta(stage, tag=None):
    """The meta of the stage's checkpoint saved last, without reading its weights."""
    ckpt_dir, steps = require_checkpoint(stage, tag)
    with open(os.path.join(ckpt_dir, f"meta_{_newest_first(ckpt_dir, steps)[0]:06d}.json"), encoding="utf-8") as f:
        return json.load(f)


def latest_step(stage, tag=None):
    ckpt_dir = _checkpoint_dir(stage, tag)
    steps = _steps(ckpt_dir)
    return _newest_first(ckpt_dir, steps)[0] if steps else None


def save_checkpoint(stage, step, model, meta, optimizer=None, rank=0, tag=None):
    """
    Every rank writes its optimizer shard optim_<step>_rank<r>.pt, rank 0 model_<step>.pt; after
    a barrier (every shard is on disk) rank 0 removes what killed saves left behind and writes
    meta_<step>.json, last: its presence means the checkpoint is whole. Every rank must call this.
    meta gains model_config, step and stage; put the tokenizer fingerprint in meta["tokenizer"].
    """
    tag = tag or f"d{model.config.n_layer}"
    ckpt_dir = os.path.join(home(), "checkpoints", stage, tag)
    os.makedirs(ckpt_dir, exist_ok=True)
    if optimizer is not None:
        _atomic_write(os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt"),
                      lambda p: torch.save(optimizer.state_dict(), p))
    if rank == 0:
        # a torch.compile'd model prefixes names with _orig_mod.; store plain names
        state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
        _atomic_write(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), lambda p: torch.save(state, p))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()   # a kill before this point leaves no meta, so no half-written checkpoint is named
    if rank == 0:
        _remove_temp_files(ckpt_dir, only_dead_writers=False)   # every writer of this run is done
        full_meta = {**meta, "model_config": asdict(model.config), "step": step, "stage": stage}
        text = json.dumps(full_meta, indent=2)
        _atomic_write(os.path.join(ckpt_dir, f"meta_{step:06d}.json"),
                      lambda p: open(p, "w", encoding="utf-8").write(text))
    return ckpt_dir


def require_checkpoint(stage, tag=None):
    """(directory, steps) of the stage's checkpoints; FileNotFoundError naming the script to run
    (and other homes that have one) when there is none."""
    ckpt_dir = _checkpoint_dir(stage, tag)
    steps = _steps(ckpt_dir)
    if not steps:
        where = ckpt_dir or os.path.join(home(), "checkpoints", stage)
        script = STAGE_SCRIPTS.get(stage, f"the {stage} stage")
        elsewhere = _elsewhere(f"a {stage} checkpoint", os.path.join("checkpoints", stage, "*", "meta_*.json"))
        raise FileNotFoundError(f"no {stage} checkpoint under {where}: run `python {script}` first{elsewhere}")
    return ckpt_dir, steps


class CheckpointError(ValueError):
    """A checkpoint step that cannot be loaded (truncated, empty, not a checkpoint, bad meta, weights
    that do not fit): the message names the file and the step."""


def _read_checkpoint(ckpt_dir, step, device, dtype, tokenizer, rank):
    """(model, meta, optimizer state or None) of one step; CheckpointError when a file of it is damaged."""
    def damaged(name, why):
        return CheckpointError(f"damaged checkpoint {os.path.join(ckpt_dir, name)} (step {step}): {why}")
    meta_name, model_name = f"meta_{step:06d}.json", f"model_{step:06d}.pt"
    optim_name = f"optim_{step:06d}_rank{rank}.pt"
    try:
        with open(os.path.join(ckpt_dir, meta_name), encoding="utf-8") as f:
            meta = json.load(f)
        config = GPTConfig(**meta["model_config"])
    except (OSError, ValueError, KeyError, TypeError) as e:   # unreadable, not JSON, no or a bad model_config
        raise damaged(meta_name, f"{type(e).__name__}: {e}") from None
    if tokenizer is not None and meta.get("tokenizer") != tokenizer.fingerprint():
        raise ValueError(f"tokenizer mismatch: {ckpt_dir} step {step} was trained with tokenizer "
                         f"{meta.get('tokenizer')}, the loaded tokenizer is {tokenizer.fingerprint()}")
    try:
        model = new_model(config, device, dtype)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:   # a model_config no model can have
        raise damaged(meta_name, f"model_config {meta['model_config']} builds no model: {e}") from None
    # torch.load raises many types for a damaged file (EOFError, RuntimeError, UnpicklingError, ...)
    try:
        state = torch.load(os.path.join(ckpt_dir, model_name), map_location=device, weights_only=True)
    except Exception as e:
        raise damaged(model_name, f"not a readable checkpoint ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:   # missing or misshapen weights, or not a state dict
        raise damaged(model_name, f"config mismatch: the weights do not fit {config}: {e}") from None
    optim_state = None
    if os.path.exists(os.path.join(ckpt_dir, optim_name)):
        try:
            optim_state = torch.load(os.path.join(ckpt_dir, optim_name), map_location=device, weights_only=True)
        except Exception as e:
            # not a CheckpointError: each rank reads its own shard, and a rank that fell back alone
            # would resume from another step than the others
            raise ValueError(f"damaged optimizer state {os.path.join(ckpt_dir, optim_name)} (step {step}): "
                             f"{type(e).__name__}: {e}; to resume from the previous checkpoint, move step "
                             f"{step}'s files out of {ckpt_dir}") from None
    return model, meta, optim_state


def load_checkpoint(stage, device, step=None, tag=None, tokenizer=None, rank=0, dtype=None):
    """
    Load (model, meta, optimizer state of this rank or None); the step saved last by default.
    With a tokenizer, refuses a checkpoint trained with a different one. A damaged latest step
    is reported (stderr) and the previous good one loaded; a step asked for by number is not replaced.
    """
    ckpt_dir, steps = require_checkpoint(stage, tag)
    if rank == 0:
        _remove_temp_files(ckpt_dir, only_dead_writers=True)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no {stage} checkpoint for step {step} in {ckpt_dir} (have {steps})")
        return _read_checkpoint(ckpt_dir, step, device, dtype, tokenizer, rank)
    order = _newest_first(ckpt_dir, steps)   # a damaged meta still has a time
    for i, s in enumerate(order):
        try:
            return _read_checkpoint(ckpt_dir, s, device, dtype, tokenizer, rank)
        except CheckpointError as e:
            if i + 1 == len(order):
                raise CheckpointError(f"{e}" + ("; no older checkpoint loads either" if i else "")) from None
            print0(f"warning: {e}; loading step {order[i + 1]} instead", file=sys.stderr)

# ---------------------------------------------------------------------------
# downloads: one helper for every remote file (DESIGN.md "Data sources")

DOWNLOAD_ATTEMPTS = 5         # REFERENCE §0.11: up to 5 tries
DOWNLOAD_BACKOFF_S = 1.0      # wait 1, 2, 4, 8 s between tries
DOWNLOAD_TIMEOUT_S = 60       # per connect / per read
DOWNLOAD_CHUNK = 1 << 20
FILES = {  # the non-hub files and their real homes
    "eval_bundle.zip": "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip",
    "identity_conversations.jsonl": "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl",
    "words_alpha.txt": "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt",
}


class PermanentError(Exception):
    """A failure that retrying will not fix (404, missing local file)."""


def hub_url(repo, filename):
    base = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return f"{base.rstrip('/')}/datasets/{repo}/resolve/main/{filename}"


def files_url(name):
    if name not in FILES:
        raise ValueError(f"unknown file {name!r}; known: {sorted(FILES)}")
    base = os.environ.get("SLIMCHAT_FILES_ENDPOINT")
    return f"{base.rstrip('/')}/{name}" if base else FILES[name]


def _fetch_http(url, partial):
    """Append the rest of `url` to `partial` (HTTP Range resume); raise on any short or bad read."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    headers = {"Accept-Encoding": "identity"}   # byte ranges must count the bytes we store
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as r:
        if r.status_code == 416:          # nothing left to send, or a stale partial: start over
            os.remove(partial)
            raise OSError("server refused the resume range; restarting")
        if r.status_code in (404, 410) or (400 <= r.status_code < 500 and r.status_code not in (408, 429)):
            raise PermanentError(f"HTTP {r.status_code}")
        r.raise_for_status()
        resumed = r.status_code == 206
        if resumed and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise OSError(f"unexpected Content-Range {r.headers.get('Content-Range')!r}")
        expected = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        # urllib3 would raise on a short body and drop the bytes of the last read; we keep every
        # byte that arrived (for the resume) and check the length ourselves below
        r.raw.enforce_content_length = False
        got = 0
        with open(partial, "ab" if resumed else "wb") as f:
            for chunk in r.iter_content(DOWNLOAD_CHUNK):
                f.write(chunk)
                got += len(chunk)
        if expected is not None and got != expected:
            raise OSError(f"truncated body: {got} of {expected} bytes")


def _fetch_local(url, partial):
    src = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if not os.path.isfile(src):
        raise PermanentError(f"no such file {src}")
    shutil.copyfile(src, partial)


def _validate(path, kind):
    """Raise ValueError unless the file at `path` is a readable parquet/zip (kind), or kind is None."""
    if kind == "parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
            for i in range(pf.num_row_groups):   # decode every row group: catches corruption past the footer
                pf.read_row_group(i)
        except Exception as e:  # pyarrow raises many types for bad files; all mean "not valid"
            raise ValueError(f"not a valid parquet file: {e}") from None
    elif kind == "zip":
        if not zipfile.is_zipfile(path) or zipfile.ZipFile(path).testzip() is not None:
            raise ValueError("not a valid zip file")


class _FileLock:
    """An advisory lock on path + '.lock', so concurrent processes download a file once."""

    def __init__(self, path):
        self.path = path + ".lock"

    def __enter__(self):
        self.f = open(self.path, "a")
        if fcntl:
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if fcntl:
            fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def download(url, path, validate="auto", attempts=DOWNLOAD_ATTEMPTS, backoff_s=DOWNLOAD_BACKOFF_S):
    """
    Fetch url (http(s):// or file://) to path and return path. Resumes path + '.partial' with a
    Range request, retries with exponential backoff, validates (validate="auto": parquet and zip
    by extension; "parquet", "zip", or None), then renames into place. An existing path is
    trusted: only a validated download ever gets that name.
    """
    if os.path.exists(path):
        return path
    kind = ({".parquet": "parquet", ".zip": "zip"}.get(os.path.splitext(path)[1]) if validate == "auto" else validate)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _FileLock(path):
        if os.path.exists(path):          # another process finished it while we waited
            return path
        partial, error = path + ".partial", None
        for attempt in range(attempts):
            try:
                (_fetch_local if url.startswith("file://") else _fetch_http)(url, partial)
                try:
                    _validate(partial, kind)
                except ValueError:
                    os.remove(partial)        # a corrupt file would poison every resume
                    raise
                os.replace(partial, path)
                return path
            except PermanentError as e:
                raise RuntimeError(f"download failed: {url}: {e}") from None
            except (requests.RequestException, OSError, ValueError) as e:
                error = e
                print0(f"download {url}: attempt {attempt + 1}/{attempts} failed: {e}")
                if attempt + 1 < attempts:
                    time.sleep(backoff_s * 2 ** attempt)
        raise RuntimeError(f"download failed after {attempts} attempts: {url}: {error}")


def fetch_hub(repo, filename):
    """A hub dataset file, cached at $SLIMCHAT_HOME/hub/<repo>/<filename>."""
    return download(hub_url(repo, filename), os.path.join(home(), "hub", repo, filename))


def fetch_file(name):
    """A non-hub file (eval bundle, identity conversations, word list) at $SLIMCHAT_HOME/files/<name>."""
    return download(files_url(name), os.path.join(home(), "files", name))
