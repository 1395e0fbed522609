"""CLIP image and text towers, state-dict compatible with OpenAI's released checkpoints.

Differences from OpenAI's module layout (the state-dict keys are the same):
- transformers run batch-first, (N, L, D), and attention calls F.scaled_dot_product_attention
  (flash / memory-efficient kernels on CUDA); the text tower uses is_causal instead of a mask;
- input sizes other than the pre-training size, overlapping ViT patches and a stride-1 last ResNet
  stage are supported (positional embeddings are resized as 2-D grids by build_model, bilinear by
  default as CLIP-ReID and CLIP-HandID do);
- `visual.forward_features(x)` returns intermediate features for fine-tuning;
- weights stay fp32; run under torch.autocast for bf16/fp16.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# Hyper-parameters of the nine released models (what build_model infers from the released files).
MODEL_CONFIGS = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, transformer_width=512, transformer_heads=8),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64,
                  vision_patch_size=None, transformer_width=512, transformer_heads=8),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
                   vision_patch_size=None, transformer_width=640, transformer_heads=10),
    "RN50x16": dict(embed_dim=768, image_resolution=384, vision_layers=(6, 8, 18, 8), vision_width=96,
                    vision_patch_size=None, transformer_width=768, transformer_heads=12),
    "RN50x64": dict(embed_dim=1024, image_resolution=448, vision_layers=(3, 15, 36, 10), vision_width=128,
                    vision_patch_size=None, transformer_width=1024, transformer_heads=16),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, transformer_width=512, transformer_heads=8),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, transformer_width=512, transformer_heads=8),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, transformer_width=768, transformer_heads=12),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                           vision_patch_size=14, transformer_width=768, transformer_heads=12),
}
for _config in MODEL_CONFIGS.values():
    _config.update(context_length=77, vocab_size=49408, transformer_layers=12)

# Non-parameter entries: the first three are in the released archives; the strides are written by
# CLIP.checkpoint_state_dict for models built with non-default strides.
METADATA_KEYS = ("input_resolution", "context_length", "vocab_size", "patch_stride", "last_stride")


def _pair(size):
    if isinstance(size, int):
        return (size, size)
    height, width = (int(s) for s in size)
    return (height, width)


def _resolution_attr(size):
    """OpenAI code expects an int `input_resolution`; keep an int when the input is square."""
    return size[0] if size[0] == size[1] else size


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (safe for half inputs)."""

    def forward(self, x):
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """The GELU approximation CLIP was trained with; keep it for pretrained weights."""

    def forward(self, x):
        # x * sigmoid(1.702 x), written through SiLU for a cheaper backward
        return F.silu(1.702 * x) * (1 / 1.702)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, batch-first."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        # Explanation maps need the attention probabilities and their gradients: with keep_attention
        # the forward computes them explicitly and keeps them (N, heads, L, L) in self.attention_probs,
        # with retain_grad() when they require grad. Off by default (the fused kernel is faster).
        self.keep_attention = False
        self.attention_probs = None

    def forward(self, x, causal=False):
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.keep_attention:
            out = self.attention_with_probs(q, k, v, causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))

    def attention_with_probs(self, q, k, v, causal):
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = scores.softmax(dim=-1)
        if probs.requires_grad:
            probs.retain_grad()
        self.attention_probs = probs
        return probs @ v


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.causal = causal
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN residual attention blocks on (N, L, width) tensors (batch first)."""

    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class ModelBuildError(ValueError):
    """A state dict that is not an OpenAI-layout CLIP, or an input geometry (size, patch stride, last
    stride) its architecture cannot take; the message says which."""


def vit_grid_size(input_size, patch_size, patch_stride=None, exact=True):
    """Number of patch rows and columns: (H - patch) // stride + 1 per side. exact: refuse a side that
    side-by-side patches (stride = patch) do not cover whole, whose last pixels the model would never
    see. Overlapping patches (stride < patch) keep CLIP-ReID's convention, which drops the remainder
    (under one stride: 256 x 128 at stride 12 leaves 4 columns), so its geometry stays reproducible."""
    stride = patch_size if patch_stride is None else patch_stride
    height, width = _pair(input_size)
    if height < patch_size or width < patch_size:
        raise ModelBuildError(f"input size {(height, width)} is smaller than the patch size {patch_size}")
    if exact and stride >= patch_size and ((height - patch_size) % stride or (width - patch_size) % stride):
        nearest = [f"{name} {low} or {low + stride}" for name, n in (("height", height), ("width", width))
                   for low in [patch_size + (n - patch_size) // stride * stride] if low != n]
        raise ModelBuildError(f"--input_size {height} {width} leaves pixels outside the patch grid (patch {patch_size}, "
                              f"stride {stride}: each side must be {patch_size} + a multiple of {stride}); nearest "
                              f"valid: {', '.join(nearest)}")
    return ((height - patch_size) // stride + 1, (width - patch_size) // stride + 1)


def resnet_grid_size(input_size, last_stride=2):
    """Side lengths of the ModifiedResNet layer4 map; (H // 32, W // 32) for multiples of 32."""
    def side(n):
        n = (n - 1) // 2 + 1  # stem conv: 3x3, stride 2, padding 1
        n = n // 2 // 2 // 2  # stem average pool, layer2, layer3
        return n // last_stride
    height, width = _pair(input_size)
    grid = (side(height), side(width))
    if min(grid) < 1:
        raise ModelBuildError(f"input size {(height, width)} is too small for a ResNet (need at least 32 pixels a side)")
    return grid


# How build_model may resize a positional embedding; bilinear is what CLIP-ReID and CLIP-HandID use.
POS_INTERPOLATIONS = ("bilinear", "bicubic")


def resize_pos_embed(pos_embed, new_grid, old_grid=None, mode="bilinear"):
    """Resize a (1 + h0*w0, D) positional embedding to (1 + h*w, D) as a 2-D grid.

    The first row (class token / mean token) is kept; the h0 x w0 grid (default: square) is
    interpolated to h x w with F.interpolate(mode, align_corners=False), as the references do.
    The same grid comes back unchanged.
    """
    if mode not in POS_INTERPOLATIONS:
        raise ValueError(f"positional-embedding interpolation must be one of {POS_INTERPOLATIONS}, got {mode!r}")
    rows = pos_embed.shape[0] - 1
    if old_grid is None:
        side = math.isqrt(rows)
        old_grid = (side, side)
    old_grid, new_grid = _pair(old_grid), _pair(new_grid)
    if old_grid[0] * old_grid[1] != rows:
        raise ValueError(f"positional embedding with {rows + 1} rows is not 1 + a {old_grid[0]}x{old_grid[1]} grid")
    if new_grid == old_grid:
        return pos_embed.clone()
    first, grid = pos_embed[:1], pos_embed[1:]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([first, grid], dim=0)


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided blocks downsample with an average pool after conv2."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != outplanes:
            # the pool has no parameters; keeping it outside `downsample` gives the keys downsample.0/.1
            self.downsample_pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, bias=False),
                                            nn.BatchNorm2d(outplanes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(self.downsample_pool(x))
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling where the mean token is the only query over [mean, spatial] tokens."""

    def __init__(self, grid_size, embed_dim, num_heads, output_dim=None):
        super().__init__()
        grid_size = _pair(grid_size)
        self.grid_size = grid_size
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(
            torch.randn(grid_size[0] * grid_size[1] + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)

    @staticmethod
    def to_tokens(feature_map):
        """(N, C, H, W) -> (N, 1 + H*W, C): the spatial mean first, then the positions row by row."""
        tokens = feature_map.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def pool_tokens(self, tokens):
        batch, length, channels = tokens.shape
        if length != self.positional_embedding.shape[0]:
            raise ValueError(f"attention pool built for a {self.grid_size} grid ({self.positional_embedding.shape[0]}"
                             f" tokens) got {length} tokens; rebuild the model with the right input_size")
        x = tokens + self.positional_embedding.to(tokens.dtype)
        head_dim = channels // self.num_heads
        q = self.q_proj(x[:, :1]).view(batch, 1, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.reshape(batch, channels))

    def forward(self, feature_map):
        return self.pool_tokens(self.to_tokens(feature_map))


def _check_input_size(x, input_size):
    if tuple(x.shape[-2:]) != tuple(input_size):
        raise ValueError(f"the image encoder was built for input size (H, W) = {tuple(input_size)} but got images "
                         f"of size {tuple(x.shape[-2:])}; resize the images or rebuild the model with "
                         f"input_size={tuple(x.shape[-2:])}")


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, anti-aliased strided blocks and attention pooling (CLIP's RN*)."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64, input_size=None, last_stride=2):
        super().__init__()
        if last_stride not in (1, 2):
            raise ModelBuildError(f"last_stride must be 1 or 2, got {last_stride}")
        self.input_size = _pair(input_size if input_size is not None else input_resolution)
        self.input_resolution = _resolution_attr(self.input_size)
        self.output_dim = output_dim
        self.last_stride = last_stride
        self.grid_size = resnet_grid_size(self.input_size, last_stride)

        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=last_stride)

        embed_dim = width * 32  # layer4 channels
        self.attnpool = AttentionPool2d(self.grid_size, embed_dim, heads, output_dim)
        self.feature_dims = {"layer3": width * 16, "pre_proj": embed_dim, "proj": output_dim}

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x):
        _check_input_size(x, self.input_size)
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.attnpool(x)

    def forward_features(self, x):
        """{"layer3": GAP of layer3, "pre_proj": GAP of layer4, "proj": attention-pool output
        (== forward), "tokens": (N, 1 + h*w, C4) [mean token, spatial tokens] of layer4}."""
        x3 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        tokens = AttentionPool2d.to_tokens(self.layer4(x3))
        return {"layer3": x3.mean(dim=(2, 3)), "pre_proj": tokens[:, 0], "proj": self.attnpool.pool_tokens(tokens),
                "tokens": tokens}


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, input_size=None,
                 patch_stride=None):
        super().__init__()
        self.input_size = _pair(input_size if input_size is not None else input_resolution)
        self.input_resolution = _resolution_attr(self.input_size)
        self.output_dim = output_dim
        self.patch_size = patch_size
        self.patch_stride = patch_size if patch_stride is None else patch_stride
        if not 1 <= self.patch_stride <= patch_size:
            raise ModelBuildError(f"patch_stride must be between 1 and the patch size {patch_size}, got {patch_stride}")
        self.grid_size = vit_grid_size(self.input_size, patch_size, self.patch_stride)

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=self.patch_stride, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.feature_dims = {"penultimate": width, "pre_proj": width, "proj": output_dim}

    def embed(self, x):
        """Images -> (N, 1 + h*w, width) tokens after positional embedding and ln_pre."""
        _check_input_size(x, self.input_size)
        x = self.conv1(x.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, x):
        x = self.transformer(self.embed(x))
        return self.ln_post(x[:, 0]) @ self.proj

    def forward_features(self, x):
        """{"penultimate": CLS after the second-to-last block, "pre_proj": CLS after ln_post,
        "proj": projected CLS (== forward), "tokens": all tokens after ln_post, CLS first}."""
        blocks = self.transformer.resblocks
        x = self.embed(x)
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x[:, 0]
        tokens = self.ln_post(blocks[-1](x))
        pre_proj = tokens[:, 0]
        return {"penultimate": penultimate, "pre_proj": pre_proj, "proj": pre_proj @ self.proj, "tokens": tokens}


# Size of clip.simple_tokenizer's vocabulary: 256 bytes, 256 bytes + </w>, 48,894 merges, SOT and EOT.
TOKENIZER_VOCAB_SIZE = 49408


class TokenizerMismatchError(ValueError):
    """Token ids that the checkpoint's text tower cannot embed (vocabulary or context length)."""


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers,
                 input_size=None, patch_stride=None, last_stride=2):
        super().__init__()
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.vocab_size = vocab_size

        if isinstance(vision_layers, (tuple, list)):
            if patch_stride is not None:
                raise ModelBuildError("patch_stride applies to ViT models only, not to ResNets")
            self.visual = ModifiedResNet(layers=vision_layers, output_dim=embed_dim, heads=vision_width * 32 // 64,
                                         input_resolution=image_resolution, width=vision_width,
                                         input_size=input_size, last_stride=last_stride)
        else:
            if last_stride != 2:
                raise ModelBuildError("last_stride applies to ResNet models only; use patch_stride for ViTs")
            self.visual = VisionTransformer(input_resolution=image_resolution, patch_size=vision_patch_size,
                                            width=vision_width, layers=vision_layers,
                                            heads=max(1, vision_width // 64), output_dim=embed_dim,
                                            input_size=input_size, patch_stride=patch_stride)

        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self):
        """CLIP's initialisation (the ViT blocks keep PyTorch's defaults, as in CLIP)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
            for module in self.visual.modules():
                if isinstance(module, nn.Conv2d):  # keeps activations at unit scale through the random stem
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.zeros_(linear.bias)
            for name, param in self.visual.named_parameters():
                # residual branches start as identity; the stem's own bn3 must stay non-zero
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(param)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def checkpoint_state_dict(self):
        """state_dict plus the entries build_model / clip.load need to rebuild this exact model.

        Adds input_resolution (an int, or [H, W] when not square), context_length and vocab_size like
        the released files, and patch_stride / last_stride when they differ from the defaults.
        """
        state_dict = self.state_dict()
        height, width = self.visual.input_size
        state_dict["input_resolution"] = torch.tensor(height if height == width else [height, width])
        state_dict["context_length"] = torch.tensor(self.context_length)
        state_dict["vocab_size"] = torch.tensor(self.vocab_size)
        if isinstance(self.visual, VisionTransformer) and self.visual.patch_stride != self.visual.patch_size:
            state_dict["patch_stride"] = torch.tensor(self.visual.patch_stride)
        if isinstance(self.visual, ModifiedResNet) and self.visual.last_stride != 2:
            state_dict["last_stride"] = torch.tensor(self.visual.last_stride)
        return state_dict

    def encode_image(self, image):
        return self.visual(image)

    def encode_text_embeddings(self, embeds, eot_index):
        """Text features from token embeddings (N, L, width), taken before the positional embedding.

        Only the first max(eot_index) + 1 positions go through the causal transformer: later
        positions cannot influence earlier ones, so the result equals the full-length tower.
        Returns the projected feature at eot_index, (N, embed_dim).
        """
        eot_index = torch.as_tensor(eot_index, device=embeds.device).long()
        length = int(eot_index.max()) + 1
        if length > self.context_length or length > embeds.shape[1]:
            raise ValueError(f"eot_index {length - 1} is out of range for {embeds.shape[1]} embeddings and "
                             f"context length {self.context_length}")
        x = embeds[:, :length] + self.positional_embedding[:length].to(embeds.dtype)
        x = self.transformer(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return self.ln_final(x) @ self.text_projection

    def check_tokens(self, text):
        """Raise TokenizerMismatchError when token ids (N, L) do not fit this text tower: an id
        outside its vocabulary or an end token beyond its context length (both sizes named)."""
        largest, eot_index = int(text.max()), int(text.argmax(dim=-1).max())
        if largest >= self.vocab_size:
            raise TokenizerMismatchError(
                f"token id {largest} is outside the checkpoint's vocabulary of {self.vocab_size} tokens (CLIP's "
                f"tokenizer has {TOKENIZER_VOCAB_SIZE}); use a checkpoint made for CLIP's tokenizer")
        if eot_index >= self.context_length:
            raise TokenizerMismatchError(
                f"the text needs {eot_index + 1} token positions but the checkpoint's context length is "
                f"{self.context_length}; shorten the text")

    def encode_text(self, text):
        """Token ids (N, L) from clip.tokenize -> (N, embed_dim); pooled at the EOT id (the largest)."""
        self.check_tokens(text)
        eot_index = text.argmax(dim=-1)
        length = int(eot_index.max()) + 1
        return self.encode_text_embeddings(self.token_embedding(text[:, :length]), eot_index)

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def infer_config(state_dict):
    """CLIP constructor arguments from an OpenAI-layout state dict, as OpenAI's build_model infers them.

    image_resolution is the input size the checkpoint's positional embedding was made for: the
    `input_resolution` entry when the dict carries one (an int, or [H, W] for checkpoints written by
    CLIP.checkpoint_state_dict), else patch (ViT) or 32 (ResNet) times the side of the square grid.
    """
    def count(prefix, suffix=""):
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix) and k.endswith(suffix)})

    try:
        if "visual.proj" in state_dict:
            conv = state_dict["visual.conv1.weight"]
            config = dict(vision_width=conv.shape[0], vision_patch_size=conv.shape[-1],
                          vision_layers=count("visual.transformer.resblocks.", ".attn.in_proj_weight"))
        else:
            config = dict(vision_layers=tuple(count(f"visual.layer{b}.") for b in (1, 2, 3, 4)),
                          vision_width=state_dict["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None)
        width = state_dict["ln_final.weight"].shape[0]
        config.update(embed_dim=state_dict["text_projection"].shape[1],
                      context_length=state_dict["positional_embedding"].shape[0],
                      vocab_size=state_dict["token_embedding.weight"].shape[0],
                      transformer_width=width, transformer_heads=max(1, width // 64),
                      transformer_layers=count("transformer.resblocks."))
    except KeyError as err:
        raise ModelBuildError(f"not an OpenAI-layout CLIP state dict: missing key {err}") from None
    config["image_resolution"] = checkpoint_layout(state_dict)["input_size"]
    if config["image_resolution"][0] == config["image_resolution"][1]:
        config["image_resolution"] = config["image_resolution"][0]
    return config


def checkpoint_layout(state_dict):
    """Input size, strides and token grid that the checkpoint's visual positional embedding belongs to."""
    is_vit = "visual.proj" in state_dict
    pos_key = "visual.positional_embedding" if is_vit else "visual.attnpool.positional_embedding"
    rows = state_dict[pos_key].shape[0] - 1
    patch = state_dict["visual.conv1.weight"].shape[-1] if is_vit else None
    patch_stride = int(state_dict["patch_stride"]) if "patch_stride" in state_dict else patch
    last_stride = int(state_dict["last_stride"]) if "last_stride" in state_dict else 2
    layout = dict(patch_stride=patch_stride if is_vit else None, last_stride=last_stride)
    if "input_resolution" in state_dict:
        size = torch.as_tensor(state_dict["input_resolution"])
        size = _pair(size.tolist() if size.dim() else int(size))
        grid = vit_grid_size(size, patch, patch_stride, exact=False) if is_vit else resnet_grid_size(size, last_stride)
        if grid[0] * grid[1] == rows:
            return dict(layout, input_size=size, grid=grid)
    side = math.isqrt(rows)
    if side * side != rows:
        raise ModelBuildError(f"{pos_key} has {rows + 1} rows, which is not 1 + a square grid, and the state dict has "
                         f"no matching input_resolution entry")
    if is_vit and patch_stride != patch:
        raise ModelBuildError("a patch_stride entry needs a matching input_resolution entry")
    size = (patch * side, patch * side) if is_vit else (32 // (2 // last_stride) * side,) * 2
    return dict(layout, input_size=size, grid=(side, side))


def checkpoint_geometry(state_dict):
    """What an OpenAI-layout state dict fixes about the backbone, read from its tensors and entries.

    kind ("vit" or "resnet"), patch_size (ViT; None for ResNets), patch_stride, last_stride,
    input_size (H, W) and grid (rows, cols) of its visual positional embedding, vision_width,
    vision_heads (width // 64 for ViTs, width * 32 // 64 for ResNets, as OpenAI's build_model),
    embed_dim, vocab_size and context_length of the text tower.
    """
    config = infer_config(state_dict)
    layout = checkpoint_layout(state_dict)
    is_vit = config["vision_patch_size"] is not None
    width = config["vision_width"]
    return dict(kind="vit" if is_vit else "resnet", patch_size=config["vision_patch_size"],
                patch_stride=layout["patch_stride"], last_stride=None if is_vit else layout["last_stride"],
                input_size=tuple(layout["input_size"]), grid=tuple(layout["grid"]), vision_width=width,
                vision_heads=max(1, width // 64) if is_vit else width * 32 // 64, embed_dim=config["embed_dim"],
                vocab_size=config["vocab_size"], context_length=config["context_length"])


def build_model(state_dict, input_size=None, patch_stride=None, last_stride=None, interpolation="bilinear"):
    """Build an fp32 CLIP in eval mode from an OpenAI-layout state dict (fp16 or fp32).

    input_size: int or (H, W). patch_stride (ViT): smaller than the patch size gives overlapping
    patches. last_stride (ResNet): 1 keeps layer4 at 1/16 of the input. Each defaults to what the
    checkpoint was made for (its input_resolution / patch_stride / last_stride entries), i.e. the
    pre-training resolution, stride = patch size and last_stride 2 for the released files.
    When the token grid differs from the checkpoint's, the visual positional embedding is resized as
    a 2-D grid (interpolation "bilinear", as CLIP-ReID and CLIP-HandID, or "bicubic"; the class /
    mean-token row is kept).
    The caller's dict is not modified.
    """
    config = infer_config(state_dict)
    layout = checkpoint_layout(state_dict)
    is_vit = config["vision_patch_size"] is not None
    if is_vit and patch_stride is None:
        patch_stride = layout["patch_stride"]
    if not is_vit and last_stride is None:
        last_stride = layout["last_stride"]
    # fresh fp32 copies: the model never shares storage with the caller's tensors, and the resized
    # positional embedding is not rounded back to the checkpoint's fp16
    weights = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
               for k, v in state_dict.items() if k not in METADATA_KEYS}
    with torch.device("meta"):
        model = CLIP(**config, input_size=input_size, patch_stride=patch_stride, last_stride=last_stride or 2)
    pos_key = "visual.positional_embedding" if is_vit else "visual.attnpool.positional_embedding"
    weights[pos_key] = resize_pos_embed(weights[pos_key], model.visual.grid_size, old_grid=layout["grid"],
                                        mode=interpolation)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def random_state_dict(arch, seed=0):
    """OpenAI-layout fp32 state dict with CLIP-style random weights.

    arch: an official name (see MODEL_CONFIGS) or a dict of CLIP constructor arguments (embed_dim,
    image_resolution, vision_layers, vision_width, vision_patch_size, context_length, vocab_size,
    transformer_width, transformer_heads, transformer_layers). The dict also holds the
    input_resolution / context_length / vocab_size entries of the released files.
    """
    if isinstance(arch, str):
        if arch not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {arch!r}; official names: {list(MODEL_CONFIGS)}")
        config = dict(MODEL_CONFIGS[arch])
    else:
        config = dict(arch)
    if isinstance(config.get("vision_layers"), list):
        config["vision_layers"] = tuple(config["vision_layers"])
    heads = config.get("transformer_heads")
    if heads is not None and heads != max(1, config["transformer_width"] // 64):
        raise ValueError(f"transformer_heads must be transformer_width // 64 (as OpenAI's build_model infers it), "
                         f"got {heads} for width {config['transformer_width']}")
    config["transformer_heads"] = max(1, config["transformer_width"] // 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**config)
    state_dict = model.state_dict()
    state_dict["input_resolution"] = torch.tensor(config["image_resolution"])
    state_dict["context_length"] = torch.tensor(config["context_length"])
    state_dict["vocab_size"] = torch.tensor(config["vocab_size"])
    return state_dict
