"""A self-contained HTML report (inline PNG figures) and a Markdown summary of one training run."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Report:
    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, html body)
    markdown: list[str] = field(default_factory=list)

    def html(self) -> str:
        body = "\n".join(f'<section><h2>{html.escape(h)}</h2>\n{b}\n</section>' for h, b in self.sections)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0 1rem; }}
th, td {{ border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img.figure {{ max-width: 100%; }}
.thumbs figure {{ display: inline-block; margin: .3rem; text-align: center; font-size: .8rem; }}
.thumbs img {{ width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #ccc; }}
</style></head>
<body><h1>{html.escape(self.title)}</h1>
{body}
</body></html>
"""


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_tag(fig, figure_id: str, alt: str) -> str:
    return f'<img class="figure" id="{figure_id}" alt="{html.escape(alt)}" src="{png_data_uri(fig)}">'


NOT_DEFINED = "–"  # shown for NaN: a value that does not exist (e.g. macro-F1 across label spaces)


def table_html(frame: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    return frame.to_html(index=False, float_format=floatfmt.format, border=0, escape=True, na_rep=NOT_DEFINED)


def markdown_cell(value: object, floatfmt: str = "{:.4f}") -> str:
    """One cell: NaN as "–", and `|` escaped and line breaks flattened so the row keeps its columns."""
    if isinstance(value, float):
        return NOT_DEFINED if np.isnan(value) else floatfmt.format(value)
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|")


def table_markdown(frame: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    rows = [[markdown_cell(v, floatfmt) for v in row] for row in frame.itertuples(index=False)]
    head = "| " + " | ".join(markdown_cell(c) for c in frame.columns) + " |"
    sep = "| " + " | ".join("---" for _ in frame.columns) + " |"
    return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in rows)])


def has_missing(frame: pd.DataFrame) -> bool:
    return bool(frame.select_dtypes("number").isna().to_numpy().any())


def history_frame(history: dict, kind: str) -> pd.DataFrame:
    rows = [{"step": r["step"], **r["metrics"]} for r in history.get("records", []) if r["kind"] == kind]
    return pd.DataFrame(rows)


def use_headless_backend() -> None:
    """Matplotlib's Agg backend (no display needed, nothing opens a window), for the whole process: set once
    by build_report before any figure, whichever figure comes first."""
    import matplotlib

    matplotlib.use("Agg")


def curves_figure(frame: pd.DataFrame, names: list[str], title: str, best_step: int | None):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for name in [*names, "overall"]:
            col = f"{name}_{metric}"
            if col in frame:
                line = ax.plot(frame["step"], frame[col], marker="." if len(frame) < 40 else None,
                               label=name, linewidth=2.2 if name == "overall" else 1.3)[0]
                if f"{col}_ci_low" in frame:  # the partial evaluation's confidence band
                    ax.fill_between(frame["step"], frame[f"{col}_ci_low"], frame[f"{col}_ci_high"],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
        if best_step is not None:
            ax.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"best (step {best_step})")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title} {metric}")
        ax.grid(alpha=.3)
    axes[1].legend(fontsize=8)
    return fig


def mix_figure(train: pd.DataFrame, names: list[str], target: dict[str, float]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    for i, name in enumerate(names):
        col = f"{name}_share"
        if col in train:
            line = ax.plot(train["step"], train[col], label=f"{name} (measured)")[0]
            ax.axhline(target.get(name, np.nan), color=line.get_color(), linestyle=":", label=f"{name} (target)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("optimizer step")
    ax.set_title("batch composition per logging window")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=.3)
    return fig


def adaptive_mix_figure(mixes: pd.DataFrame, evals: pd.DataFrame, names: list[str], target: dict[str, float]):
    """Adaptive mixing: each dataset's weight after every update, the static temperature mix dotted, and
    beside it each dataset's partial-evaluation loss (the signal it usually follows)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    for name in names:
        line = left.step(mixes["step"], mixes[name], where="post", label=name)[0]
        left.axhline(target.get(name, np.nan), color=line.get_color(), linestyle=":", linewidth=1)
        if f"{name}_loss" in evals:
            right.plot(evals["step"], evals[f"{name}_loss"], marker=".", color=line.get_color(), label=name)
    left.set_ylim(0, 1)
    left.set_title("mix weights (dotted: the temperature mix)")
    right.set_title("partial-evaluation loss")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    return fig


def partial_vs_full_figure(table: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["partial eval (best step)"], width=0.4, label="partial eval at the best step")
    ax.bar(x + 0.2, table["full eval"], width=0.4, label="full evaluation")
    ax.set_xticks(x, table["dataset"])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return fig


def confusion_figure(conf: pd.DataFrame, dataset: str, top_n: int, label_names: dict[int, str]):
    """Heatmap over the classes involved in the top_n most frequent confusions (readable at 2,000 classes)."""
    import matplotlib.pyplot as plt

    wrong = conf[conf["label"] != conf["prediction"]].nlargest(top_n, "count")
    classes = sorted(set(wrong["label"]).union(wrong["prediction"]))
    if not classes:
        return None
    index = {c: i for i, c in enumerate(classes)}
    mine = conf[conf["label"].isin(classes) & conf["prediction"].isin(classes)]
    grid = np.zeros((len(classes), len(classes)))
    for r in mine.itertuples():
        grid[index[r.label], index[r.prediction]] = r.count
    size = min(9, 2 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    shown = ax.imshow(grid, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="images")
    ticks = [label_names.get(c, str(c)) for c in classes]
    ax.set_xticks(range(len(classes)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), ticks, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{dataset}: classes in the {len(wrong)} most frequent confusions")
    return fig


def thumbnails_html(preds: pd.DataFrame, count: int) -> str:
    from PIL import Image

    # The highest-loss mistakes of every dataset in turns (one dataset's would otherwise fill the row).
    wrong = preds[preds["label"] != preds["prediction"]].sort_values("loss", ascending=False, kind="stable")
    wrong = wrong.assign(_turn=wrong.groupby("dataset_name").cumcount())
    wrong = wrong.sort_values(["_turn", "loss"], ascending=[True, False], kind="stable").head(count)
    cells = []
    for r in wrong.itertuples():
        try:
            with Image.open(r.image) as source:
                thumb = source.convert("RGB")
            thumb.thumbnail((96, 96))
            buf = io.BytesIO()
            thumb.save(buf, format="PNG")
        except OSError:
            continue
        true = r.label_name if isinstance(r.label_name, str) else r.label
        pred = r.prediction_name if isinstance(r.prediction_name, str) else r.prediction
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        cells.append(f'<figure><img src="{uri}" alt="{html.escape(str(r.image))}"><figcaption>'
                     f'{html.escape(r.dataset_name)}<br>true {html.escape(str(true))}<br>pred {html.escape(str(pred))} '
                     f'({r.confidence:.2f})</figcaption></figure>')
    return f'<div class="thumbs" id="misclassified">{"".join(cells)}</div>'


def calibration_figure(curves: dict[str, dict]):
    """Per dataset: the reliability diagram before and after temperature scaling (accuracy vs confidence per
    bin, the diagonal is perfect calibration) and the selective accuracy at each coverage."""
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.4), squeeze=False)
    for col, name in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        top.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        for key, label in (("reliability_before", "raw softmax"), ("reliability_after", "calibrated")):
            bins = curves[name][key]
            top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                     label=label)
        top.set_title(f"{name}: reliability", fontsize=9)
        top.set_xlabel("confidence")
        top.set_ylabel("accuracy")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.legend(fontsize=7)
        bottom.plot(curves[name]["coverage"], curves[name]["accuracy"])
        bottom.axvline(0.8, color="grey", linewidth=0.8, linestyle=":")
        bottom.set_title(f"{name}: accuracy of the most confident", fontsize=9)
        bottom.set_xlabel("coverage (share of images answered)")
        bottom.set_ylabel("accuracy")
        bottom.set_xlim(0, 1)
        bottom.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig
