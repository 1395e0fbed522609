"""One figure style for every figure the project draws (collect_results.py, reproduce.py, the ranking
and explanation figures): journal sizes (single column 3.5 in, double column 7 in), fonts of at
least 8 pt, vector PDF with embedded TrueType fonts, one colour per method and one line style per
backbone in every figure, legends below the axes, never over the data.

Depends on nothing in the package but utils/io (atomic writes) and utils/display (names)."""
import contextlib
import math
import os
import re
import zlib

from . import display
from .io import _atomic_write

SINGLE_COLUMN = 3.5  # inches
DOUBLE_COLUMN = 7.0
FONT_SIZE = 8  # points: the smallest text in every figure
PNG_DPI = 200  # the PNG beside each vector PDF: 1400 pixels across a double column

# Okabe & Ito's colour-blind-safe palette: a fixed colour per method, the rest for other names
METHOD_COLORS = {"Zero-shot": "#000000", "Fine-tuned": "#0072B2", "CLIP-ReID": "#CC79A7", "PromptSG": "#009E73",
                 "CLIP-HandID": "#D55E00"}
OTHER_COLORS = ("#E69F00", "#56B4E9", "#999999", "#882255")
BACKBONE_STYLES = {"ViT-B/16": "-", "RN50": (0, (4, 2)), "ViT-B/32": (0, (1, 1.5)), "ViT-L/14": (0, (4, 1.5, 1, 1.5))}
OTHER_STYLES = ((0, (1, 1.5)), (0, (4, 1.5, 1, 1.5)), (0, (6, 2)))
# borders of ranking and explanation panels
SAME_IDENTITY, OTHER_IDENTITY, QUERY = "#1a9641", "#d7191c", "#000000"
HEATMAP = "inferno"  # explanation maps: perceptually uniform, readable in grey
VALUES = "viridis"  # value matrices (cross-aspect Rank-1)
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # curves of one method and backbone told apart (e.g. training sets)
LINE_HEIGHT = 0.16  # inches a line of wrapped 8-9 pt text takes
ROW_LABEL_WIDTH = 1.3  # inches: the widest line of a matrix's row names
COLOUR_BAR_WIDTH = 0.9  # inches: a matrix figure's colour bar with its label

STYLE = {"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1, "axes.labelsize": FONT_SIZE,
         "xtick.labelsize": FONT_SIZE, "ytick.labelsize": FONT_SIZE, "legend.fontsize": FONT_SIZE,
         "figure.titlesize": FONT_SIZE + 1, "pdf.fonttype": 42, "ps.fonttype": 42, "lines.linewidth": 1.2,
         "axes.linewidth": 0.6, "grid.linewidth": 0.4, "legend.frameon": False,
         "figure.constrained_layout.use": True}


def pyplot():
    """matplotlib.pyplot on the Agg back end (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@contextlib.contextmanager
def paper_style():
    """rcParams of every figure (sizes, fonts, embedded fonts) for the figures made inside."""
    plt = pyplot()
    with plt.rc_context(STYLE):
        yield plt


def method_color(method):
    """The colour of a method's display name, the same in every figure."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return OTHER_COLORS[zlib.crc32(str(method).encode()) % len(OTHER_COLORS)]


def _plain(name):
    return "".join(c for c in str(name).lower() if c.isalnum())


def backbone_style(backbone):
    """The line style of a backbone's display name, the same in every figure; a checkpoint file named
    after a released model (ViT-B-16-tiny.pt) takes that model's style."""
    for name, style in sorted(BACKBONE_STYLES.items(), key=lambda item: -len(item[0])):
        if _plain(backbone).startswith(_plain(name)):
            return style
    return OTHER_STYLES[zlib.crc32(str(backbone).encode()) % len(OTHER_STYLES)]


def legend_columns(width, labels):
    """How many legend entries fit side by side in `width` inches (a line sample and 8 pt text each)."""
    per_entry = 0.5 + 0.068 * max(len(label) for label in labels)
    return max(1, min(len(labels), int(width // per_entry)))


def legend_height(width, labels):
    """Inches the legend below the axes takes."""
    return 0.15 + 0.17 * math.ceil(len(labels) / legend_columns(width, labels)) if labels else 0.0


def legend_below(fig, handles, labels):
    """One legend for the whole figure, centred under its axes, as many columns as fit the width."""
    if not handles:
        return None
    return fig.legend(handles, labels, loc="outside lower center", ncols=legend_columns(fig.get_figwidth(), labels),
                      handlelength=2.2, columnspacing=1.2)


def panel_grid(plt, count, width=None, panel_height=None, max_columns=3, extra_height=0.0, **subplot_kw):
    """A figure of `count` panels (single-column width for one panel, double-column otherwise) and
    extra_height inches below them for a legend."""
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    width = width or (SINGLE_COLUMN if count == 1 else DOUBLE_COLUMN)
    panel_height = panel_height or (2.3 if count == 1 else 2.0)
    fig, axes = plt.subplots(rows, columns, figsize=(width, panel_height * rows + 0.2 + extra_height), squeeze=False,
                             **subplot_kw)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def curve_figure(curves, xlabel, ylabel, xscale="linear", xlim=None, ylim=(0, 101), integer_x=False, width=None):
    """Curves drawn in panels: curves = [{"panel", "label", "method", "backbone", "x", "y", "marker"
    (optional)}]. One panel per distinct "panel" (in order; its title wrapped to the panel's width),
    the method's colour and the backbone's line style, one legend below. Returns the figure."""
    from matplotlib.ticker import MaxNLocator
    panels = list(dict.fromkeys(c["panel"] for c in curves))
    labels = list(dict.fromkeys(c["label"] for c in curves))
    width = width or (SINGLE_COLUMN if len(panels) == 1 else DOUBLE_COLUMN)
    max_columns = 3 if width > SINGLE_COLUMN else 2
    titles = {p: wrap_to(p, width / min(len(panels), max_columns) - 0.35, FONT_SIZE + 1) for p in panels}
    extra_lines = max(t.count("\n") for t in titles.values())
    with paper_style() as plt:
        fig, axes = panel_grid(plt, len(panels), width, extra_height=legend_height(width, labels),
                               max_columns=max_columns,
                               panel_height=(2.3 if len(panels) == 1 else 2.0) + LINE_HEIGHT * extra_lines)
        entries = {}
        for ax, panel in zip(axes, panels):
            for curve in (c for c in curves if c["panel"] == panel):
                line, = ax.plot(curve["x"], curve["y"], color=method_color(curve["method"]),
                                linestyle=backbone_style(curve["backbone"]), marker=curve.get("marker"),
                                markersize=3.5, markevery=max(1, len(curve["x"]) // 5))
                entries.setdefault(curve["label"], line)
            ax.set(xscale=xscale, xlabel=xlabel, ylabel=ylabel if ax in axes[::max_columns] else None)
            if len(panels) > 1 or panel:
                ax.set_title(titles[panel])
            if xlim:
                ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            if integer_x:
                ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True, steps=[1, 2, 5, 10]))
            ax.grid(alpha=0.3)
        legend_below(fig, [entries[label] for label in labels], labels)  # in the curves' (the table's) order
    return fig


def matrix_figure(matrices, metric_label, width=DOUBLE_COLUMN):
    """Value matrices (cross-aspect: training set x test set), one panel each, with one shared colour
    bar on a fixed 0-100 scale: matrices = [{"title", "rows", "columns", "values" (percent or None)}].
    Row and column names are wrapped to the room they have, and each matrix row is tall enough for its
    name. Returns the figure."""
    import numpy as np
    columns = min(len(matrices), 2 if width > SINGLE_COLUMN else 1)
    rows = math.ceil(len(matrices) / columns)
    row_names = {r: wrap_to(r, ROW_LABEL_WIDTH) for m in matrices for r in m["rows"]}
    label_width = max(text_width(line) for name in row_names.values() for line in name.split("\n"))
    panel_width = (width - COLOUR_BAR_WIDTH - label_width - 0.35) / columns
    cells = max(len(m["columns"]) for m in matrices)
    column_names = {c: wrap_to(c, panel_width / cells - 0.08) for m in matrices for c in m["columns"]}
    titles = [wrap_to(m["title"], panel_width, FONT_SIZE + 1) for m in matrices]
    cell = max(0.3, 0.06 + LINE_HEIGHT * max(n.count("\n") + 1 for n in row_names.values()))  # inches per row
    below = LINE_HEIGHT * max(n.count("\n") + 1 for n in column_names.values())
    above = LINE_HEIGHT * max(t.count("\n") + 1 for t in titles)
    grid_rows = [max(len(m["rows"]) for m in matrices[r * columns:(r + 1) * columns]) for r in range(rows)]
    height = sum(cell * n + below + above + 0.45 for n in grid_rows) + 0.2
    with paper_style() as plt:
        fig, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False,
                                 height_ratios=[cell * n + below + above for n in grid_rows])
        image = None
        for index, ax in enumerate(axes.flat):
            if index >= len(matrices):
                ax.set_visible(False)
                continue
            matrix = matrices[index]
            values = np.array([[np.nan if v is None else v for v in row] for row in matrix["values"]], float)
            image = ax.imshow(values, cmap=VALUES, vmin=0, vmax=100, aspect="auto")
            for (i, j), value in np.ndenumerate(values):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=FONT_SIZE,
                            color="black" if value > 60 else "white")
            ax.set_xticks(range(len(matrix["columns"])), [column_names[c] for c in matrix["columns"]])
            first = matrices[index - index % columns]  # a panel shows its rows' names unless they are its left one's
            named = index % columns == 0 or matrix["rows"] != first["rows"]
            ax.set_yticks(range(len(matrix["rows"])), [row_names[r] if named else "" for r in matrix["rows"]])
            ax.set_title(titles[index])
            ax.tick_params(length=0)
            if index % columns == 0:
                ax.set_ylabel("trained on")
            if index >= len(matrices) - columns:
                ax.set_xlabel("tested on")
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), label=f"{metric_label} (%)", shrink=0.6)
    return fig


def text_width(text, size=FONT_SIZE):
    """Inches that one line of `text` takes at `size` points in the figures' font."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    return TextPath((0, 0), str(text), size=size, prop=FontProperties(family=["sans-serif"])).get_extents().width / 72


def wrap_to(text, inches, size=FONT_SIZE):
    """`text` in lines of at most `inches` at `size` points, broken after spaces, underscores, slashes and
    hyphens (a piece wider than that keeps a line of its own)."""
    lines = [""]
    for piece in re.split(r"(?<=[ _/-])", str(text)):
        if lines[-1] and text_width((lines[-1] + piece).rstrip(), size) > inches:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines)


def wrap(text):
    """'11k dorsal right' -> '11k dorsal\nright': tick labels of at most two short lines."""
    words = str(text).split()
    if len(words) < 3:
        return " ".join(words) if len(" ".join(words)) <= 12 else "\n".join(words)
    half = (len(words) + 1) // 2
    return " ".join(words[:half]) + "\n" + " ".join(words[half:])


def save(fig, prefix, formats=("pdf", "png")):
    """Write fig as PREFIX.pdf (vector) and PREFIX.png, each atomically, and close it; returns the paths."""
    plt = pyplot()
    paths = []
    try:
        for ext in formats:
            path = f"{prefix}.{ext}"
            _atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext, dpi=PNG_DPI), mode="wb")
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def overlapping_legends(fig):
    """(legend, axes) pairs whose boxes overlap, by matplotlib's own window extents after drawing: a
    legend over an axes' data area. Empty when every legend lies beside or below the axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    clashes = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible() and ax.get_label() != "<colorbar>" and box.overlaps(ax.get_window_extent(renderer)):
                clashes.append((legend, ax))
    return clashes


def figure_name(path):
    """File stem of a figure path (for messages)."""
    return os.path.splitext(os.path.basename(path))[0]


def label_for(method, backbone, extra=None):
    """A short legend label: 'Fine-tuned ViT-B/16 (lr 1e-05)'."""
    text = f"{method} {display.backbone_name(backbone)}"
    return f"{text} ({extra})" if extra else text
