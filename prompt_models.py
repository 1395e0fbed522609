"""The text-side and fusion modules of the two prompt methods; the models that use them
(models.ClipReIDModel's trainer, models.PromptSGModel) are in models.py.

CLIP-ReID (Li et al., AAAI 2023): per-identity learnable tokens spliced into a prompt template
(PromptLearner) and fed through the frozen text tower (PromptTextEncoder); stage 1 learns them, and
their text features then guide the fine-tuning of the image encoder (stage 2).

PromptSG (Yang et al., CVPR 2024): an inversion network turns each image's global CLIP feature into
a pseudo-word S*, the frozen text tower encodes "A photo of a S* hand.", and that text feature is
the query of a cross-attention over the image's global + patch tokens (then 2 transformer blocks).
Unlike the CLIP-FH thesis code, the pseudo-token sits inside the token sequence and the attention
has many keys, so the text really steers the visual feature (tests/test_promptsg.py checks this).
"""
import math

import torch
import torch.nn as nn

import clip
from clip.model import LayerNorm, ResidualAttentionBlock
from utils.errors import TrainingInputError


# ---- CLIP-ReID ----

DEFAULT_PROMPT_TEMPLATE = "A photo of a X X X X hand."
PLACEHOLDER_WORD = "X"


def parse_prompt_template(template, context_length=77):
    """Tokenize a prompt template. Returns (tokens (context_length,) LongTensor, positions of the
    placeholder tokens, index of the end token). Each standalone X becomes one learnable token."""
    try:
        tokens = clip.tokenize(template, context_length=context_length)[0]
    except RuntimeError:
        raise TrainingInputError(f"--prompt_template {template!r} is longer than the text tower's "
                                 f"{context_length} tokens; shorten it") from None
    placeholder_id = int(clip.tokenize(PLACEHOLDER_WORD)[0, 1])
    positions = (tokens == placeholder_id).nonzero().flatten().tolist()
    if not positions:
        raise TrainingInputError(f"--prompt_template {template!r} has no placeholder: write one standalone "
                                 f"{PLACEHOLDER_WORD} per learnable token, e.g. {DEFAULT_PROMPT_TEMPLATE!r}")
    return tokens, positions, int(tokens.argmax())


class PromptLearner(nn.Module):
    """Learnable per-identity tokens in place of the template's placeholders.

    forward(labels) returns token embeddings (B, eot_index + 1, width), before the positional
    embedding: the frozen embedding of the template with cls_ctx[label] at the placeholder
    positions. Positions after the end token are not kept: the causal text tower never lets them
    influence the end token. full_length=True keeps all context_length positions (the reference
    layout, only for timing comparisons)."""

    def __init__(self, num_classes, template, token_embedding, context_length=77, full_length=False):
        super().__init__()
        tokens, positions, eot_index = parse_prompt_template(template, context_length)
        length = context_length if full_length else eot_index + 1
        with torch.no_grad():
            embeds = token_embedding(tokens[None, :length].to(token_embedding.weight.device)).float()
        self.template = template
        self.eot_index = eot_index
        self.register_buffer("template_embeds", embeds)
        self.register_buffer("ctx_positions", torch.tensor(positions, dtype=torch.long))
        self.cls_ctx = nn.Parameter(torch.randn(num_classes, len(positions), embeds.shape[-1]) * 0.02)

    @property
    def num_classes(self):
        return self.cls_ctx.shape[0]

    def forward(self, labels):
        embeds = self.template_embeds.expand(len(labels), -1, -1).clone()
        embeds[:, self.ctx_positions] = self.cls_ctx[labels].to(embeds.dtype)
        return embeds


def check_text_tower(clip_model):
    """TrainingInputError (both sizes named) unless the text tower embeds clip.tokenize's ids."""
    try:
        clip.check_tokenizer(clip_model, clip_model.context_length)
    except clip.TokenizerMismatchError as err:
        raise TrainingInputError(f"--backbone_name: {err}") from None


def freeze(module):
    for param in module.parameters():
        param.requires_grad_(False)
    return module


class PromptTextEncoder(nn.Module):
    """The frozen CLIP text tower fed with learnable identity prompts: forward(labels) -> (B, embed)
    text features (end-token pooling + text_projection, no normalisation, as in CLIP-ReID).

    Gradients reach only prompt_learner.cls_ctx; every text-tower weight has requires_grad False.
    `clip_model` is a clip.model.CLIP; its image tower is dropped to save memory."""

    def __init__(self, clip_model, num_classes, template=DEFAULT_PROMPT_TEMPLATE, full_length=False):
        super().__init__()
        clip_model.visual = None
        self.clip_model = freeze(clip_model).eval()
        self.full_length = full_length
        check_text_tower(clip_model)
        self.prompt_learner = PromptLearner(num_classes, template, clip_model.token_embedding,
                                            clip_model.context_length, full_length)

    def train(self, mode=True):
        super().train(mode)
        self.clip_model.eval()  # frozen tower (it has no dropout or batch norm either)
        return self

    def encode_embeddings(self, embeds):
        eot_index = torch.full((embeds.shape[0],), self.prompt_learner.eot_index, device=embeds.device)
        if self.full_length:
            return encode_text_full_length(self.clip_model, embeds, eot_index)
        return self.clip_model.encode_text_embeddings(embeds, eot_index)

    def forward(self, labels):
        return self.encode_embeddings(self.prompt_learner(labels))

    @torch.no_grad()
    def all_class_features(self, batch_size=64):
        """Text features of every identity, (num_classes, embed), fp32."""
        device = self.prompt_learner.cls_ctx.device
        labels = torch.arange(self.prompt_learner.num_classes, device=device)
        return torch.cat([self(chunk).float() for chunk in labels.split(batch_size)])


def encode_text_full_length(clip_model, embeds, eot_index):
    """The text tower on every position of `embeds` (N, context_length, width), like the reference
    and OpenAI's encode_text; the same result as encode_text_embeddings, at full cost."""
    x = embeds + clip_model.positional_embedding[:embeds.shape[1]].to(embeds.dtype)
    x = clip_model.transformer(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_index]
    return clip_model.ln_final(x) @ clip_model.text_projection


# ---- PromptSG ----

PROMPTSG_PLACEHOLDER = "S*"
PROMPTSG_TEMPLATE = "A photo of a S* hand."
PROMPTSG_FIXED_PROMPT = "A photo of a hand."


def _inner_token_ids(text):
    """BPE ids of `text` without the start and end tokens."""
    ids = clip.tokenize([text], context_length=len(text.encode()) + 2)[0]  # long enough for any text
    eot_id = int(clip.tokenize([""])[0, 1])
    return ids[1:int((ids == eot_id).nonzero()[0])]


def composed_prompt_tokens(template, context_length=77):
    """Token ids (context_length,) of `template` with its one "S*" replaced by a single placeholder
    token, the position of that token and the position of the end token."""
    if template.count(PROMPTSG_PLACEHOLDER) != 1:
        raise TrainingInputError(f"--prompt_template must contain '{PROMPTSG_PLACEHOLDER}' exactly once (where the "
                                 f"pseudo-word goes), got {template!r}")
    prefix, suffix = template.split(PROMPTSG_PLACEHOLDER)
    sot_id, eot_id = (int(t) for t in clip.tokenize([""])[0, :2])
    placeholder_id = _inner_token_ids("x")[:1]
    ids = torch.cat([torch.tensor([sot_id]), _inner_token_ids(prefix), placeholder_id,
                     _inner_token_ids(suffix), torch.tensor([eot_id])])
    if len(ids) > context_length:
        raise TrainingInputError(f"--prompt_template {template!r} is {len(ids)} tokens long, more than the text "
                                 f"tower's context length {context_length}")
    tokens = torch.zeros(context_length, dtype=torch.long)
    tokens[:len(ids)] = ids
    return tokens, 1 + len(_inner_token_ids(prefix)), len(ids) - 1


def splice_pseudo_token(text_tower, prompt_tokens, pseudo_index, pseudo_tokens):
    """(N, L, token_dim) token embeddings of prompt_tokens (L,) ending at the end token, with the
    pseudo-tokens (N, token_dim) in place of position pseudo_index."""
    embeds = text_tower.token_embedding(prompt_tokens).to(pseudo_tokens.dtype)
    embeds = embeds.expand(pseudo_tokens.shape[0], -1, -1)
    return torch.cat([embeds[:, :pseudo_index], pseudo_tokens[:, None], embeds[:, pseudo_index + 1:]], dim=1)


def encode_spliced_prompt(text_tower, prompt_tokens, pseudo_index, pseudo_tokens):
    """Text features (N, embed_dim) of the spliced prompt from the (frozen) text tower, pooled at the
    end token (the last of prompt_tokens); gradients reach pseudo_tokens unless under no_grad."""
    embeds = splice_pseudo_token(text_tower, prompt_tokens, pseudo_index, pseudo_tokens)
    eot_index = torch.full((embeds.shape[0],), embeds.shape[1] - 1, device=embeds.device)
    return text_tower.encode_text_embeddings(embeds, eot_index)


class InversionNetwork(nn.Module):
    """Image global feature -> one pseudo-word embedding: 3-layer MLP (512-d hidden layers) with a
    BatchNorm after the last layer. The BN scale starts at the spread of the real word embeddings so
    the pseudo-word begins on their scale (weight 1 would make it tens of times larger than a word)."""

    def __init__(self, in_dim, token_dim, hidden=512, token_std=1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, token_dim))
        self.bn = nn.BatchNorm1d(token_dim)
        nn.init.constant_(self.bn.weight, float(token_std))
        nn.init.zeros_(self.bn.bias)

    def forward(self, image_feature):
        return self.bn(self.mlp(image_feature.float()))


class CrossAttention(nn.Module):
    """Multi-head attention of queries (N, Lq, D) over keys/values (N, Lk, D), batch first."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def split_heads(self, x):
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, queries, keys_values):
        """(output (N, Lq, D), attention weights averaged over the heads (N, Lq, Lk))."""
        q = self.split_heads(self.q_proj(queries))
        k = self.split_heads(self.k_proj(keys_values))
        v = self.split_heads(self.v_proj(keys_values))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).flatten(2)
        return self.out_proj(out), weights.mean(dim=1)


INTERACTION_POOLS = ("global", "mean", "text")


def identity_block(width, heads):
    """A pre-LN transformer block whose residual branches end in zero weights: the identity at
    initialisation, so the blocks start from the features they are given (and learn from there)."""
    block = ResidualAttentionBlock(width, heads)
    for layer in (block.attn.out_proj, block.mlp.c_proj):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return block


class MultimodalInteraction(nn.Module):
    """PromptSG's multimodal interaction module (Yang et al., CVPR 2024, Fig. 3). The text feature
    (query) attends over the visual tokens [global, patches] (keys/values); the attention map
    re-weights the tokens (x L, so a uniform map leaves them as they are); `num_blocks` pre-LN
    transformer blocks (the identity at initialisation: identity_block) run over [attended text
    token, re-weighted visual tokens]; the output (N, width), after ln_post, is the blocks' output at
    the global visual token (pool "global": at the start, CLIP's own feature up to ln_post's
    centring and scale), the mean over every position ("mean") or the output at the attended text
    token ("text": the query's own output, what an attention module returns)."""

    def __init__(self, width, heads, num_blocks=2, pool="global"):
        super().__init__()
        if pool not in INTERACTION_POOLS:
            raise TrainingInputError(f"--pool must be one of {', '.join(INTERACTION_POOLS)}, got {pool!r}")
        self.pool = pool
        self.ln_query = LayerNorm(width)
        self.ln_tokens = LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads)
        self.blocks = nn.Sequential(*[identity_block(width, heads) for _ in range(num_blocks)])
        self.ln_post = LayerNorm(width)

    def forward(self, text_feature, visual_tokens, return_weights=False):
        query = text_feature[:, None].to(visual_tokens.dtype)
        attended, weights = self.cross_attn(self.ln_query(query), self.ln_tokens(visual_tokens))
        reweighted = visual_tokens * (visual_tokens.shape[1] * weights[:, 0, :, None])
        sequence = self.blocks(torch.cat([query + attended, reweighted], dim=1))
        if self.pool == "mean":
            fused = self.ln_post(sequence).mean(dim=1)
        else:
            fused = self.ln_post(sequence[:, 1 if self.pool == "global" else 0])
        return (fused, weights) if return_weights else fused


def visual_tokens(visual, features, token_proj=None):
    """The keys/values of a MultimodalInteraction: [global CLIP feature, patch tokens] (N, 1 + h*w,
    embed_dim) from an image encoder's forward_features. ViT patch tokens go through CLIP's own
    projection (visual.proj); ResNet layer4 tokens through `token_proj` (a Linear to embed_dim)."""
    patches = features["tokens"][:, 1:]
    patches = patches @ visual.proj if token_proj is None else token_proj(patches)
    return torch.cat([features["proj"][:, None], patches.to(features["proj"].dtype)], dim=1)
