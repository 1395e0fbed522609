"""Hand photos to enrol or search, as identify_hands.py reads them: one photo, a folder of identity
sub-folders (<folder>/<identity>/<photo>), or a flat folder labelled by a CSV of file,identity (or
unlabelled)."""
import csv
import os

from .errors import InputFileError
from .splits import IMAGE_EXTENSIONS


def read_labels(csv_path):
    """{file: identity} of a CSV with columns file,identity."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"file", "identity"} <= set(reader.fieldnames or []):
                raise InputFileError(f"{csv_path} must have the columns file,identity (found: "
                                    f"{', '.join(reader.fieldnames or [])})")
            labels = {}
            for row in reader:
                name, identity = (row["file"] or "").strip(), (row["identity"] or "").strip()
                if not name or not identity:
                    raise InputFileError(f"{csv_path} line {reader.line_num}: empty file or identity")
                if labels.setdefault(name, identity) != identity:
                    raise InputFileError(f"{csv_path} line {reader.line_num}: {name} is listed with two identities")
            return labels
    except OSError as err:
        raise InputFileError(f"cannot read {csv_path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise InputFileError(f"{csv_path} is not UTF-8 text; save it as a UTF-8 CSV with the columns file,identity") from None
    except csv.Error as err:
        raise InputFileError(f"{csv_path} is not a readable CSV ({err}); save it with the columns file,identity") from None


def is_photo(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_photos(path, labels_csv=None, flag="--images"):
    """[(absolute path, identity or "")] of a photo, or of a folder: identity sub-folders
    (<folder>/<identity>/<photo>), or flat photos labelled by `labels_csv` (file names relative to
    the folder) or unlabelled. Sorted."""
    if os.path.isfile(path):
        if not is_photo(os.path.basename(path)):
            raise InputFileError(f"{flag} {path} is not a photo ({', '.join(IMAGE_EXTENSIONS)})")
        name = os.path.basename(path)
        labels = read_labels(labels_csv) if labels_csv else {}
        if labels_csv and name not in labels:
            raise InputFileError(f"{labels_csv} has no row for {name}; add it, or leave out the labels CSV")
        return [(os.path.abspath(path), labels.get(name, ""))]
    if not os.path.isdir(path):
        raise InputFileError(f"{flag} {path} does not exist")
    folder = os.path.abspath(path)
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    subfolders = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    flat = [n for n in names if is_photo(n) and os.path.isfile(os.path.join(folder, n))]
    if labels_csv:
        labels = read_labels(labels_csv)
        photos = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            photos += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                       for f in files if is_photo(f)]
        unlabelled = [p for p in photos if p not in labels]
        if unlabelled:
            raise InputFileError(f"{len(unlabelled)} photo(s) of {folder} have no row in {labels_csv}, e.g. "
                                f"{unlabelled[0]}; add them (file names relative to {flag})")
        unknown = sorted(set(labels) - set(photos))
        if unknown:
            raise InputFileError(f"{labels_csv} names {len(unknown)} file(s) not found in {folder}, e.g. {unknown[0]}")
        return sorted((os.path.join(folder, *p.split("/")), labels[p]) for p in photos)
    identity_photos = [(os.path.join(folder, d, f), d) for d in subfolders
                       for f in sorted(os.listdir(os.path.join(folder, d))) if is_photo(f)]
    if identity_photos and flat:
        raise InputFileError(f"{flag} {folder} holds both photos and identity sub-folders; put every photo in "
                            f"its identity's folder, or list identities in a CSV (--labels)")
    found = identity_photos or [(os.path.join(folder, n), "") for n in flat]
    if not found:
        raise InputFileError(f"{flag} {folder} holds no photos ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)
