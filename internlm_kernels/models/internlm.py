"""The InternLM transformer (InternLM v1, InternLM2/2.5, InternLM3, LLaMA), top-down in one file.

    model = InternLMForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    model = InternLMForCausalLM(ModelArgs.from_name("internlm2-7b"))      # random init
    logits = model(input_ids)                                            # (B, S, V)
    logits = model(packed_ids, cu_seqlens=cu)                            # packed training
    out_ids = model.generate(input_ids, max_new_tokens=64)

Every norm, rotary and attention call goes through ``internlm_kernels`` with the model's
``backend`` ("torch" is pure eager). Pre-norm blocks use the fused add+RMSNorm, so each
residual add is fused with the next norm (the same adds as HF, same rounding).

Weights: the module tree follows HF LLaMA names, with q/k/v fused into one ``qkv_proj``
([q heads; k heads; v heads] rows) and gate/up into ``gate_up_proj`` ([gate; up]), so a
block runs two GEMMs fewer. ``from_pretrained`` maps each family's checkpoint names onto it
(load hooks in ``CHECKPOINT_LAYOUTS``), including InternLM2's fused ``wqkv`` grouped by KV head.

Shape letters: B batch, S sequence, T packed tokens, H hidden, Hq / Hkv query / KV heads,
D head dim, F ffn, V vocab.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import internlm_kernels as ik
from internlm_kernels.reference import FP8_CACHE_DTYPES

Tensor = torch.Tensor


# ======================================================================================
# configuration
# ======================================================================================


FAMILIES = ("internlm", "internlm2", "internlm3", "llama")


@dataclasses.dataclass
class ModelArgs:
    family: str = "internlm2"  # "internlm" (v1), "internlm2" (also 2.5), "internlm3", "llama"
    vocab_size: int = 92544
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: Optional[int] = None  # default hidden_size // num_heads (InternLM3 sets it)
    intermediate_size: int = 14336
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict] = None  # {"type": "linear" | "dynamic", "factor": f}
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, List[int], None] = 2
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def eos_token_ids(self) -> List[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name])

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """Read an HF ``config.json``; the family comes from ``architectures``."""
        architectures = config.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES), None)
        if family is None:
            raise ValueError(f"unknown architecture {architectures!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
        heads = config["num_attention_heads"]
        theta, scaling = _rope_from_config(config)
        # InternLM v1/v2 remote code default ``bias`` to True; InternLM3 to False.
        bias = bool(config.get("bias", family in ("internlm", "internlm2")))
        qkv_bias = {"llama": config.get("attention_bias", False), "internlm": bias, "internlm2": bias,
                    "internlm3": config.get("qkv_bias", False)}[family]
        o_bias = {"llama": config.get("attention_bias", False), "internlm": bias, "internlm2": bias,
                  "internlm3": bias}[family]
        mlp_bias = {"llama": config.get("mlp_bias", False), "internlm": False, "internlm2": False,
                    "internlm3": bias}[family]
        return cls(
            family=family, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim"),
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048), rope_theta=theta,
            rope_scaling=scaling, rms_norm_eps=config.get("rms_norm_eps", 1e-6), qkv_bias=bool(qkv_bias),
            o_bias=bool(o_bias), mlp_bias=bool(mlp_bias), tie_word_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"))


def _rope_from_config(config: dict) -> Tuple[float, Optional[dict]]:
    """(theta, scaling) from HF's spellings: rope_theta + rope_scaling (4.x, InternLM remote
    code), rope_parameters (transformers 5.x), or InternLM v1's ``rotary`` block."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or params or {})
    rotary = config.get("rotary") or {}
    theta = config.get("rope_theta", params.get("rope_theta", rotary.get("base", 10000.0)))
    kind = scaling.get("type", scaling.get("rope_type", rotary.get("type")))
    if kind in (None, "default"):
        return float(theta), None
    factor = scaling.get("factor", rotary.get("scaling_factor", 1.0))
    return float(theta), {"type": kind, "factor": float(factor)}


ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "InternLMForCausalLM": "internlm",
    "InternLM2ForCausalLM": "internlm2",
    "InternLM3ForCausalLM": "internlm3",
}

_DYN = "dynamic"
PRESETS: Dict[str, ModelArgs] = {
    "internlm-7b": ModelArgs("internlm", 103168, 4096, 32, 32, 32, None, 11008, 2048, 10000.0,
                             {"type": _DYN, "factor": 1.0}, 1e-6, qkv_bias=True, o_bias=True),
    "internlm-20b": ModelArgs("internlm", 103168, 5120, 60, 40, 40, None, 13824, 4096, 10000.0,
                              {"type": _DYN, "factor": 1.0}, 1e-6),
    "internlm2-1_8b": ModelArgs("internlm2", 92544, 2048, 24, 16, 8, None, 8192, 32768, 1e6,
                                {"type": _DYN, "factor": 2.0}, 1e-5),
    "internlm2-7b": ModelArgs("internlm2", 92544, 4096, 32, 32, 8, None, 14336, 32768, 1e6,
                              {"type": _DYN, "factor": 2.0}, 1e-5),
    "internlm2_5-7b": ModelArgs("internlm2", 92544, 4096, 32, 32, 8, None, 14336, 32768, 1e6,
                                {"type": _DYN, "factor": 2.0}, 1e-5),
    "internlm2-20b": ModelArgs("internlm2", 92544, 6144, 48, 48, 8, None, 16384, 32768, 1e6,
                               {"type": _DYN, "factor": 2.0}, 1e-5),
    "internlm2_5-20b": ModelArgs("internlm2", 92544, 6144, 48, 48, 8, None, 16384, 32768, 5e7,
                                 {"type": _DYN, "factor": 2.5}, 1e-5),
    "internlm3-8b": ModelArgs("internlm3", 128512, 4096, 48, 32, 2, 128, 10240, 32768, 5e7,
                              {"type": _DYN, "factor": 6.0}, 1e-5),
    # Tiny models that keep every structural feature, for tests and demos.
    "tiny-internlm2": ModelArgs("internlm2", 256, 96, 2, 6, 2, None, 160, 32, 10000.0,
                                {"type": _DYN, "factor": 2.0}, 1e-5),
    "tiny-internlm3": ModelArgs("internlm3", 256, 96, 2, 4, 2, 32, 160, 32, 10000.0,
                                {"type": _DYN, "factor": 2.0}, 1e-5, qkv_bias=True),
    "tiny-internlm": ModelArgs("internlm", 256, 64, 2, 4, 4, None, 128, 32, 10000.0, None, 1e-6,
                               qkv_bias=True, o_bias=True),
    "tiny-llama": ModelArgs("llama", 256, 64, 2, 4, 2, None, 128, 64, 10000.0, None, 1e-6),
}


# ======================================================================================
# the model
# ======================================================================================


class InternLMForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, backend: str = "auto"):
        super().__init__()
        self.args = args
        self.backend = backend
        self.model = Transformer(args, backend)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(_init_weights)

    def forward(self, input_ids: Tensor, *, position_ids: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, cache: Optional["KVCache"] = None,
                seq_len: Optional[int] = None) -> Tensor:
        """Logits (B, S, V) for input_ids (B, S); or (T, V) for packed input_ids (T,) with
        cu_seqlens (B+1,) int32, positions restarting at every sequence.

        position_ids (B, S) or (S,) override the positions (``seq_len``: the number of
        positions they may reach, for the rotary tables). With a ``cache`` the tokens continue
        the cached sequences and are appended to it.
        """
        return self.lm_head(self.model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, cache=cache,
                                       seq_len=seq_len))

    # ------------------------------------------------------------------ generation
    def new_cache(self, batch: int, capacity: int, dtype: Optional[torch.dtype] = None) -> "KVCache":
        """An empty KV cache; ``dtype`` None is the model's, or an fp8 type (entries stored
        with scale 1, as vLLM's and lmdeploy's uncalibrated fp8 caches)."""
        args, weight = self.args, self.lm_head.weight
        if dtype not in (None, weight.dtype) + FP8_CACHE_DTYPES:
            raise ValueError(f"new_cache: dtype must be None (the model's, {weight.dtype}) or an fp8 type "
                             f"(float8_e4m3fn, float8_e5m2), got {dtype}")
        return KVCache(args.num_layers, batch, capacity, args.num_kv_heads, args.head_dim, dtype or weight.dtype,
                       weight.device)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 64, *, prompt_lengths=None, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None, on_token: Optional[Callable[[Tensor], None]] = None,
                 cache_dtype: Optional[torch.dtype] = None) -> Tensor:
        """Prefill, then decode with a preallocated KV cache. input_ids (B, S): prompts of
        equal length, or of ``prompt_lengths`` (B,) each, right-padded to S (what the padding
        holds is never read). Greedy when temperature == 0, else top-p sampling. Stops when
        every sequence has produced an EOS id (config's by default); finished rows are padded
        with their EOS id. ``on_token(ids (B,))`` is called for every step (streaming).
        Returns (B, S + generated): each row its prompt, its generated tokens, then padding (the
        first EOS id, else 0) where its prompt was shorter than S.

        Rows of different lengths share one rotary table sized for the longest, as HF's
        padded batches do: under dynamic NTK scaling past max_position_embeddings, a shorter
        row sees the longer row's angles. ``cache_dtype`` torch.float8_e4m3fn (or e5m2) keeps
        the KV cache in fp8 (``new_cache``): half its memory.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"generate: input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        eos = self.args.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        batch, prompt = input_ids.shape
        lengths = None if prompt_lengths is None else _prompt_lengths(prompt_lengths, batch, prompt, input_ids.device)
        cache = self.new_cache(batch, prompt + max_new_tokens, cache_dtype)
        logits = self(input_ids, cache=cache)
        if lengths is None:
            logits = logits[:, -1]
        else:  # each row's last prompt token; its cache then ends there (later slots are overwritten)
            logits = logits[torch.arange(batch, device=input_ids.device), lengths.long() - 1]
            cache.lengths.copy_(lengths)
        eos_tensor = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        generated = []
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)
            if eos:
                token = torch.where(finished, eos_tensor[0], token)
                finished |= torch.isin(token, eos_tensor)
            generated.append(token)
            if on_token is not None:
                on_token(token)
            if step + 1 == max_new_tokens or (eos and bool(finished.all())):
                break
            logits = self(token[:, None], cache=cache)[:, -1]
        new = torch.stack(generated, dim=1) if generated else input_ids.new_empty(batch, 0)
        if lengths is None:
            return torch.cat((input_ids, new), dim=1)
        # Row b: prompt[:length_b], then its tokens, then padding.
        start = lengths.long()[:, None]
        padding = eos[0] if eos else 0
        in_prompt = torch.arange(prompt, device=input_ids.device)[None, :] < start
        out = torch.full((batch, prompt + new.shape[1]), padding, dtype=input_ids.dtype, device=input_ids.device)
        out[:, :prompt] = torch.where(in_prompt, input_ids, padding)
        return out.scatter_(1, start + torch.arange(new.shape[1], device=input_ids.device), new)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None,
                        backend: str = "auto") -> "InternLMForCausalLM":
        """Load a local HF-format directory (config.json + *.safetensors or pytorch_model*.bin,
        sharded or not). Never touches the network. Safetensors shards are memory-mapped and
        copied tensor by tensor into the model, so peak memory is about the model's size."""
        config = read_config(path)
        args = ModelArgs.from_hf_config(config)
        if dtype is None:
            dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
        with torch.device("meta"):
            model = cls(args, backend)
        model.to_empty(device=device or "cpu")
        model.to(dtype)
        with CheckpointReader(path) as checkpoint:
            load_checkpoint(model, checkpoint)
        model.model.rotary.reset_tables()
        return model.eval()


def sample(logits: Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _prompt_lengths(prompt_lengths, batch: int, prompt: int, device) -> Tensor:
    """generate's prompt_lengths as a (B,) int32 device tensor, each in [1, S] (read on the
    host: generate syncs on every step anyway)."""
    lengths = torch.as_tensor(prompt_lengths)
    integral = not (lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool)
    values = lengths.tolist() if lengths.dim() == 1 and integral else None
    if values is None or len(values) != batch or not all(1 <= n <= prompt for n in values):
        raise ValueError(f"generate: prompt_lengths must hold {batch} lengths in [1, {prompt}] (input_ids is "
                         f"({batch}, {prompt})), got {prompt_lengths!r}")
    return lengths.to(device=device, dtype=torch.int32)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, backend: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.rotary = ik.nn.RotaryEmbedding(args.head_dim, base=args.rope_theta, scaling=args.rope_scaling,
                                            max_position_embeddings=args.max_position_embeddings, backend=backend)
        self.layers = nn.ModuleList(Block(args, backend) for _ in range(args.num_layers))
        self.norm = ik.nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps, backend=backend)

    def forward(self, input_ids, *, position_ids=None, cu_seqlens=None, cache=None, seq_len=None):
        h = self.embed_tokens(input_ids)  # (B, S, H) or (T, H)
        if seq_len is None:
            if cache is not None:
                seq_len = cache.length + input_ids.shape[1]
            elif position_ids is None and cu_seqlens is None:
                seq_len = input_ids.shape[1]
        cos, sin = self.rotary.tables(seq_len if seq_len is not None else self.rotary.cos.shape[0])
        residual = None
        for index, layer in enumerate(self.layers):
            h, residual = layer(h, residual, cos, sin, position_ids=position_ids, cu_seqlens=cu_seqlens,
                                cache=cache, layer_index=index)
        h, _ = self.norm(h, residual)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return h


class Block(nn.Module):
    """Pre-norm block. ``input_layernorm(h, residual)`` adds the previous block's output into
    the residual stream and normalises it in one kernel."""

    def __init__(self, args: ModelArgs, backend: str):
        super().__init__()
        self.input_layernorm = ik.nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps, backend=backend)
        self.self_attn = Attention(args, backend)
        self.post_attention_layernorm = ik.nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps, backend=backend)
        self.mlp = SwiGLU(args)

    def forward(self, h, residual, cos, sin, **attention_kwargs):
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        x = self.self_attn(x, cos, sin, **attention_kwargs)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, backend: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.rotary_backend = backend  # separate so ik.patch(model, rotary=..., attention=...) can pick
        self.attention_backend = backend
        qkv_rows = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, qkv_rows, bias=args.qkv_bias)  # [q; k; v] rows
        self.o_proj = nn.Linear(self.heads * self.head_dim, args.hidden_size, bias=args.o_bias)

    def forward(self, x, cos, sin, *, position_ids=None, cu_seqlens=None, cache=None, layer_index=0):
        qkv = self.qkv_proj(x)  # (B, S, (Hq + 2 Hkv) D) or (T, ...)
        split = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv.split(split, dim=-1))  # views
        if cache is not None:  # new tokens at positions cache.lengths + i
            tables = {"rotary_cos": cos, "rotary_sin": sin}  # rotary inside the cache kernels
            if self.rotary_backend != self.attention_backend:
                q, k = ik.apply_rotary(q, k, cos, sin, seqlen_offsets=cache.lengths, backend=self.rotary_backend)
                tables = {}
            out = ik.flash_attention_with_kvcache(
                q, cache.k[layer_index], cache.v[layer_index], k=k, v=v, cache_seqlens=cache.lengths,
                causal=True, backend=self.attention_backend, **tables, **cache.scales)
        else:
            q, k = ik.apply_rotary(q, k, cos, sin, position_ids=position_ids, cu_seqlens=cu_seqlens,
                                   backend=self.rotary_backend)
            out = ik.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                     backend=self.attention_backend)
        return self.o_proj(out.flatten(-2))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one GEMM."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _init_weights(module: nn.Module) -> None:
    # Small normal init as LLaMA-style models use; norms start at one (ik.nn.RMSNorm).
    if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class KVCache:
    """Preallocated keys and values per layer, (B, capacity, Hkv, D) of the model's dtype or
    an fp8 one (scale 1), and the filled lengths.

    All sequences advance together: ``lengths`` (B,) int32 on the device (for the kernels)
    holds each row's length (rows start at different lengths after a ragged prefill), and
    ``length``, a host int, the longest (for the rotary tables)."""

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        self.k = [torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.capacity = capacity
        self.length = 0
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        # fp8: the attention's k_scale / v_scale, made once (a float would be filled into a
        # tensor on every call of every layer)
        self.scales = {}
        if dtype in FP8_CACHE_DTYPES:  # two tensors: either may be refilled with a calibrated scale
            self.scales = {name: torch.ones(1, dtype=torch.float32, device=device) for name in ("k_scale", "v_scale")}

    def advance(self, tokens: int) -> None:
        self.length += tokens
        self.lengths += tokens


# ======================================================================================
# checkpoints
# ======================================================================================


def read_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}: from_pretrained needs a local HF-format directory")
    with open(config_path) as f:
        return json.load(f)


IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints store the rotary table


class CheckpointReader:
    """Name -> tensor access over the shards of a local checkpoint, loading lazily.

    Safetensors are memory-mapped (``safe_open``); ``.bin`` shards are loaded with
    ``torch.load(mmap=True, weights_only=True)``."""

    def __init__(self, path: str):
        self.path = path
        self._location: Dict[str, str] = {}
        self._handles: Dict[str, object] = {}
        safetensors = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        if not safetensors and not bins:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin files in {path!r}")
        self._safetensors = bool(safetensors)
        for file in safetensors or bins:
            for name in self._keys(file):
                self._location[name] = file

    def _open(self, file: str):
        if file not in self._handles:
            if self._safetensors:
                from safetensors import safe_open
                self._handles[file] = safe_open(file, framework="pt")
            else:
                self._handles[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[file]

    def _keys(self, file: str) -> List[str]:
        handle = self._open(file)
        return list(handle.keys())

    def names(self) -> List[str]:
        return list(self._location)

    def get(self, name: str) -> Tensor:
        handle = self._open(self._location[name])
        return handle.get_tensor(name) if self._safetensors else handle[name]

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handles.clear()


# Each family's checkpoint names for one of our parameters, and how to assemble it.
# A rule maps our name (with {i} for the layer) to (checkpoint names, assemble function).


def _concat(*tensors: Tensor) -> Tensor:
    return torch.cat(tensors, dim=0)


def _ungroup_wqkv(args: ModelArgs):
    """InternLM2's wqkv rows are grouped by KV head: nKV blocks of [g q heads, k, v] (D rows
    each). Ours are [all q heads; all k heads; all v heads]."""
    group, d = args.num_heads // args.num_kv_heads, args.head_dim

    def assemble(wqkv: Tensor) -> Tensor:
        blocks = wqkv.reshape(args.num_kv_heads, group + 2, d, *wqkv.shape[1:])
        q = blocks[:, :group].reshape(-1, *wqkv.shape[1:])
        return torch.cat((q, blocks[:, group].reshape(-1, *wqkv.shape[1:]),
                          blocks[:, group + 1].reshape(-1, *wqkv.shape[1:])), dim=0)
    return assemble


def _llama_layout(args: ModelArgs) -> Dict[str, Tuple[List[str], Callable]]:
    layer = "model.layers.{i}."
    rules = {
        "model.embed_tokens.weight": (["model.embed_tokens.weight"], _concat),
        "model.norm.weight": (["model.norm.weight"], _concat),
        "lm_head.weight": (["lm_head.weight"], _concat),
        layer + "input_layernorm.weight": ([layer + "input_layernorm.weight"], _concat),
        layer + "post_attention_layernorm.weight": ([layer + "post_attention_layernorm.weight"], _concat),
        layer + "self_attn.o_proj.weight": ([layer + "self_attn.o_proj.weight"], _concat),
        layer + "mlp.down_proj.weight": ([layer + "mlp.down_proj.weight"], _concat),
    }
    for kind in ("weight", "bias"):
        rules[layer + f"self_attn.qkv_proj.{kind}"] = (
            [layer + f"self_attn.{p}_proj.{kind}" for p in "qkv"], _concat)
        rules[layer + f"mlp.gate_up_proj.{kind}"] = ([layer + f"mlp.{p}_proj.{kind}" for p in ("gate", "up")], _concat)
    rules[layer + "self_attn.o_proj.bias"] = ([layer + "self_attn.o_proj.bias"], _concat)
    rules[layer + "mlp.down_proj.bias"] = ([layer + "mlp.down_proj.bias"], _concat)
    return rules


def _internlm2_layout(args: ModelArgs) -> Dict[str, Tuple[List[str], Callable]]:
    layer, theirs = "model.layers.{i}.", "model.layers.{i}."
    ungroup = _ungroup_wqkv(args)
    return {
        "model.embed_tokens.weight": (["model.tok_embeddings.weight"], _concat),
        "model.norm.weight": (["model.norm.weight"], _concat),
        "lm_head.weight": (["output.weight"], _concat),
        layer + "input_layernorm.weight": ([theirs + "attention_norm.weight"], _concat),
        layer + "post_attention_layernorm.weight": ([theirs + "ffn_norm.weight"], _concat),
        layer + "self_attn.qkv_proj.weight": ([theirs + "attention.wqkv.weight"], ungroup),
        layer + "self_attn.qkv_proj.bias": ([theirs + "attention.wqkv.bias"], ungroup),
        layer + "self_attn.o_proj.weight": ([theirs + "attention.wo.weight"], _concat),
        layer + "self_attn.o_proj.bias": ([theirs + "attention.wo.bias"], _concat),
        layer + "mlp.gate_up_proj.weight": ([theirs + "feed_forward.w1.weight", theirs + "feed_forward.w3.weight"],
                                            _concat),
        layer + "mlp.down_proj.weight": ([theirs + "feed_forward.w2.weight"], _concat),
    }


CHECKPOINT_LAYOUTS: Dict[str, Callable[[ModelArgs], Dict[str, Tuple[List[str], Callable]]]] = {
    "llama": _llama_layout, "internlm": _llama_layout, "internlm3": _llama_layout, "internlm2": _internlm2_layout,
}


def _rule_for(name: str, rules) -> Tuple[List[str], Callable]:
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            pattern = ".".join(parts[:index] + ["{i}"] + parts[index + 1:])
            if pattern in rules:
                names, assemble = rules[pattern]
                return [n.format(i=part) for n in names], assemble
    if name in rules:
        return rules[name]
    raise KeyError(name)


@torch.no_grad()
def load_checkpoint(model: InternLMForCausalLM, checkpoint: CheckpointReader) -> None:
    """Copy every parameter from the checkpoint; raise naming every missing tensor, every
    unexpected one, and any shape mismatch with both shapes."""
    rules = CHECKPOINT_LAYOUTS[model.args.family](model.args)
    params = dict(model.named_parameters())
    if model.args.tie_word_embeddings:
        params.pop("lm_head.weight", None)  # shares the embedding
    plan, missing = {}, []
    for name in params:
        try:
            sources, assemble = _rule_for(name, rules)
        except KeyError:
            raise RuntimeError(f"no checkpoint mapping for parameter {name!r} of family {model.args.family!r}")
        absent = [s for s in sources if s not in checkpoint]
        missing.extend(absent)
        plan[name] = (sources, assemble)
    used = {s for sources, _ in plan.values() for s in sources}
    unexpected = [n for n in checkpoint.names() if n not in used and not n.endswith(IGNORED_CHECKPOINT_SUFFIXES)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint.path!r} does not match the {model.args.family} model: "
                           f"missing tensors {sorted(missing)}; unexpected tensors {sorted(unexpected)}")
    for name, (sources, assemble) in plan.items():
        tensor = assemble(*(checkpoint.get(s) for s in sources))
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise RuntimeError(f"shape mismatch for {name} (from {sources}): checkpoint gives "
                               f"{tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
        params[name].copy_(tensor)


__all__ = ["ModelArgs", "PRESETS", "InternLMForCausalLM", "KVCache", "sample", "read_config", "CheckpointReader",
           "load_checkpoint"]
