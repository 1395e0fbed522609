"""Losses for fine-tuning CLIP image encoders on hand identities.

- `CrossEntropyLabelSmooth`: cross entropy against (1-eps)*onehot + eps/C.
- `TripletLoss`: batch-hard triplet on Euclidean distances, with a margin or a soft margin.
- `CenterLoss`: squared distance of each feature to its learned class centre.
- `ArcFace`: additive angular margin logits (use with a cross entropy).
- `SupConLoss` / `supcon_loss`: supervised contrastive loss between two sets of features, e.g. images
  and text (CLIP-ReID's definition: temperature 1, all same-label candidates are positives).
- `FinetuneLoss`, `PromptSGLoss`, `ClipReIDPromptLoss` (stage 1), `ClipReIDLoss` (stage 2): the
  objectives of train_finetune.py, train_promptsg.py and train_clipreid.py.
Every loss returns a scalar mean over the batch. Inputs are cast to fp32 so the losses behave the same
under autocast.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def cross_entropy_label_smooth(logits, labels, epsilon=0.1):
    log_probs = F.log_softmax(logits.float(), dim=1)
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1 - epsilon) * nll + epsilon * uniform).mean()


class CrossEntropyLabelSmooth(nn.Module):
    """Label-smoothed cross entropy; epsilon=0 gives the plain cross entropy."""

    def __init__(self, epsilon=0.1):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, logits, labels):
        return cross_entropy_label_smooth(logits, labels, self.epsilon)


def l2_normalize(x, dim=-1):
    return x / (x.norm(p=2, dim=dim, keepdim=True) + 1e-12)


def euclidean_dist(a, b):
    """(M, N) Euclidean distances; clamped before the sqrt so the gradient stays finite at 0."""
    a, b = a.float(), b.float()
    sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2 * a @ b.t()
    return sq.clamp(min=1e-12).sqrt()


def hard_example_mining(dist, labels):
    """For each anchor: distance to its farthest positive (itself included, so an anchor without a
    positive gets ~0) and to its closest negative (+inf when the batch has no negative)."""
    same = labels[:, None] == labels[None, :]
    dist_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    dist_an = dist.masked_fill(same, float("inf")).min(dim=1).values
    return dist_ap, dist_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss. margin=None uses the soft margin log(1 + exp(d_ap - d_an))."""

    def __init__(self, margin=0.3, normalize_feature=False):
        super().__init__()
        self.margin = margin
        self.normalize_feature = normalize_feature

    def forward(self, feats, labels):
        feats = feats.float()
        if self.normalize_feature:
            feats = l2_normalize(feats)
        dist_ap, dist_an = hard_example_mining(euclidean_dist(feats, feats), labels)
        has_negative = torch.isfinite(dist_an)
        if not has_negative.any():
            return feats.sum() * 0.0
        dist_ap, dist_an = dist_ap[has_negative], dist_an[has_negative]
        if self.margin is None:
            return F.softplus(dist_ap - dist_an).mean()
        return F.relu(dist_ap - dist_an + self.margin).mean()


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): mean over the batch of ||f_i - c_{y_i}||^2, centres learned
    by the optimizer like any other parameter."""

    def __init__(self, num_classes, feat_dim):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats, labels):
        diff = feats.float() - self.centers[labels].float()
        return diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12).mean()


class ArcFace(nn.Module):
    """Additive angular margin head: s*cos(theta + m) for the target class and s*cos(theta) for the
    others. Where theta + m > pi the target logit falls back to s*(cos(theta) - m*sin(m)) so it stays
    monotonic in theta. forward(feats, labels) returns the logits; labels=None gives s*cos(theta)."""

    def __init__(self, in_features, num_classes, s=30.0, m=0.5):
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.fallback = math.sin(math.pi - m) * m

    def forward(self, feats, labels=None):
        cosine = F.linear(F.normalize(feats.float()), F.normalize(self.weight.float()))
        if labels is None:
            return self.s * cosine
        sine = (1.0 - cosine.pow(2)).clamp(min=0.0).sqrt()
        cos_plus_m = cosine * self.cos_m - sine * self.sin_m
        cos_plus_m = torch.where(cosine > self.threshold, cos_plus_m, cosine - self.fallback)
        target = F.one_hot(labels, cosine.shape[1]).bool()
        return self.s * torch.where(target, cos_plus_m, cosine)


def supcon_loss(anchors, anchor_labels, candidates, candidate_labels, temperature=1.0):
    """Supervised contrastive loss of anchors against candidates: for each anchor, minus the mean
    log-softmax (over all candidates) of its same-label candidates; mean over anchors. Anchors
    without any positive candidate are left out (0 if none has one)."""
    logits = anchors.float() @ candidates.float().t() / temperature
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (anchor_labels[:, None] == candidate_labels[None, :]).float()
    num_pos = positives.sum(1)
    valid = num_pos > 0
    if not valid.any():
        return logits.sum() * 0.0
    mean_log_prob_pos = (positives * log_prob).sum(1)[valid] / num_pos[valid]
    return -mean_log_prob_pos.mean()


class SupConLoss(nn.Module):
    """Image<->text supervised contrastive loss (CLIP-ReID, temperature 1).
    forward(anchors, candidates, anchor_labels, candidate_labels); e.g. i2t = (image, text, y, y_text),
    t2i = (text, image, y_text, y)."""

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, anchors, candidates, anchor_labels, candidate_labels):
        return supcon_loss(anchors, anchor_labels, candidates, candidate_labels, self.temperature)


# ---- the objectives of the trainers (model + losses in one module, so DDP wraps both) ----

class FinetuneLoss(nn.Module):
    """The model plus its training objective, one module so DDP also syncs the center-loss centres:
    LS-CE on both heads (1:1) + triplet_weight * triplet + center_weight * center, the metric losses
    on both pre-BN features (pre_proj and proj)."""

    def __init__(self, model, ls=0.1, triplet_weight=0.0, center_weight=0.0, triplet_margin=0.3):
        super().__init__()
        self.model = model
        self.id_loss = CrossEntropyLabelSmooth(ls)
        self.triplet_weight, self.center_weight = triplet_weight, center_weight
        self.triplet = TripletLoss(triplet_margin) if triplet_weight > 0 else None
        self.centers = None
        if center_weight > 0:
            self.centers = nn.ModuleList([CenterLoss(model.num_classes, model.in_planes),
                                          CenterLoss(model.num_classes, model.in_planes_proj)])

    def forward(self, images, labels):
        scores, features = self.model(images, labels)
        metric_feats = (features["pre_proj"], features["proj"])
        terms = {"loss_id": self.id_loss(scores[0], labels), "loss_id_proj": self.id_loss(scores[1], labels)}
        total = terms["loss_id"] + terms["loss_id_proj"]
        if self.triplet is not None:
            terms["loss_triplet"] = sum(self.triplet(f, labels) for f in metric_feats)
            total = total + self.triplet_weight * terms["loss_triplet"]
        if self.centers is not None:
            terms["loss_center"] = sum(c(f, labels) for c, f in zip(self.centers, metric_feats))
            total = total + self.center_weight * terms["loss_center"]
        return total, terms, scores[1]


def symmetric_supcon(image_features, text_features, labels, temperature):
    """i2t + t2i supervised contrastive loss on cosine similarities: every same-identity pair of the
    batch (the own pair included) is a positive."""
    image_features = F.normalize(image_features.float(), dim=1)
    text_features = F.normalize(text_features.float(), dim=1)
    i2t = supcon_loss(image_features, labels, text_features, labels, temperature)
    t2i = supcon_loss(text_features, labels, image_features, labels, temperature)
    return i2t + t2i


class PromptSGLoss(nn.Module):
    """The model plus its objective (one module, so DDP wraps both): ID (label-smoothed CE on
    BN(fused)) + triplet_weight x batch-hard triplet on fused + lambda_sc x symmetric SupCon between
    the global image features and the composed-prompt features."""

    def __init__(self, model, ls=0.1, triplet_weight=1.0, lambda_sc=0.5, sc_temperature=None, triplet_margin=0.3):
        super().__init__()
        self.model = model
        self.id_loss = CrossEntropyLabelSmooth(ls)
        self.triplet = TripletLoss(triplet_margin)
        self.triplet_weight, self.lambda_sc = float(triplet_weight), float(lambda_sc)
        self.fixed_temperature = sc_temperature

    def temperature(self):
        """--sc_temperature, else the checkpoint's own (read each time: a resumed model gets its weights late)."""
        if self.fixed_temperature:
            return float(self.fixed_temperature)
        return self.model.clip_temperature()

    def forward(self, images, labels):
        scores, features = self.model(images, labels)
        temperature = self.fixed_temperature or self.model.clip_temperature(as_tensor=True)
        terms = {"loss_id": self.id_loss(scores[0], labels),
                 "loss_triplet": self.triplet(features["fused"], labels),
                 "loss_supcon": symmetric_supcon(features["image"], features["text"], labels, temperature)}
        total = terms["loss_id"] + self.triplet_weight * terms["loss_triplet"] + self.lambda_sc * terms["loss_supcon"]
        return total, terms, scores[0]


class ClipReIDPromptLoss(nn.Module):
    """CLIP-ReID stage 1: the prompt text encoder plus its objective, image->text + text->image
    supervised contrastive loss (temperature 1) between cached image features and the features of
    their identities' prompts."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        self.supcon = SupConLoss(temperature=1.0)

    def forward(self, image_features, labels):
        text_features = self.text_encoder(labels)
        terms = {"loss_i2t": self.supcon(image_features, text_features, labels, labels),
                 "loss_t2i": self.supcon(text_features, image_features, labels, labels)}
        return terms["loss_i2t"] + terms["loss_t2i"], terms, None


class ClipReIDLoss(nn.Module):
    """CLIP-ReID stage 2: the model plus its objective (one module, for DDP):
    id_weight * [LS-CE(BN pre_proj head) + LS-CE(BN proj head)]
    + triplet_weight * [Tri(penultimate | layer3) + Tri(pre_proj) + Tri(proj)]   (pre-BN features)
    + i2t_weight * LS-CE(proj feature @ text_features^T)   (all identities' frozen text features)."""

    def __init__(self, model, text_features, ls=0.1, id_weight=0.25, triplet_weight=1.0, i2t_weight=1.0,
                 margin=0.3):
        super().__init__()
        self.model = model
        self.register_buffer("text_features", text_features.detach().float().clone())
        self.ls, self.id_weight, self.triplet_weight, self.i2t_weight = ls, id_weight, triplet_weight, i2t_weight
        self.id_loss = CrossEntropyLabelSmooth(ls)
        self.triplet = TripletLoss(margin)
        first = "layer3" if "layer3" in model.visual.feature_dims else "penultimate"
        self.triplet_keys = (first, "pre_proj", "proj")

    def forward(self, images, labels):
        scores, features = self.model(images, labels)
        i2t_logits = features["proj"].float() @ self.text_features.t()
        terms = {"loss_id": self.id_loss(scores[0], labels) + self.id_loss(scores[1], labels),
                 "loss_triplet": sum(self.triplet(features[k], labels) for k in self.triplet_keys),
                 "loss_i2t": cross_entropy_label_smooth(i2t_logits, labels, self.ls)}
        total = (self.id_weight * terms["loss_id"] + self.triplet_weight * terms["loss_triplet"]
                 + self.i2t_weight * terms["loss_i2t"])
        return total, terms, i2t_logits
