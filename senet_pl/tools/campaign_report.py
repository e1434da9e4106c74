"""The GPU campaign's results: kept as the parts end, written (each part's JSON, campaign.json, campaign.md) and
read back (pytest's counts, the goals for an H200-class GPU as pass/fail)."""

import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from senet_pl.tools.bench import _precision
from senet_pl.tools.process import REPO, run_process

# pytest's last line, e.g. "3 passed, 1 failed, 290 deselected in 12.34s" or "no tests ran in 0.01s"
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?)\b")
GB = 1e9  # the goals' GB: 10^9 bytes


def pytest_counts(stdout: str) -> dict[str, int]:
    """passed, failed, skipped, deselected, error, xfailed and xpassed from pytest's closing line (all 0 if none)."""
    counts = dict.fromkeys(("passed", "failed", "skipped", "deselected", "error", "xfailed", "xpassed"), 0)
    closing = [line for line in stdout.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
    for number, word in _COUNT.findall(closing[-1] if closing else ""):
        counts["error" if word.startswith("error") else word] = int(number)
    return counts


# pytest's section headers, e.g. "===== FAILURES =====" or "===== short test summary info ====="
_SECTION = re.compile(r"^=+ (.+?) =+$")
FAILURES_CHARS = 12_000  # of pytest's FAILURES and ERRORS sections kept in the results


def pytest_failures(stdout: str, limit: int = FAILURES_CHARS) -> str:
    """pytest's FAILURES and ERRORS sections (the tracebacks), at most ``limit`` characters, from their start: a
    run's closing lines (warnings, durations) can be longer than any tail kept, and the first failure matters most."""
    kept, keep = [], False
    for line in stdout.splitlines():
        header = _SECTION.match(line)
        if header:
            keep = header.group(1) in ("FAILURES", "ERRORS")
        if keep:
            kept.append(line)
    text = "\n".join(kept)
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit:,} more characters]"


def _goal(goal: str, target: str, measured: str | None, ok: bool | None) -> dict:
    verdict = "not measured" if ok is None else "pass" if ok else "fail"
    return {"goal": goal, "target": target, "measured": measured or "-", "verdict": verdict}


def _bench_row(results: dict, label: str) -> dict | None:
    rows = results.get("bench", {}).get("rows", [])
    return next((r for r in rows if r["label"] == label and r.get("right")), None)


def goals(results: dict, settings: dict) -> list[dict]:
    """The issue's goals for an H200-class GPU, each with what was measured and pass / fail / not measured."""
    found = []
    fits = [(b, _bench_row(results, f"training, 28x28, batch {b}: fit")) for b in settings["bench_batches"]]
    fits = [(b, r["right"]["images_per_s"]) for b, r in fits if r]
    best = max(fits, key=lambda f: f[1], default=None)
    found.append(_goal(
        "training images/s at 28x28: SE-ResNet-18, fit, bf16, channels_last, the best of batches "
        + "/".join(str(b) for b in settings["bench_batches"]), ">= 50,000 img/s",
        f"{best[1]:,.0f} img/s at batch {best[0]}" if best else None, best[1] >= 50_000 if best else None))
    size, batch = settings["bench_size"], settings["bench_size_batch"]
    row = _bench_row(results, f"training, {size}x{size}, batch {batch}: fit")
    gpu = row["right"].get("gpu_mb") if row else None
    at_goal = size == 224 and batch == 32
    found.append(_goal(
        "peak GPU memory of fit at 224x224, batch 32 (torch.cuda.max_memory_allocated)", "<= 6 GB",
        None if gpu is None else f"{gpu * 2**20 / GB:.2f} GB at {size}x{size}, batch {batch}",
        gpu * 2**20 <= 6 * GB if gpu is not None and at_goal else None))
    for name, title, accuracy, seconds in (("mnist", "MNIST (reduced split)", 0.993, 20),
                                           ("fashion_mnist", "Fashion-MNIST", 0.95, 120)):
        r = results.get(name, {})
        done = r.get("status") == "done"
        found.append(_goal(
            f"{title}: test accuracy of the final weights, and the wall time fit reports",
            f">= {100 * accuracy:g}% in <= {seconds} s",
            f"{100 * r['test_acc']:.2f}% in {r['fit_seconds']:.1f} s ({r['epochs']} epochs)" if done else None,
            r["test_acc"] >= accuracy and r["fit_seconds"] <= seconds if done else None))
    return found


def _last_line(text: str | None) -> str:
    """The last non-empty line of an error (a traceback's: the exception), for a table cell."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1].replace("|", "/") if lines else ""


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _memory(m: dict | None) -> str:
    if not m:
        return "-"
    gpu = f" / GPU {m['gpu_mb']:,.0f} MiB" if m.get("gpu_mb") is not None else ""
    return f"RSS {m['rss_mb']:,.0f} MiB{gpu}"


def _bench(bench: dict) -> list[str]:
    lines = ["| measurement (left vs right) | left img/s | right img/s | right/left | peak memory left | peak memory right |",
             "|---|---:|---:|---:|---|---|"]
    for r in bench.get("rows", []):
        left, right = r.get("left"), r.get("right")
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        lines.append(f"| {r['label']} | {_cell(left and left['images_per_s'])} | {_cell(right and right['images_per_s'])} "
                     f"| {ratio} | {_memory(left)} | {_memory(right)} |")
    errors = [f"- {r['label']}: {_last_line(r['error'])}" for r in bench.get("rows", []) if "error" in r]
    return lines + ([""] + errors if errors else [])


def _tta(results: dict) -> list[str]:
    lines = ["| dataset | status | test accuracy | fit wall time s | whole fit command s | checkpoint writes s | epochs "
             "| steps | training img/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    commands, history = [], []
    for name in ("mnist", "fashion_mnist"):
        r = results.get(name)
        if not r:
            continue
        acc = f"{100 * r['test_acc']:.2f}%" if "test_acc" in r else "-"
        epochs = f"{r['epochs']} of {r['max_epochs']}" if "epochs" in r else "-"
        lines.append(f"| {name} | {r['status']} | {acc} | {_cell(r.get('fit_seconds'))} | {_cell(r.get('fit_command_seconds'))} "
                     f"| {_cell(r.get('checkpoint_seconds'))} | {epochs} | {_cell(r.get('steps'))} | {_cell(r.get('images_per_s'), 0)} |")
        if r.get("val_acc_per_validation"):
            history.append(f"- {name}: " + ", ".join(f"{a:.4f}" for a in r["val_acc_per_validation"]))
        if r.get("commands"):
            commands += [f"# {name}", *r["commands"]]
    return (lines + (["", "val/acc after each validation of fit (held-out images):", *history] if history else [])
            + (["", "```bash", *commands, "```"] if commands else []))


def markdown(summary: dict) -> str:
    """campaign.md: the goals, the parts' status, then each part's figures."""
    parts = summary["parts"]
    state = "finished" if summary["finished"] else "not finished (stopped, or still running)"
    lines = [f"# GPU campaign of {summary['started']}", "",
             f"{summary['device']}, torch {summary['torch']}, lightning {summary['lightning']}, Python {summary['python']}, "
             f"{summary['cpu_count']} CPU threads; training precision {summary['precision']}; commit {summary['commit'] or 'unknown'}. "
             f"{summary['seconds']:.0f} s of a budget of {summary['budget_s']:.0f} s, {state}.", "",
             "Command: `" + " ".join(summary["command"]) + "`", "", "## Goals (for an H200-class GPU)", "",
             "| goal | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {g['measured']} | {g['verdict']} |" for g in summary["goals"]]
    lines += ["", "## Parts", "", "| part | status | seconds | budget s | note |", "|---|---|---:|---:|---|"]
    for name, r in parts.items():
        note = r.get("note") or _last_line(r.get("error"))
        lines.append(f"| {name} | {r['status']} | {_cell(r.get('seconds'), 0)} | {_cell(r.get('budget_s'), 0)} | {note} |")
    if parts.get("gpu_tests", {}).get("counts"):
        t = parts["gpu_tests"]
        counts = ", ".join(f"{n} {k}" for k, n in t["counts"].items() if n) or "no tests"
        lines += ["", "## GPU tests", "", f"`{' '.join(t['command'])}`: {counts} (exit status {t['returncode']})."]
        if t.get("failures"):
            lines += ["", "```text", t["failures"], "```"]
    if parts.get("bench", {}).get("rows"):
        lines += ["", "## Benchmark", "", "One run of each case, each in its own process; img/s of the timed steps "
                  "after warm-up; peak memory: the process's RSS and torch.cuda.max_memory_allocated; a case in several "
                  "rows ran once; each case's options are in bench.json (cuDNN autotuning, when asked for, is off "
                  "for the large training row: it would count the workspaces it tries).", "",
                  *_bench(parts["bench"])]
    if any(parts.get(n, {}).get("commands") or parts.get(n, {}).get("status") not in (None, "skipped")
           for n in ("mnist", "fashion_mnist")):
        lines += ["", "## Time to accuracy", "", "fit, then test of the final weights (`--ckpt_path last`); the fit wall "
                  "time is the one fit reports (from the start of training to its end).", "", *_tta(parts)]
    study = parts.get("study", {})
    if study.get("runs"):
        lines += ["", "## SE vs ResNet study (Fashion-MNIST)", "",
                  f"{study['completed_runs']} of {study['planned_runs']} runs" + (f"; {study['stopped']}" if study.get("stopped") else "") + ".",
                  ""]
        lines += [study["table"]] if study.get("table") else [
            "| model | seed | test accuracy (%) | training images/s |", "|---|---:|---:|---:|",
            *(f"| {r['model']} | {r['seed']} | {100 * r['acc']:.2f} | {r['images_per_s']:.1f} |" for r in study["runs"])]
    return "\n".join(lines) + "\n"


class Campaign:
    """The results so far, and where they go."""

    def __init__(self, out: Path, work: Path, budget_s: float, settings: dict) -> None:
        self.out, self.work, self.budget_s = out, work, budget_s
        self.started = time.monotonic()
        self.results: dict[str, dict] = {}
        self.current: dict = {}  # the running part's result so far
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
        self.info = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "cuda": torch.cuda.is_available(),
            "precision": _precision(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": _version("lightning"),
            "commit": _commit(),
            "cpu_count": os.cpu_count(),
            "budget_s": budget_s,
            "work": str(work),
            "command": ["python", "-m", "senet_pl.tools.campaign", *sys.argv[1:]],
            "settings": settings,
        }

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self, name: str, result: dict) -> None:
        """Write the part's JSON, then campaign.json and campaign.md with every part so far."""
        self.results[name] = result
        _write(self.out / f"{name}.json", json.dumps(result, indent=1))
        self.write_all(finished=None)

    def write_all(self, finished: bool | None) -> None:
        """campaign.json and campaign.md; ``finished``: True at a full end, False at a stopped one, None meanwhile."""
        summary = {**self.info, "seconds": time.monotonic() - self.started, "finished": bool(finished),
                   "goals": goals(self.results, self.info["settings"]), "parts": self.results}
        _write(self.out / "campaign.json", json.dumps(summary, indent=1))
        _write(self.out / "campaign.md", markdown(summary))
        if finished is not None:  # the end: no half-written file of a write that a signal cut short stays behind
            for partial in self.out.glob(".*.partial"):
                partial.unlink()


def _write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text + "\n")
    partial.replace(path)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _commit() -> str | None:
    found = run_process(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=10) if (REPO / ".git").exists() else None
    return found.stdout.strip() if found is not None and found.returncode == 0 else None
