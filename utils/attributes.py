"""Soft-biometric attributes of 11k Hands: classes from HandInfo.csv rows, the prompt ensembles
that describe them in words, confusion matrices and accuracies, the person-disjoint train/test
split, and a linear probe. torch and numpy only."""
import os

import numpy as np
import torch

from .errors import AttributeInputError
from .io import read_json


# Age groups as (label, last age in the group). 11k's 190 people are mostly students: 122 are
# 18-21, 61 are 22-30 and 6 are over 30 (36, 43, 54, 70, 75), so finer bins would be near-empty.
AGE_GROUPS = (("18-21", 21), ("22-30", 30), ("31+", None))


# attribute -> class names, in label order
ATTRIBUTES = {
    "gender": ("female", "male"),
    "age": tuple(label for label, _ in AGE_GROUPS),
    "skin_color": ("very fair", "fair", "medium", "dark"),
    "nail_polish": ("no", "yes"),
    "accessories": ("no", "yes"),
    "palmar_dorsal": ("dorsal", "palmar"),
    "left_right": ("left", "right"),
}


DEFAULT_PROMPTS = {
    "gender": {
        "female": ["a photo of a woman's hand.", "a close-up photo of the hand of a woman.",
                   "a photo of a female hand."],
        "male": ["a photo of a man's hand.", "a close-up photo of the hand of a man.", "a photo of a male hand."],
    },
    "age": {
        "18-21": ["a photo of the hand of a teenager.", "a photo of the hand of a person about twenty years old.",
                  "a photo of the smooth hand of a young person."],
        "22-30": ["a photo of the hand of a young adult in their twenties.",
                  "a photo of the hand of a person in their mid twenties.", "a photo of the hand of an adult under thirty."],
        "31+": ["a photo of the hand of a middle-aged person.", "a photo of the hand of an older adult.",
                "a photo of the wrinkled hand of an elderly person."],
    },
    "skin_color": {
        "very fair": ["a photo of a hand with very fair skin.", "a photo of a very pale hand.",
                      "a photo of a hand with very light skin."],
        "fair": ["a photo of a hand with fair skin.", "a photo of a light-skinned hand.",
                 "a photo of a hand with light beige skin."],
        "medium": ["a photo of a hand with a medium skin tone.", "a photo of a hand with olive skin.",
                   "a photo of a hand with tan skin."],
        "dark": ["a photo of a hand with dark skin.", "a photo of a dark-skinned hand.",
                 "a photo of a hand with deep brown skin."],
    },
    "nail_polish": {
        "no": ["a photo of a hand with bare natural fingernails.", "a photo of a hand with unpainted nails.",
               "a photo of a hand without nail polish."],
        "yes": ["a photo of a hand with painted fingernails.", "a photo of a hand with nail polish.",
                "a photo of a hand with colourful varnished nails."],
    },
    "accessories": {
        "no": ["a photo of a bare hand without jewellery.", "a photo of a hand with no ring, bracelet or watch.",
               "a photo of a plain hand and wrist."],
        "yes": ["a photo of a hand wearing a ring.", "a photo of a hand and wrist wearing a watch or bracelet.",
                "a photo of a hand with jewellery."],
    },
    "palmar_dorsal": {
        "dorsal": ["a photo of the back of a hand.", "a photo of the dorsal side of a hand, showing the knuckles.",
                   "a photo of the top of a hand with its fingernails."],
        "palmar": ["a photo of the palm of a hand.", "a photo of the palmar side of a hand, showing the palm lines.",
                   "a photo of an open palm."],
    },
    "left_right": {
        "left": ["a photo of a left hand.", "a photo of the left hand of a person.", "a photo of someone's left hand."],
        "right": ["a photo of a right hand.", "a photo of the right hand of a person.",
                  "a photo of someone's right hand."],
    },
}


def age_group(age):
    for label, last in AGE_GROUPS:
        if last is None or age <= last:
            return label


def _binary(value, column, where):
    if value.strip() not in ("0", "1"):
        raise AttributeInputError(f"{where}: {column} is {value!r}; it must be 0 or 1")
    return int(value)


def row_classes(row, where):
    """{attribute: class index} of one HandInfo.csv row (a dict of text); `where` names the row in errors."""
    def pick(attribute, name, column):
        if name not in ATTRIBUTES[attribute]:
            raise AttributeInputError(f"{where}: {column} is {row.get(column)!r}; expected one of "
                                      f"{', '.join(ATTRIBUTES[attribute])}")
        return ATTRIBUTES[attribute].index(name)

    age_text = (row.get("age") or "").strip()
    if not age_text.isdigit():
        raise AttributeInputError(f"{where}: age is {row.get('age')!r}; it must be a whole number of years")
    aspect = (row.get("aspectOfHand") or "").strip().lower().split()
    if len(aspect) != 2:
        raise AttributeInputError(f"{where}: aspectOfHand is {row.get('aspectOfHand')!r}; expected e.g. 'dorsal right'")
    return {"gender": pick("gender", (row.get("gender") or "").strip().lower(), "gender"),
            "age": ATTRIBUTES["age"].index(age_group(int(age_text))),
            "skin_color": pick("skin_color", (row.get("skinColor") or "").strip().lower(), "skinColor"),
            "nail_polish": _binary(row.get("nailPolish") or "", "nailPolish", where),
            "accessories": _binary(row.get("accessories") or "", "accessories", where),
            "palmar_dorsal": pick("palmar_dorsal", aspect[0], "aspectOfHand"),
            "left_right": pick("left_right", aspect[1], "aspectOfHand")}


def label_arrays(classes):
    """[{attribute: index}, ...] -> {attribute: int64 array}."""
    return {name: np.array([c[name] for c in classes], dtype=np.int64) for name in ATTRIBUTES}


# ---- prompt ensembles ----

def check_prompts(prompts, where):
    """Raise a one-line AttributeInputError unless `prompts` is {attribute: {class: [text, ...]}}
    over known attributes, naming every class of each attribute it lists."""
    if not isinstance(prompts, dict):
        raise AttributeInputError(f"{where} must hold a JSON object {{attribute: {{class: [prompt, ...]}}}}")
    for attribute, by_class in prompts.items():
        if attribute not in ATTRIBUTES:
            raise AttributeInputError(f"{where}: unknown attribute {attribute!r} (known: {', '.join(ATTRIBUTES)})")
        classes = ATTRIBUTES[attribute]
        if not isinstance(by_class, dict) or sorted(by_class) != sorted(classes):
            found = sorted(by_class) if isinstance(by_class, dict) else type(by_class).__name__
            raise AttributeInputError(f"{where}: {attribute!r} must map each of its classes "
                                      f"{list(classes)} to a list of prompts (found {found})")
        for name, texts in by_class.items():
            if (not isinstance(texts, list) or not texts
                    or not all(isinstance(t, str) and t.strip() for t in texts)):
                raise AttributeInputError(f"{where}: {attribute!r} class {name!r} needs a non-empty list of "
                                          f"non-empty prompt strings")


def load_prompts(path=None):
    """The prompt ensembles: DEFAULT_PROMPTS, with the attributes a JSON file lists replaced."""
    prompts = {attribute: {name: list(texts) for name, texts in by_class.items()}
               for attribute, by_class in DEFAULT_PROMPTS.items()}
    if path is None:
        return prompts
    if not os.path.isfile(path):
        raise AttributeInputError(f"--prompts {path} does not exist")
    override = read_json(path, error=AttributeInputError, kind=object)
    check_prompts(override, f"--prompts {path}")
    prompts.update(override)
    return prompts


def class_text_features(encode_texts, prompts):
    """{attribute: (C, D) float32} class embeddings: every prompt's text feature is L2-normalised, the
    ensemble of a class averaged and normalised again. `encode_texts(list of str) -> (N, D)`; every
    prompt is encoded in one call."""
    texts = [t for attribute in prompts for name in ATTRIBUTES[attribute] for t in prompts[attribute][name]]
    feats = torch.nn.functional.normalize(encode_texts(texts).float(), dim=-1)
    out, start = {}, 0
    for attribute in prompts:
        rows = []
        for name in ATTRIBUTES[attribute]:  # label order, whatever order the file used
            count = len(prompts[attribute][name])
            rows.append(feats[start:start + count].mean(dim=0))
            start += count
        out[attribute] = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    return out


def zero_shot_predict(image_features, class_features):
    """Class index of the nearest class embedding (cosine) for each image feature row."""
    image_features = torch.nn.functional.normalize(torch.as_tensor(image_features).float(), dim=-1)
    return (image_features @ class_features.float().T).argmax(dim=1).numpy()


# ---- scores ----

def confusion_matrix(true, predicted, num_classes):
    """(C, C) int64 counts: row = true class, column = predicted class."""
    true, predicted = np.asarray(true, np.int64), np.asarray(predicted, np.int64)
    if true.shape != predicted.shape:
        raise ValueError(f"confusion_matrix: {true.shape} true labels but {predicted.shape} predictions")
    return np.bincount(true * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def accuracy(confusion):
    return float(np.trace(confusion) / confusion.sum())


def balanced_accuracy(confusion):
    """Mean recall over the classes present among the true labels."""
    support = confusion.sum(axis=1)
    present = support > 0
    return float((np.diag(confusion)[present] / support[present]).mean())


def majority_rate(confusion):
    """Accuracy of always answering the most frequent true class."""
    return float(confusion.sum(axis=1).max() / confusion.sum())


def summarise(confusion, class_names):
    counts = confusion.sum(axis=1)
    return {"num_images": int(confusion.sum()), "accuracy": accuracy(confusion),
            "balanced_accuracy": balanced_accuracy(confusion), "majority_rate": majority_rate(confusion),
            "counts": {name: int(n) for name, n in zip(class_names, counts)},
            "confusion": confusion.tolist()}


# ---- person-disjoint split ----

def train_identities_11k(ids, aspects, last_train_id):
    """The ids that are training identities in every aspect they appear in (id <= that aspect's
    MBA-Net threshold). 11k ids name people, and a person near the thresholds (e.g. id 1040: train
    for dorsal right, test for dorsal left) goes to test, so no person is on both sides."""
    test = {i for i, aspect in zip(ids, aspects) if int(i) > last_train_id[aspect]}
    return {i for i in ids} - test


def check_disjoint(train_ids, test_ids, where):
    shared = sorted(set(train_ids) & set(test_ids))
    if shared:
        raise AttributeInputError(f"{where}: {len(shared)} identities are on both the train and the test side "
                                  f"(first: {shared[0]}); the probe must never see a test person")
    return {"train": len(set(train_ids)), "test": len(set(test_ids)), "shared": 0}


# ---- linear probe ----

class LinearProbe(torch.nn.Module):
    """Multinomial logistic regression on standardised features."""

    def __init__(self, mean, std, num_classes):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(mean.numel(), num_classes)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, features):
        return self.linear((features - self.mean) / self.std)

    def predict(self, features):
        with torch.no_grad():
            return self.forward(torch.as_tensor(features).float()).argmax(dim=1).numpy()


def train_probe(features, labels, num_classes, l2=1e-3, steps=100, seed=0):
    """Fit a LinearProbe with full-batch L-BFGS on class-balanced cross-entropy + l2 * ||W||^2.
    Class-balanced: each class present weighs the same in total, so a 90/10 attribute is not
    learnt as its prior. Zero-initialised and full batch, so the result depends on the data alone
    (the seed is set for completeness)."""
    torch.manual_seed(seed)
    x = torch.as_tensor(features).float()
    y = torch.as_tensor(labels).long()
    counts = torch.bincount(y, minlength=num_classes).float()
    if int((counts > 0).sum()) < 2:
        raise AttributeInputError("train_probe: the training images hold fewer than two classes")
    weights = torch.where(counts > 0, len(y) / (counts.clamp(min=1) * int((counts > 0).sum())), torch.zeros(()))
    probe = LinearProbe(x.mean(dim=0), x.std(dim=0).clamp(min=1e-6), num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y, weight=weights)
        loss = loss + l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.eval()
