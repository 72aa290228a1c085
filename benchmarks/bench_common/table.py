"""The model benchmark's results table: console and markdown renderings of result rows, their footnotes (failed
rows, overflow, rows below the label-agreement floor) and the legend under every table. ``bench_model.py`` prints
it, ``make_table.py`` renders the README's tables from results files with it.
"""

from __future__ import annotations

import math
import textwrap

from .model import AGREEMENT_FLOOR, add_ratios
from .text_tables import console_table, format_number, markdown_table

MEMORY_HEADERS = {"cuda_max_allocated": "peak alloc GB", "cpu_rss_hwm_increase": "peak RSS Δ GB"}
COLUMNS = ["variant", "resolution", "batch", "dtype", "runner", "images/s", "latency ms", "p90 ms", None,
           "× transformers", "labels = fp32 ref %", "1st call s", "TFLOP/s", "paper GFLOPs", "paper V100 FPS"]
#: Indices of the left-aligned (text) columns; numbers are right-aligned.
TEXT_COLUMNS = {0, 1, 3, 4}
#: Columns the console table leaves to the results file and the README's tables, so that it fits a terminal.
CONSOLE_OMITTED = ("p90 ms", "TFLOP/s", "paper GFLOPs")
#: Width the console table's footnotes and legend are wrapped to.
CONSOLE_WIDTH = 120


def table_rows(rows: list) -> tuple:
    """(header, list of cell lists, footnotes) for the table; shared by the console and markdown renderers."""
    kinds = {row.get("peak_mem_kind") for row in rows}
    memory_header = MEMORY_HEADERS.get(kinds.pop(), "peak mem GB") if len(kinds) == 1 else "peak mem GB"
    header = [memory_header if c is None else c for c in COLUMNS]
    cells, footnotes = [], []
    for row in rows:
        ok = row.get("status") == "ok"
        status = row.get("status", "?")
        tflops = row.get("achieved_tflops")
        setting = (f"{row['variant'].upper()} {row['height']}x{row['width']} batch {row['batch']} {row['dtype']} "
                   f"{row['runner']}")
        agreement = row.get("label_agreement") if ok else None
        if not ok:
            footnotes.append(f"{setting}: {status}" + (f" ({row['reason']})" if row.get("reason") else ""))
        elif row.get("output_finite") is False:
            footnotes.append(f"{setting}: non-finite logits (overflow)")
        if agreement is not None and agreement < AGREEMENT_FLOOR:
            footnotes.append(agreement_footnote(setting, agreement))
        ratio = row.get("ratio_to_transformers")
        cells.append([
            row["variant"].upper(),
            f"{row['height']}x{row['width']}",
            str(row["batch"]),
            dtype_cell(row),
            row["runner"] + (" ‡" if row.get("cuda_graph") is False else ""),
            format_number(row.get("images_per_s")) if ok else status,
            format_number(row.get("latency_ms")) if ok else "—",
            format_number(row.get("latency_p90_ms")) if ok else "—",
            format_number(row.get("peak_mem_gb"), 2) if ok else "—",
            f"{ratio:.2f}" if ratio is not None else "—",
            agreement_cell(agreement),
            format_number(row.get("first_call_s")) if ok else "—",
            format_number(tflops, 3 if (tflops or 0) < 1 else None) if ok else "—",
            format_number(row.get("paper_gflops"), 1),
            format_number(row.get("paper_v100_fps"), 1),
        ])
    return header, cells, footnotes


def agreement_percent(agreement: float) -> str:
    """A share 0..1 as a percentage with one decimal, rounded down: "100.0" only where every pixel agrees."""
    return f"{math.floor(agreement * 1000) / 10:.1f}"


def agreement_cell(agreement: float | None) -> str:
    """The "labels = fp32 ref %" cell: "—" where not measured (older results files), "‡" below the floor."""
    if agreement is None:
        return "—"
    return agreement_percent(agreement) + (" ‡" if agreement < AGREEMENT_FLOOR else "")


def agreement_footnote(setting: str, agreement: float) -> str:
    """The footnote of a row whose label agreement is below AGREEMENT_FLOOR."""
    return (f"{setting}: labels agree with the fp32 reference on {agreement_percent(agreement)} % of pixels only: a "
            "speed of a graph that no longer computes the same model (random weights give flat logits, so int8 "
            "agreement is low; see benchmarks/README.md)")


def dtype_cell(row: dict) -> str:
    """The dtype as it ran: "fp32 paper" for the paper's protocol, a "†" where fp32 ran with TF32."""
    text = row["dtype"]
    if row.get("protocol") == "paper":
        text += " paper"
    tf32 = row.get("tf32")
    if row["dtype"] == "fp32" and tf32 and any(tf32.values()):
        text += " †"
    return text


def table_legend(rows: list) -> list:
    """What the columns mean, and which rows the paper's FPS can be compared with."""
    kinds = {row.get("peak_mem_kind") for row in rows}
    interleaved = {bool(row.get("interleaved")) for row in rows}
    legend = ["images/s: batch ÷ median latency of one call (one batch)",
              "1st call s: the first call alone (compilation, autotuning, CUDA graph capture, int8 quantization)",
              "TFLOP/s: achieved, 2 × counted multiply-adds per image × images/s",
              f"labels = fp32 ref %: share of output pixels whose label (argmax of the logits; full-resolution labels "
              f"in paper rows) is the fp32 reference model's on the same inputs; ‡ below {AGREEMENT_FLOOR:.0%}; — not "
              "measured"]
    if any(row.get("interleaved") for row in rows):
        legend.append("interleaved timing: the timed calls of a setting's runners ran in rounds, one call of each "
                      "per round, the round's first runner rotating")
    if "cpu_rss_hwm_increase" in kinds and False in interleaved:
        legend.append("peak RSS Δ GB: rise of the process's resident-set high-water mark over the row, from before "
                      "the input was made (input + activations, not the weights)")
    if "cpu_rss_hwm_increase" in kinds and True in interleaved:
        legend.append("peak RSS Δ GB (interleaved rows): rise of the process's resident-set high-water mark over the "
                      "runner's first call and warm-up calls (activations and what the first call builds, not the "
                      "input or the weights)")
    if "cuda_max_allocated" in kinds:
        legend.append("peak alloc GB: torch.cuda.max_memory_allocated over the row (weights + input + activations)")
    if any(row.get("paper_v100_fps") for row in rows):
        others = [row for row in rows if row.get("paper_v100_fps") and row.get("protocol") != "paper"]
        legend.append("paper V100 FPS: the paper's V100, fp32, batch 1, timed through full-resolution labels "
                      "(mmseg); rows marked \"paper\" follow that protocol (IEEE fp32, batch 1, labels on the host)"
                      + ("; beside the other rows (another device, dtype, batch, or logits only) it is context, "
                         "not a like-for-like comparison" if others else ""))
    if any(row.get("dtype") == "fp32" and row.get("tf32") and any(row["tf32"].values()) for row in rows):
        legend.append("†: fp32 with TF32 (matmuls or cuDNN convs at TF32 precision, torch's flags at the time)")
    if any(row.get("cuda_graph") is False for row in rows):
        legend.append("‡: the engine's CUDA graph of this shape was not captured (plain launches)")
    if any(row.get("status") == "ok" and row.get("label_agreement") is not None
           and row["label_agreement"] < AGREEMENT_FLOOR for row in rows):
        legend.append(f"‡ after a labels %: below the {AGREEMENT_FLOOR:.0%} floor (see the footnote)")
    return legend


def format_table(rows: list) -> str:
    """Plain-text, column-aligned table of ``rows`` for the console (text columns left-aligned, numbers
    right-aligned; without the ``CONSOLE_OMITTED`` columns, which the results file and the README's tables keep),
    its footnotes and its legend wrapped to ``CONSOLE_WIDTH``."""
    header, cells, footnotes = table_rows(rows)
    keep = [index for index, name in enumerate(header) if name not in CONSOLE_OMITTED]
    text_columns = {keep.index(index) for index in TEXT_COLUMNS}
    legend = [line for line in table_legend(rows) if not line.startswith(CONSOLE_OMITTED)]
    wrap = textwrap.TextWrapper(width=CONSOLE_WIDTH, subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join([console_table([header[i] for i in keep], [[row[i] for i in keep] for row in cells],
                                    text_columns)]
                     + [wrap.fill(f"* {note}") for note in footnotes]
                     + [wrap.fill(f"  {line}") for line in legend])


def render_markdown(results: dict) -> str:
    """A markdown table (with a caption naming device, versions, date and settings) of a results JSON object."""
    rows = add_ratios([dict(r) for r in results.get("rows", [])])
    header, cells, footnotes = table_rows(rows)
    versions = results.get("versions", {})
    settings = results.get("settings", {})
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None and k != "segformer_fast")
    caption = (f"{results.get('device', '?')} · {version_text} · {results.get('date', '?')} · "
               f"{settings.get('threads', '?')} torch threads · median of up to {settings.get('repeats', '?')} "
               f"repeats after {settings.get('warmup', '?')} warm-up calls")
    host = results.get("host") or {}
    load, cpus = host.get("loadavg_at_start"), host.get("cpu_count")
    if results.get("device_type") == "cpu" and load and cpus and load[0] > cpus * 0.75:
        caption += f" · busy machine (load average {load[0]:.1f} on {cpus} CPUs at the start)"
    out = [f"_{caption}_", "", markdown_table(header, cells, TEXT_COLUMNS)]
    if footnotes:
        out.append("")
        out += [f"- {note}" for note in footnotes]
    out += [""] + [f"_{line}_  " for line in table_legend(rows)]
    return "\n".join(out).rstrip() + "\n"


def progress_line(row: dict) -> str:
    setting = f"{row['variant']} {row['height']}x{row['width']} batch {row['batch']} {row['dtype']} {row['runner']}"
    if row["status"] != "ok":
        return f"{setting}: {row['status']}" + (f" ({row['reason']})" if row.get("reason") else "")
    memory = row.get("peak_mem_gb")
    memory_text = "—" if memory is None else f"{memory:.2f} GB"
    agreement = row.get("label_agreement")
    agreement_text = "" if agreement is None else f", labels = fp32 ref on {agreement_percent(agreement)} %"
    return (f"{setting}: {row['images_per_s']:.2f} img/s, {row['latency_ms']:.1f} ms median "
            f"(p90 {row['latency_p90_ms']:.1f}, {row['repeats']} repeats), peak mem {memory_text}, "
            f"1st call {row['first_call_s']:.2f} s{agreement_text}"
            + ("" if row.get("output_finite", True) else ", NON-FINITE logits"))


__all__ = ["MEMORY_HEADERS", "COLUMNS", "TEXT_COLUMNS", "CONSOLE_OMITTED", "CONSOLE_WIDTH", "table_rows",
           "agreement_percent", "agreement_cell",
           "agreement_footnote", "dtype_cell", "table_legend", "format_table", "render_markdown", "progress_line"]
