"""
Upcycling from a local facebookresearch/dinov2 checkpoint: the paper's starting point. Every MoE expert
of a block becomes a copy of that block's dense DINOv2 FFN, so with renormalised top-k gates the
upcycled model computes exactly what the dense ViT did, whatever the router decides (tested).

    report = upcycle_from_dinov2(Segmenter(cfg), torch.load("dinov2_vits14_pretrain.pth", weights_only=True))
    print(report)        # loaded / adapted / missing / unexpected keys, and what is fresh by design

DINOv2 key names (hub checkpoints dinov2_vit{s,b,l}14[_reg4]_pretrain.pth):
  cls_token (1,1,D), pos_embed (1,1+37*37,D), mask_token (1,D), register_tokens (1,R,D),
  patch_embed.proj.{weight (D,3,14,14), bias}, norm.{weight,bias},
  blocks.i.{norm1,norm2}.{weight,bias}, blocks.i.attn.{qkv,proj}.{weight,bias}, blocks.i.ls{1,2}.gamma,
  blocks.i.mlp.fc1.{weight (Dh,D), bias}, blocks.i.mlp.fc2.{weight (D,Dh), bias}
Training checkpoints may use block chunks (blocks.c.i.*), a "backbone." or "module." prefix, or nest the
weights under "model", "teacher", "state_dict": all are accepted.
"""

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanosar.model import Segmenter, resize_pos_embed


@dataclass
class UpcycleReport:
    loaded: list = field(default_factory=list)      # our parameter names filled from the checkpoint
    adapted: list = field(default_factory=list)     # loaded after a change: "name: what was done"
    missing: list = field(default_factory=list)     # our backbone tensors the checkpoint did not have
    unexpected: list = field(default_factory=list)  # checkpoint keys nanosar did not use
    fresh: list = field(default_factory=list)       # new in nanosar by design: routers, segmentation head

    def __str__(self):
        lines = [f"loaded {len(self.loaded)} tensors from DINOv2"]
        for name in ("adapted", "missing", "unexpected"):
            items = getattr(self, name)
            lines.append(f"{name} ({len(items)}): " + (", ".join(items) if items else "none"))
        lines.append(f"initialised fresh by design: {len(self.fresh)} tensors (routers, head)")
        return "\n".join(lines)


def _clean_dinov2_keys(state_dict):
    for key in ("teacher", "model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    cleaned = {}
    for k, v in state_dict.items():
        k = re.sub(r"^(module\.|backbone\.)+", "", k)
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block chunks: blocks.c.i -> blocks.i
        cleaned[k] = v
    return cleaned


def adapt_patch_embed(weight, in_chans, patch_size):
    """(D, 3, p0, p0) RGB patch kernel -> (D, in_chans, p, p) SAR kernel.

    Channels: the paper feeds single-band SAR replicated to 3 channels, and conv(rep(x), w) = conv(x, sum_c w_c),
    so every SAR channel gets sum_c w_c / in_chans: an input whose channels are all equal to x gives exactly
    the response of the RGB model to x replicated. Patch size: bicubic resize, scaled by (p0/p)^2 so the
    response to a smooth input is kept (approximate; FlexiViT's pseudo-inverse resize is exact for that).
    """
    w = weight.sum(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) / in_chans  # (D, C, p0, p0)
    p0 = w.shape[-1]
    if p0 != patch_size:
        w = F.interpolate(w.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False)
        w = w * (p0 * p0) / (patch_size * patch_size)
    return w


# How DINOv2 interpolates the position grid of each kind of checkpoint (its hub constructors): the original
# ones with interpolate_offset=0.1 and no antialiasing, the "with registers" ones with offset 0 and antialias.
POS_EMBED_INTERPOLATION = {"original": dict(offset=0.1, antialias=False), "registers": dict(offset=0.0, antialias=True)}


@torch.no_grad()
def upcycle_from_dinov2(model, state_dict, allow_register_mismatch=False):
    """Fill model.backbone (a Segmenter's SARViT) from a DINOv2 state dict; every expert = a copy of the FFN.

    Attention, norms, LayerScale, tokens and positions are copied; the patch embedding is adapted to the SAR
    channels and patch size; the position grid is interpolated to the model's grid as DINOv2 itself does for
    that kind of checkpoint (POS_EMBED_INTERPOLATION). A checkpoint whose register tokens differ in number
    from the model's is an error naming both, unless allow_register_mismatch (then the checkpoint's registers
    are left unused, or the model's stay fresh, and the report says so). Returns an UpcycleReport listing
    loaded, adapted, missing and unexpected keys; routers and the head stay freshly initialised.
    """
    vit = model.backbone if isinstance(model, Segmenter) else model
    cfg = vit.cfg
    src = _clean_dinov2_keys(state_dict)
    registers = src["register_tokens"].shape[1] if "register_tokens" in src else 0
    if registers != cfg.num_register_tokens and not allow_register_mismatch:
        raise ValueError(f"the DINOv2 checkpoint has {registers} register tokens and the model "
                         f"num_register_tokens={cfg.num_register_tokens}: set num_register_tokens={registers} (or "
                         f"pass allow_register_mismatch=True to leave them out)")
    kind = "registers" if registers else "original"
    used, report = set(), UpcycleReport()
    ours = dict(vit.named_parameters())

    def take(key):
        used.add(key)
        return src[key]

    for name, param in ours.items():
        if ".mlp.router." in name:
            report.fresh.append(name)
            continue
        moe = re.match(r"blocks\.(\d+)\.mlp\.(w1|b1|w2|b2)$", name)
        if moe:  # expert tensors come from the dense fc1/fc2, copied into all E experts
            i, part = moe.groups()
            fc = "fc1" if part in ("w1", "b1") else "fc2"
            kind = "weight" if part in ("w1", "w2") else "bias"
            key = f"blocks.{i}.mlp.{fc}.{kind}"
            if key not in src:
                report.missing.append(key)
                continue
            value = take(key)
            value = value.t() if kind == "weight" else value                # Linear (out, in) -> (in, out)
            param.copy_(value.unsqueeze(0).expand_as(param))
            report.loaded.append(name)
            continue
        if name not in src or (name == "register_tokens" and registers != cfg.num_register_tokens):
            report.missing.append(name)                       # (a register mismatch the caller allowed)
            continue
        value = take(name)
        if name == "patch_embed.proj.weight" and value.shape != param.shape:
            value = adapt_patch_embed(value, cfg.in_chans, cfg.patch_size)
            report.adapted.append(f"{name}: {tuple(src[name].shape)} -> {tuple(value.shape)} (RGB sum / C, resize)")
        elif name == "pos_embed" and value.shape != param.shape:
            g = int(math.sqrt(param.shape[1] - 1))
            value = resize_pos_embed(value, g, g, **POS_EMBED_INTERPOLATION[kind])
            how = ", ".join(f"{k}={v}" for k, v in POS_EMBED_INTERPOLATION[kind].items())
            report.adapted.append(f"{name}: {tuple(src[name].shape)} -> {tuple(value.shape)} (bicubic as DINOv2 "
                                  f"{kind}: {how})")
        if value.shape != param.shape:
            raise ValueError(f"DINOv2 key {name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}; "
                             f"is the preset (embed_dim={cfg.embed_dim}, depth={cfg.depth}) the checkpoint's size?")
        param.copy_(value)
        report.loaded.append(name)
    report.unexpected = sorted(k for k in src if k not in used)
    if isinstance(model, Segmenter):
        report.fresh += [f"head.{n}" for n, _ in model.head.named_parameters()]
    return report
