"""A stand-in for the InternLM2 remote code (``modeling_internlm2.py`` of HF checkpoints),
reduced to what ``ik.patch`` touches: the class names, the RMSNorm cast order, the fused
``wqkv`` grouped by KV head, and the older module-level
``apply_rotary_pos_emb(q, k, cos, sin, position_ids)`` that indexes a (S, D) cos table.
Attention is computed inline, as the remote eager class does. Used only by tests/test_patch.py.
"""

import math

import torch
from torch import nn


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim=1):
    cos = cos[position_ids].unsqueeze(unsqueeze_dim)
    sin = sin[position_ids].unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class InternLM2RotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=64, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        t = torch.arange(max_position_embeddings).float()
        emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, x, seq_len):
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


class InternLM2Attention(nn.Module):
    def __init__(self, hidden, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.groups = heads // kv_heads
        self.wqkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.rotary_emb = InternLM2RotaryEmbedding(self.head_dim)

    def forward(self, hidden_states, position_ids):
        batch, seqlen, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states).view(batch, seqlen, self.kv_heads, self.groups + 2, self.head_dim)
        q = qkv[..., : self.groups, :].reshape(batch, seqlen, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        cos, sin = self.rotary_emb(v, seq_len=seqlen)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, position_ids)
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        mask = torch.full((seqlen, seqlen), float("-inf"), device=q.device).triu(1)
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seqlen, -1)
        return self.wo(out)


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, ffn):
        super().__init__()
        self.attention = InternLM2Attention(hidden, heads, kv_heads)
        self.attention_norm = InternLM2RMSNorm(hidden)
        self.ffn_norm = InternLM2RMSNorm(hidden)
        self.w1, self.w3, self.w2 = nn.Linear(hidden, ffn, False), nn.Linear(hidden, ffn, False), nn.Linear(ffn, hidden,
                                                                                                               False)

    def forward(self, h, position_ids):
        h = h + self.attention(self.attention_norm(h), position_ids)
        x = self.ffn_norm(h)
        return h + self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, vocab=64, hidden=48, heads=6, kv_heads=2, ffn=80, layers=2):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(hidden, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = InternLM2RMSNorm(hidden)
        self.output = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, position_ids)
        return self.output(self.norm(h))
