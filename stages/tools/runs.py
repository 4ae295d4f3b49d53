"""Runs side by side: one table of what each run trained, on what, how far, and how well, and
one figure of their loss curves. A run folder is one with `config.json` (written by every
training stage); its evaluations are the `eval-*.json` files in or under it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.errors import ConfigError, PathError
from stages.student.train import what_is_trained
from stages.student.waffleiron import param_count_closed_form
from storage.runs import RunFolder


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders among `paths`: a folder with config.json, or every such folder under one."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise PathError(path, "no such run or folder")
        found = [path] if RunFolder(path).is_run() else sorted(p.parent for p in path.rglob("config.json"))
        if not found:
            raise PathError(path, "no run (a folder with config.json) in or under it")
        runs += [r for r in found if r not in runs]
    return runs


def _metrics(run: Path) -> list[dict]:
    path = RunFolder(run).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_row(run: Path) -> dict:
    """What a table row says about one run."""
    record = json.loads(RunFolder(run).record.read_text())
    cfg = record.get("config", {})
    model = cfg.get("model") or {}
    stores = record.get("stores") or []
    metrics = _metrics(run)
    evals = []
    for path in sorted(run.rglob("eval-*.json")):
        result = json.loads(path.read_text())
        evals.append((result.get("miou"), f"{result.get('dataset')} {result.get('split')}"))
    best = max((e for e in evals if e[0] is not None), default=(None, ""))
    if stores:
        datasets = sorted({f"{s['dataset']['name']}/{s['dataset']['split']}" for s in stores})
    elif isinstance(record.get("dataset"), dict):
        datasets = [f"{record['dataset']['name']}/{record['dataset'].get('split', '')}"]
    else:
        datasets = []
    return {
        "run": str(run),
        "stage": record.get("stage", "?"),
        "recipe": cfg.get("recipe") or "-",  # cvpr or scalr-plus ("-": before recipes, or a teacher's probe)
        "student": f"WI-{model['depth']}-{model['width']}"
        if model.get("width")
        else cfg.get("student", "-"),  # what was built, preset or not; "-": a teacher (probe-store)
        "parameters": param_count_closed_form(model["width"], model["depth"], model.get("in_channels", 5))
        if model.get("width")
        else None,
        "teachers": sorted({s["teacher"]["name"] for s in stores}),
        "stores": [s["path"] for s in stores],
        "datasets": datasets,
        "pretrained": record.get("pretrained"),
        "steps": metrics[-1]["step"] if metrics else 0,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "best_miou": best[0],
        "best_miou_on": best[1],
        "wall_s": (metrics[-1]["time"] - metrics[0]["time"]) if len(metrics) > 1 and "time" in metrics[0] else None,
        "losses": [(m["step"], m["loss"]) for m in metrics],
        "seed": cfg["train"].get("seed") if isinstance(cfg.get("train"), dict) else cfg.get("seed"),
        "group": seed_group(record),
    }


def seed_group(record: dict) -> str:
    """What makes runs one experiment but for their seed: the settings that decide what is trained
    (stages/student/train.what_is_trained) without the seed, and in place of a pretrained
    checkpoint's path, its run's own group (probes of pretrainings that differ only in seed group
    together)."""
    what = what_is_trained(record)
    what.pop("train.seed", None)
    what.pop("seed", None)  # probe-store's
    checkpoint = what.pop("checkpoint", None)
    if checkpoint:
        parent = RunFolder.of_checkpoint(checkpoint)
        what["pretrained"] = seed_group(json.loads(parent.record.read_text())) if parent.is_run() else str(checkpoint)
    return json.dumps(what, sort_keys=True, default=str)


def seed_lines(rows: list[dict]) -> list[str]:
    """Mean +- std (sample) and n of the final loss and best mIoU of runs that differ only in seed."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    lines = []
    for members in groups.values():
        if len({r["seed"] for r in members}) < 2:
            continue
        names = sorted(Path(r["run"]).name for r in members)
        what = f"{members[0]['stage']} {members[0]['student']}, seeds {', '.join(str(r['seed']) for r in members)}"
        lines.append(f"{what} ({_fit(' '.join(names), 60)}): " + ", ".join(
            f"{label} {_mean_std([r[key] for r in members], scale)}" for label, key, scale in
            (("final loss", "final_loss", 1.0), ("best mIoU", "best_miou", 100.0))
        ))  # fmt: skip
    return (["runs that differ only in seed (mean +- std, n):"] + [f"  {line}" for line in lines]) if lines else []


def _mean_std(values: list, scale: float) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} +- {std:.2g} (n={len(values)})"


def table_lines(rows: list[dict]) -> list[str]:
    header = (
        f"{'run':<42}{'stage':<12}{'recipe':<11}{'student':<12}{'params':>9}  {'teachers / pretrained':<28}"
        f"{'datasets':<42}"
        f"{'steps':>7}{'loss':>9}{'best mIoU':>11}{'wall':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        source = ", ".join(r["teachers"]) or (RunFolder.of_checkpoint(r["pretrained"]).name if r["pretrained"] else "-")
        params = (
            "-"
            if not r["parameters"]
            else f"{r['parameters'] / 1e6:.2f}M"
            if r["parameters"] >= 1e5
            else f"{r['parameters'] / 1e3:.1f}k"
        )
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        miou = f"{100 * r['best_miou']:.1f}" if r["best_miou"] is not None else "-"
        wall = f"{r['wall_s'] / 60:.1f}m" if r["wall_s"] is not None else "-"
        lines.append(
            f"{_fit(Path(r['run']).name, 41):<42}{r['stage']:<12}{r['recipe']:<11}{r['student']:<12}{params:>9}  "
            f"{_fit(source, 27):<28}{_fit(_datasets(r['datasets']), 41):<42}{r['steps']:>7}{loss:>9}{miou:>11}{wall:>8}"
        )
    return lines + seed_lines(rows)


def _datasets(names: list[str]) -> str:
    """One dataset as name/split; several (a pretraining mix) as their names joined by +."""
    return names[0] if len(names) == 1 else "+".join(n.split("/")[0] for n in names)


def _fit(text: str, width: int) -> str:
    """`text` in `width` characters, cut in the middle: run names differ at their ends."""
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return text[:head] + "..." + text[len(text) - (width - 3 - head) :]


def plot_losses(rows: list[dict], out: Path) -> Path:
    """Every run's loss curve on one figure (log scale when the losses span a decade)."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    values = []
    for r in rows:
        if r["losses"]:
            steps, losses = zip(*r["losses"])
            ax.plot(
                steps, losses, marker="o", markersize=3, label=f"{Path(r['run']).name} ({r['stage']}, {r['student']})"
            )
            values += losses
    if not values:
        raise ConfigError("no run has a metrics.jsonl with losses to plot")
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss of each run")
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
