"""The fast loop's model: a PEFT-wrapped decoder flattened into tensors, one compiled layer
function reused for every layer, and a chunked cross-entropy, so the full logits never exist.

:func:`extract` takes (does not copy) the tensors of the PEFT model the training stage built;
:class:`FastModel` computes the loss with the same maths as the PEFT model (checked per family
against PEFT on the CPU). :mod:`.fast_loop` trains it.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Callable, Optional

from .. import env

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def active_module(module: Any) -> Any:
    """The module PEFT actually runs: the trained copy of a modules_to_save wrapper, else itself."""
    saved = getattr(module, "modules_to_save", None)
    if saved is not None and "default" in saved:
        return saved["default"]
    return module


def float_types() -> tuple:
    """The dtypes of base weights the fast model computes with (not quantized ones)."""
    import torch

    return (torch.bfloat16, torch.float16, torch.float32)


def projection(layer: Any, name: str) -> Any:
    """A decoder layer's q/k/v/o (attention) or gate/up/down (MLP) module."""
    return getattr(layer.self_attn if name in PROJ[:4] else layer.mlp, name)


def base_linear(mod: Any) -> Any:
    """The frozen linear under a LoRA wrapper (the module itself when not wrapped)."""
    return getattr(mod, "base_layer", mod)


# ---------------------------------------------------------------- the network as flat tensors


@dataclasses.dataclass
class Net:
    """The tensors the fast forward reads, taken (not copied, except fused frozen weights) from the model."""

    embed: Any  # [V, d] weight used by the input embedding
    head: Any  # [V, d] weight used by lm_head (may be the same tensor as embed)
    norm: Any  # final RMSNorm weight
    layers: list  # one tuple of tensors per layer, see _layer_tensors
    cfg: SimpleNamespace  # static shapes and constants
    rotary: Any  # the model's rotary embedding module (for cos/sin)
    trainable: list  # (name, parameter) pairs the optimizer updates


def extract(model: Any, dtype: Any = None, fp8: bool = False) -> Net:
    """Flatten a PEFT-wrapped model of a fast-loop family (:func:`.fast_loop.archs`) into the tensors of :class:`Net` (shared with the model).

    ``dtype`` is the compute dtype (bf16 on CUDA; the CPU tests use fp32 to compare with PEFT).
    ``fp8``: hold the four frozen base weights of each layer in FP8 with per-channel scales
    (:mod:`.fp8`); the scales are appended to the layer's tuple (indices 24-27).
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    c = base.config
    dt = dtype or torch.bfloat16
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    lora_on, ranks, scales = [], [], []
    first = base.model.layers[0]
    for name in PROJ:
        mod = projection(first, name)
        has = hasattr(mod, "lora_A") and "default" in mod.lora_A
        lora_on.append(has)
        ranks.append(mod.lora_A["default"].weight.shape[0] if has else 0)
        scales.append(float(mod.scaling["default"]) if has else 0.0)
    cfg = SimpleNamespace(hidden=c.hidden_size, heads=heads, kv=kv, hd=hd, eps=c.rms_norm_eps,
                          inter=c.intermediate_size, lora=tuple(lora_on), ranks=tuple(ranks),
                          scales=tuple(scales), dtype=dt, vocab=c.vocab_size, **family_constants(c, first))
    layers = [_layer_tensors(layer, dt) + _family_tensors(layer, dt) for layer in base.model.layers]
    if fp8:
        layers = [_fp8_layer(t) for t in layers]
    embed = active_module(base.get_input_embeddings()).weight
    head = active_module(base.get_output_embeddings()).weight
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rotary = getattr(base.model, "rotary_emb", None) or first.self_attn.rotary_emb
    return Net(embed, head, base.model.norm.weight.detach().to(dt), layers, cfg, rotary, trainable)


def family_constants(c: Any, first_layer: Any) -> dict:
    """What sets a family's layer apart from Llama's, as constants of the layer function.

    qk_norm: "head" for Qwen3's RMSNorm over each head of q and k (before RoPE), "full" for
    OLMo 2's over the whole projection, else False; post_norm: OLMo 2 normalizes the attention and
    MLP outputs instead of their inputs; rope_layers: per layer, whether it applies RoPE (SmolLM3
    leaves every fourth out); Granite's multipliers (1.0 and the default 1/sqrt(head_dim)
    attention scale elsewhere).
    """
    n = c.num_hidden_layers
    no_rope = getattr(c, "no_rope_layers", None)
    attn = first_layer.self_attn
    qk_norm = False
    if hasattr(attn, "q_norm"):
        qk_norm = "head" if attn.q_norm.weight.shape[0] == getattr(attn, "head_dim", -1) else "full"
    return dict(qk_norm=qk_norm, post_norm=not hasattr(first_layer, "input_layernorm"),
                rope_layers=tuple(bool(x) for x in no_rope) if no_rope else (True,) * n,
                emb_mult=float(getattr(c, "embedding_multiplier", 1.0) or 1.0),
                res_mult=float(getattr(c, "residual_multiplier", 1.0) or 1.0),
                attn_scale=getattr(c, "attention_multiplier", None),
                logit_scale=float(getattr(c, "logits_scaling", 1.0) or 1.0))


def _family_tensors(layer: Any, dt: Any) -> tuple:
    """(q_norm, k_norm, post-MLP norm) weights where the family has them (Qwen3, OLMo 2), else None,
    appended after the LoRA pairs."""
    def weight(module: Any, name: str) -> Any:
        norm = getattr(module, name, None)
        return None if norm is None else norm.weight.detach().to(dt)

    attn = layer.self_attn
    return (weight(attn, "q_norm"), weight(attn, "k_norm"), weight(layer, "post_feedforward_layernorm"))


def _layer_tensors(layer: Any, dt: Any) -> tuple:
    """(ln1, w_qkv, b_qkv, w_o, ln2, w_gu, w_down, A_q, B_q, ..., A_down, B_down) for one layer."""
    import torch

    def w(name):
        return base_linear(projection(layer, name)).weight.detach().to(dt)

    def b(name):
        bias = base_linear(projection(layer, name)).bias
        return None if bias is None else bias.detach().to(dt)

    qkv_bias = [b(n) for n in PROJ[:3]]
    fused_bias = torch.cat(qkv_bias) if all(x is not None for x in qkv_bias) else None
    pre_norm = getattr(layer, "input_layernorm", None)  # OLMo 2 has none (it normalizes outputs)
    ln1 = None if pre_norm is None else pre_norm.weight.detach().to(dt)
    out = [ln1, torch.cat([w(n) for n in PROJ[:3]]), fused_bias,
           w("o_proj"), layer.post_attention_layernorm.weight.detach().to(dt),
           torch.cat([w("gate_proj"), w("up_proj")]), w("down_proj")]
    for name in PROJ:
        mod = projection(layer, name)
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out += [mod.lora_A["default"].weight, mod.lora_B["default"].weight]
        else:
            out += [None, None]
    return tuple(out)


BASE_WEIGHTS = (1, 3, 5, 6)  # w_qkv, w_o, w_gu, w_down in a layer's tuple


def _fp8_layer(tensors: tuple) -> tuple:
    """A layer's tuple with its base weights in FP8 and their scales appended (in BASE_WEIGHTS order; None: kept)."""
    from .fp8 import quantize_weight

    out, scales = list(tensors), []
    for i in BASE_WEIGHTS:
        sw = None
        if all(n % 16 == 0 for n in tensors[i].shape):  # FP8 matmuls need both dims in 16s; else bf16
            out[i], sw = quantize_weight(tensors[i])
        scales.append(sw)
    return tuple(out + scales)


def _rms(x: Any, w: Any, eps: float) -> Any:
    import torch

    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rms_out(x: Any, w: Any, eps: float) -> Any:
    """OLMo 2's RMSNorm: the weight multiplies in fp32 before the cast back (Llama's after)."""
    import torch

    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (w * xf).to(x.dtype)


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _fused_lora_linear() -> Any:
    """y = [x, s*u] @ [W, B]^T as ONE matmul, with gradients for x, s*u and B only (W is frozen).

    Folding LoRA's B product into the base matmul writes the output once instead of three times
    (base, delta, sum) and, in backward, gets dx and d(s*u) from one matmul over dy. Autograd on a
    concatenated weight would also compute the frozen W's gradient (+50 % matmul work), hence
    this Function.
    """
    import torch
    import torch.nn.functional as F

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, su, w, b):
            xin = torch.cat([x, su], dim=-1)
            wcat = torch.cat([w, b], dim=1)
            ctx.save_for_backward(xin, wcat)
            ctx.din = x.shape[-1]
            return F.linear(xin, wcat)

        @staticmethod
        def backward(ctx, dy):
            xin, wcat = ctx.saved_tensors
            dxin = dy @ wcat
            din = ctx.din
            db = dy.reshape(-1, dy.shape[-1]).t() @ xin[..., din:].reshape(-1, xin.shape[-1] - din)
            return dxin[..., :din], dxin[..., din:], None, db

    return _Fn


def make_layer(cfg: SimpleNamespace, attn_backends: Optional[list] = None, fuse: bool = True) -> Callable:
    """The decoder layer as a function of (hidden, cos, sin, tensors): one graph for every layer.

    ``fuse``: fold the LoRA B products into the base matmuls (see :func:`_fused_lora_linear`);
    False keeps them as separate matmuls added afterwards (RAWTUNE_FUSED_LORA=0, kept so the
    benchmark can measure what the fusion bought).
    """
    import torch
    import torch.nn.functional as F

    H, KV, hd, dt = cfg.heads, cfg.kv, cfg.hd, cfg.dtype
    fused = _fused_lora_linear()
    from .fp8 import function as fp8_function

    fp8 = fp8_function()
    outs = {"q_proj": H * hd, "k_proj": KV * hd, "v_proj": KV * hd, "o_proj": cfg.hidden,
            "gate_proj": cfg.inter, "up_proj": cfg.inter, "down_proj": cfg.hidden}

    def base(x, w, bias, sw):
        """The frozen projection: FP8 when the layer holds its weight in FP8 (``sw`` its scales)."""
        if sw is None:
            return F.linear(x, w, bias)
        y = fp8.apply(x, w, sw)
        return y + bias if bias is not None else y

    def proj(x, w, bias, tensors, names, slot):
        """Base projection(s) sharing input x plus their LoRA deltas (one A matmul for all)."""
        idx = [PROJ.index(n) for n in names]
        present = [i for i in idx if cfg.lora[i]]
        sw = tensors[24 + slot] if len(tensors) > 24 else None
        if not present:
            return base(x, w, bias, sw)
        a = torch.cat([tensors[7 + 2 * i].to(dt) for i in present]) if len(present) > 1 else tensors[7 + 2 * present[0]].to(dt)
        u = F.linear(x, a)
        parts = u.split([cfg.ranks[i] for i in present], dim=-1)
        if not fuse or sw is not None:  # (an FP8 weight cannot share a matmul with bf16 B)
            y = base(x, w, bias, sw)
            deltas = [F.linear(p * cfg.scales[i], tensors[8 + 2 * i].to(dt)) for i, p in zip(present, parts)]
            cols = [deltas[present.index(i)] if i in present else None for i in idx]
            chunks = list(y.split([outs[PROJ[i]] for i in idx], dim=-1))
            return torch.cat([c + d if d is not None else c for c, d in zip(chunks, cols)], dim=-1) if len(idx) > 1 \
                else chunks[0] + cols[0]
        su = torch.cat([p * cfg.scales[i] for i, p in zip(present, parts)], dim=-1) if len(present) > 1 \
            else parts[0] * cfg.scales[present[0]]
        blocks = [tensors[8 + 2 * i].to(dt) if cfg.lora[i] else x.new_zeros(outs[PROJ[i]], 0) for i in idx]
        b = torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0]
        y = fused.apply(x, su, w, b)
        return y + bias if bias is not None else y

    scale = getattr(cfg, "attn_scale", None)
    qk_norm = getattr(cfg, "qk_norm", False)
    res_mult = getattr(cfg, "res_mult", 1.0)

    def attention(q, k, v):
        if attn_backends:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(attn_backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=KV != H)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=KV != H)

    post_norm = getattr(cfg, "post_norm", False)

    def heads(x, n, norm):
        """[B, T, n*hd] -> [B, n, T, hd], with the family's q/k RMSNorm (whole projection or per head)."""
        if qk_norm == "full":
            x = _rms_out(x, norm, cfg.eps)
        x = x.view(x.shape[0], x.shape[1], n, hd)
        if qk_norm and qk_norm != "full":
            x = _rms(x, norm, cfg.eps)
        return x.transpose(1, 2)

    def residual(h, x, norm):
        """h + x, with the family's output norm (OLMo 2) and residual multiplier (Granite)."""
        if post_norm:
            x = _rms_out(x, norm, cfg.eps)
        return h + x * res_mult if res_mult != 1.0 else h + x

    def layer(h, cos, sin, tensors):
        ln1, w_qkv, b_qkv, w_o, ln2, w_gu, w_down = tensors[:7]
        B, T, _ = h.shape
        x = h if post_norm else _rms(h, ln1, cfg.eps)
        q, k, v = proj(x, w_qkv, b_qkv, tensors, PROJ[:3], 0).split([H * hd, KV * hd, KV * hd], dim=-1)
        # (RoPE before the head transpose was measured too: same tokens/s; docs/benchmarks.md.)
        q = _rotate(heads(q, H, tensors[21]), cos, sin)
        k = _rotate(heads(k, KV, tensors[22]), cos, sin)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        a = attention(q, k, v).transpose(1, 2).reshape(B, T, H * hd)
        h = residual(h, proj(a, w_o, None, tensors, PROJ[3:4], 1), ln2)
        x = h if post_norm else _rms(h, ln2, cfg.eps)
        g, u = proj(x, w_gu, None, tensors, PROJ[4:6], 2).split([cfg.inter, cfg.inter], dim=-1)
        return residual(h, proj(F.silu(g) * u, w_down, None, tensors, PROJ[6:], 3), tensors[23])

    return layer


# ---------------------------------------------------------------- chunked cross-entropy


def _ce_chunk(logits: Any, labels: Any, scale: Any) -> tuple:
    """Summed token loss of one chunk and d(loss*scale)/d(logits); fp32 maths, bf16 gradient."""
    import torch

    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = labels >= 0
    safe = torch.where(valid, labels, 0)
    picked = x.gather(-1, safe[:, None]).squeeze(-1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    p = torch.exp(x - lse[:, None])
    hot = torch.arange(x.shape[-1], device=x.device)[None, :] == safe[:, None]
    grad = (p - hot.float()) * (valid.float() * scale)[:, None]
    return loss, grad.to(logits.dtype)


class LinearCrossEntropy:
    """loss = sum of token losses / n_items, from hidden states and the lm_head weight, in chunks.

    The gradients for the hidden states and the weight are computed during the forward pass, one
    chunk of rows at a time, so only one chunk's logits ever exist.
    """

    @staticmethod
    def build(chunk_fn: Callable) -> Any:
        import torch

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h, weight, labels, n_items, rows, grads):
                w = weight.to(h.dtype)
                need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
                scale = (1.0 / n_items).to(torch.float32)
                total = torch.zeros((), device=h.device, dtype=torch.float32)
                dh = torch.empty_like(h) if need_h else None
                dw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if need_w else None
                for s in range(0, h.shape[0], rows):
                    hc = h[s:s + rows]
                    loss, g = chunk_fn(hc @ w.t(), labels[s:s + rows], scale)
                    total += loss
                    if need_h:
                        dh[s:s + rows] = g @ w
                    if need_w:
                        dw += (g.t() @ hc).float()
                ctx.save_for_backward(dh, dw)
                ctx.weight_dtype = weight.dtype
                return total * scale

            @staticmethod
            def backward(ctx, grad_out):
                dh, dw = ctx.saved_tensors
                gh = dh * grad_out.to(dh.dtype) if dh is not None else None
                gw = (dw * grad_out).to(ctx.weight_dtype) if dw is not None else None
                return gh, gw, None, None, None, None

        return _Fn


def _chunk_rows(n: int, seq: int, vocab: int) -> int:
    """Rows per cross-entropy chunk: about 4096 tokens of 49k logits (~400 MB bf16), dividing n."""
    target = max(1, (4096 * 49152) // max(vocab, 1))
    best = seq if n % seq == 0 else n
    for rows in range(seq, n + 1, seq):
        if n % rows == 0 and rows <= max(target, seq):
            best = rows
    return best


# ---------------------------------------------------------------- the model's loss


class FastModel:
    """Forward/backward of the flattened network; ``loss(ids, labels, n_items)`` returns sum/n_items."""

    def __init__(self, net: Net, compile: bool = True, attn: Optional[str] = None,
                 log: Callable[[str], None] = print, mode: Optional[str] = None):
        import torch

        self.net = net
        backends = _attn_backends(attn)
        layer = make_layer(net.cfg, backends, fuse=env.get("RAWTUNE_FUSED_LORA") != "0")
        self.compiled = compile
        # ``mode``: torch.compile's mode for the layer; the CUDA-graph modes need a new iteration
        # marked before each forward (:meth:`begin`)
        self.graphs = compile and mode in ("reduce-overhead", "max-autotune")
        if compile:
            layer = torch.compile(layer, dynamic=False, mode=mode)
            chunk = torch.compile(_ce_chunk, dynamic=False)
        else:
            chunk = _ce_chunk
        self.layer = layer
        self.ce = LinearCrossEntropy.build(chunk)
        self._rope: dict = {}

    def rope(self, T: int, device: Any) -> tuple:
        """cos/sin as the model's rotary module makes them (fp32 maths, then the compute dtype)."""
        import torch

        if T not in self._rope:
            inv_freq = self.net.rotary.inv_freq.to(device, torch.float32)
            scaling = float(getattr(self.net.rotary, "attention_scaling", 1.0) or 1.0)
            freqs = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            dt = self.net.cfg.dtype
            self._rope[T] = ((emb.cos() * scaling).to(dt), (emb.sin() * scaling).to(dt))
        return self._rope[T]

    def begin(self) -> None:
        """Before each forward: with CUDA graphs, the graphs' outputs of the last one may now be overwritten."""
        if self.graphs:
            import torch

            torch.compiler.cudagraph_mark_step_begin()

    def loss(self, ids: Any, labels: Any, n_items: Any) -> Any:
        import torch
        import torch.nn.functional as F

        net = self.net
        B, T = ids.shape
        cos, sin = self.rope(T, ids.device)
        plain = (torch.ones_like(cos), torch.zeros_like(sin))  # x*1 + rot*0 == x: a layer without RoPE
        c = net.cfg
        h = F.embedding(ids, net.embed).to(c.dtype)
        if getattr(c, "emb_mult", 1.0) != 1.0:
            h = h * c.emb_mult
        rope_layers = getattr(c, "rope_layers", None) or (True,) * len(net.layers)
        for tensors, rope in zip(net.layers, rope_layers):
            h = self.layer(h, *((cos, sin) if rope else plain), tensors)
        h = _rms(h, net.norm, c.eps).reshape(B * T, -1)
        if getattr(c, "logit_scale", 1.0) != 1.0:
            h = h / c.logit_scale  # (h / s) @ W^T is the model's logits / logits_scaling
        rows = _chunk_rows(B * T, T, net.cfg.vocab)
        return self.ce.apply(h, net.head, labels.reshape(-1), n_items, rows, torch.is_grad_enabled())


def _attn_backends(name: Optional[str]) -> Optional[list]:
    """RAWTUNE_SDPA=cudnn|flash|efficient pins the attention kernel (default: PyTorch's choice)."""
    name = name or env.get("RAWTUNE_SDPA")
    if not name:
        return None
    from torch.nn.attention import SDPBackend

    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [table[name]]


def shifted_labels(ids: Any, real_rows: int) -> Any:
    """Causal-LM labels: next token at each position, -100 at each block's end and on padding rows."""
    import torch

    labels = torch.full_like(ids, -100)
    labels[:real_rows, :-1] = ids[:real_rows, 1:]
    return labels
