"""Run the model corpus (tests/corpus) and print its coverage and results as a Markdown table.

    python tools/corpus_table.py            # print the table (the fast entries)
    python tools/corpus_table.py --slow     # include the model over 2 GB (needs ~8 GB of memory)
    python tools/corpus_table.py --readme   # also write it into README.md between the corpus-table markers

Every figure comes from the same runs tests/test_corpus.py checks: inspect and the default method
through the command line, magnitude and 2:4 through the API, at sparsity 0.5, with each model's own
calibration generator. No torch is needed: the torch-exported models are committed files.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from onnx_lobs import __version__  # noqa: E402
from tests.corpus import ENTRIES  # noqa: E402
from tests.corpus.run import run_entry  # noqa: E402

BEGIN, END = "<!-- corpus-table:begin -->", "<!-- corpus-table:end -->"
def _reason(text: str) -> str:
    """The tool's own reason, shortened only where it carries advice for the command line."""
    if text.startswith("default exclusion"):
        return "default exclusion (first layer, few inputs)"
    return text.removesuffix(", not a constant")


def _skips(o) -> str:
    counts = Counter(f"{s['op']}: {_reason(s['reason'])}" for s in o.inspect["skipped"])
    counts.update(f"{r['op']}: {_reason(r['skipped'])}" for r in o.lobs.report["layers"]
                  if r["skipped"] and r["skipped"].startswith("default exclusion"))
    return "; ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def _pattern(o) -> str:
    pruned = len(o.nm.pruned())
    ok = "ok" if not o.nm.problems and not o.nm_violations and pruned else "**fails**"
    undivided = sum(1 for r in o.nm.report["layers"] if r["skipped"] and "2:4" in r["skipped"])
    return f"{ok}: {pruned} pruned" + (f", {undivided} not divisible by 4" if undivided else "")


def row(entry, folder: str) -> str:
    cells = [f"`{entry.name}`", entry.source]
    try:
        o = run_entry(entry, folder)
    except Exception as e:  # shown in the table, not hidden
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split("error: ")[-1].replace(folder + os.sep, "")
        return "| " + " | ".join(cells + ["", entry.ops, f"**fails**: {first[:160]}", "", "", ""]) + " |"
    found = len(o.inspect["layers"])
    pruned = len(o.lobs.pruned())
    good = o.lobs.rel_l2 < o.magnitude.rel_l2 and not o.lobs.problems and not o.magnitude.problems
    fid = f"{o.lobs.rel_l2:.3f} / {o.magnitude.rel_l2:.3f}" + ("" if good else " **(fails)**")
    cells += [str(o.opset), entry.ops, f"{found} / {pruned} / {_skips(o)}", fid, _pattern(o), f"{o.seconds:.1f}"]
    return "| " + " | ".join(cells) + " |"


def table(slow: bool) -> str:
    lines = ["| model | exporter / source | opset | covers | layers found / pruned / skipped (reason) | "
             "held-out rel. L2: lobs / magnitude | 2:4 | s |",
             "|---|---|---|---|---|---|---|---|"]
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corpus-") as folder:
        for entry in ENTRIES:
            if entry.slow and not slow:
                continue
            lines.append(row(entry, folder))
            print(lines[-1], file=sys.stderr)
    import onnxruntime
    lines.append("")
    lines.append(f"Sparsity 0.5 with the command line's defaults (0.2: overall, allocated by output, method auto; "
                 f"0.1: per layer, method lobs) and per layer with magnitude; relative L2 error "
                 f"of all outputs against the dense model on each model's held-out samples (one in ten). "
                 f"Weights are random, calibration inputs synthetic (tests/corpus). "
                 f"Produced by `python tools/corpus_table.py{' --slow' if slow else ''}` in "
                 f"{time.perf_counter() - t:.0f} s on {platform.machine()}, onnx-lobs {__version__}, "
                 f"onnxruntime {onnxruntime.__version__}.")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"README.md has no {BEGIN} ... {END} markers")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", readme,
                 count=1, flags=re.S)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="include the model over 2 GB")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    text = table(args.slow)
    print(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
