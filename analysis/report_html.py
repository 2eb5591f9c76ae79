"""``report.html``: the Markdown report's tables and the figures of analysis/plots.py in one
self-contained file (images embedded as PNG data URIs, no scripts, no network), written by
``mmcl run`` / ``mmcl report`` beside ``report.md`` and opened in any browser."""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.report import _best_trial, _pct, accuracy_matrix, tuning_notes
from analysis.tables import ablation_table, order_breakdown, order_robustness, search_leaderboard, summary_table

if TYPE_CHECKING:
    from analysis import Results

HTML_NAME = "report.html"
log = logging.getLogger(__name__)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0 1.5em; }
.note { color: #666; font-size: 0.9em; }
"""


def _table(df: pd.DataFrame, index: bool = False) -> str:
    if df is None or df.empty:
        return '<p class="note">(none)</p>'
    return df.to_html(index=index, border=0, na_rep="-", escape=True)


def _figure(make: Callable[[], Any], alt: str) -> str:
    """The figure as an embedded PNG, or a note when it cannot be drawn from these results."""
    from analysis.plots import png_bytes

    try:
        fig = make()
    except (KeyError, ValueError, FileNotFoundError) as e:
        return f'<p class="note">{html.escape(alt)}: not drawn ({html.escape(str(e))})</p>'
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def build_html_report(res: Results) -> str:
    """The report as one HTML document (see the module docstring)."""
    from analysis import plots

    metrics = res.metrics()
    title = f"Study report: {res.study}"
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
           f'<p class="note">Results directory: <code>{html.escape(str(res.path))}</code></p>']  # fmt: skip
    if metrics.empty:
        out.append("<p>No trials recorded yet.</p></body></html>")
        return "\n".join(out)
    out += ["<h2>Summary (Avg / Last / Transfer / BWT per stage)</h2>", _table(_pct(summary_table(res)))]
    tuned = tuning_notes(res.path)
    if tuned:
        items = "".join(f"<li><b>{html.escape(st)}</b>: {html.escape(n.sentence())}.</li>" for st, n in tuned.items())
        out += ["<h2>Tuning data</h2>", f"<ul>{items}</ul>"]
    out.append(_figure(lambda: plots.avg_vs_last(res), "Avg vs Last per trial"))

    for st in pd.unique(metrics.loc[metrics["variant"] == "search", "stage"]):
        where = f" (tuned on {tuned[st].data})" if st in tuned else ""
        out += [f"<h2>Search: {html.escape(str(st) + where)}</h2>", _table(_pct(search_leaderboard(res, stage=st)))]
        out.append(_figure(lambda st=st: plots.search_history(res, st), f"search history of {st}"))
        if res.path is not None and Path(str(res.path), "optuna", f"{st}.journal").is_file():
            out.append(_figure(lambda st=st: plots.param_importance(res, st), f"parameter importance of {st}"))

    ablation = ablation_table(res)
    if len(ablation):
        out += ["<h2>Ablations (mean ± std over seeds)</h2>", _table(ablation, index=True)]
        for st in dict.fromkeys(ablation.index.get_level_values(0) if ablation.index.nlevels > 1 else [None]):
            out.append(_figure(lambda st=st: plots.ablation_bars(res, st), f"ablation bars {st or ''}".strip()))

    robust = order_robustness(res)
    if len(robust):
        out += ["<h2>Task-order robustness (mean ± std over orders and seeds)</h2>", _table(robust, index=True)]
        for st in robust.index:
            out += [f"<h3>Per order: {html.escape(str(st))}</h3>", _table(order_breakdown(res, st), index=True)]
            out.append(_figure(lambda st=st: plots.order_robustness_plot(res, st), f"order robustness of {st}"))

    out.append("<h2>Accuracy matrix of the best completed trial per stage</h2>")
    for st in pd.unique(metrics["stage"].dropna()):
        best = _best_trial(metrics[metrics["stage"] == st])
        if best is None:
            out += [f"<h3>{html.escape(str(st))}</h3>", "<p>No completed trial.</p>"]
            continue
        tid = str(best["trial_id"])
        out.append(f"<h3>{html.escape(str(st))}: {html.escape(tid)} (variant {html.escape(str(best['variant']))}, "
                   f"avg {float(best['avg']):.1f})</h3>")  # fmt: skip
        out.append(_table(accuracy_matrix(res, st, tid)))
        out.append(_figure(lambda st=st, tid=tid: plots.accuracy_heatmap(res, tid, st), f"accuracy matrix of {tid}"))
        out.append(_figure(lambda st=st, tid=tid: plots.task_curves(res, tid, st), f"per-task accuracy of {tid}"))
    out.append("</body></html>")
    return "\n".join(out)


def write_html_report(path: Any) -> Path | str:
    """Write :func:`build_html_report` to ``DIR/report.html``; return where it went."""
    import analysis
    from mmcl.storage import open_storage

    store = open_storage(path)
    store.write_text(HTML_NAME, build_html_report(analysis.load(store)))
    return store.local_path / HTML_NAME if store.local_path else store.where(HTML_NAME)


__all__ = ["HTML_NAME", "build_html_report", "write_html_report"]
