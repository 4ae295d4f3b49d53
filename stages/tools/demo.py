"""demo: the whole method on the built-in synthetic data, in minutes on a laptop CPU.

Four lidars (nuScenes-format: 6 cameras, 32 beams; SemanticKITTI-format: 1 camera, 64 beams;
PandaSet-format: a 64-beam spinning lidar with 6 cameras and a forward lidar with the front camera)
-> check and projection overlays -> teacher features extracted once per rig (random-init teacher,
recorded as such) -> one student pretrained on the mix of rigs -> linear probes of the distilled
student and of the same student untrained, per rig (+ a supervised-from-scratch reference) ->
a results table in the paper's style and every figure in one folder. Each step reuses what a
previous run left (datasets, stores, checkpoints), and says so.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.synth import SynthConfig, generate
from stages.downstream.evaluate import EvaluateConfig, evaluate
from stages.downstream.segment import SegmentConfig, train_segmentation
from stages.extract.extract import ExtractConfig, extract
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.train import TrainConfig
from stages.tools.check_dataset import CheckConfig, check_dataset
from stages.tools.pictures import plot_entry, plot_student
from stages.tools.runs import find_runs, run_row
from stages.tools.runs import table_lines as runs_table
from storage.feature_store import FeatureStore
from storage.runs import RunFolder

# (dataset, synthetic format, train split, validation split): four lidars; PandaSet's two sensors
# come from the same synthetic PandaSet-format folder.
RIGS = (
    ("nuscenes", "nuscenes", "mini_train", "mini_val"),
    ("semantickitti", "semantickitti", "train", "val"),
    ("pandar64", "pandaset", "train", "val"),
    ("pandargt", "pandaset", "train", "val"),
)


@dataclass(frozen=True)
class DemoConfig:
    data: Path = Path("data")
    stores: Path = Path("stores")
    runs: Path = Path("runs")
    out: Path = Path("out/demo")
    teacher: str = "test-vit"
    student: str = "WI-12-64"
    seed: int = 0
    pretrain_epochs: int = 8
    probe_epochs: int = 10
    batch_size: int = 4
    scratch: bool = True  # also train the student from scratch with labels (reference)
    downstream_points: int = 20000  # training crop of probes/scratch runs (evaluation: whole scans)


def _say(step: str) -> None:
    print(f"\n=== {step}", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    roots = synthetic_datasets(cfg)
    check_datasets(cfg, roots)
    stores = extract_stores(cfg, roots)
    distilled, untrained = pretrain_students(cfg, stores)
    results = probe_students(cfg, roots, distilled, untrained)
    _say("6/6 pictures of the cached targets and of the students")
    for name, _, train, _ in RIGS:
        store = stores[name]
        first = store.manifest().to_pylist()[0]
        plot_entry(store, first["scan_id"], None, cfg.out / "features")  # every camera
        for run in (distilled, untrained):
            plot_student(run.checkpoint, name, roots[name], train, first["scan_id"], None, cfg.out / "features")
    shutil.copy(distilled.loss_plot, cfg.out / "pretraining-loss.png")
    report(cfg, results, stores, distilled, time.time() - t0)
    return results


def synthetic_datasets(cfg: DemoConfig) -> dict[str, Path]:
    """dataset -> its synthetic root, written unless a previous run left it (a stamp says so)."""
    _say("1/6 synthetic datasets in the nuScenes, SemanticKITTI and PandaSet formats")
    folders = {fmt: cfg.data / f"synth-{fmt}" for _, fmt, *_ in RIGS}
    for fmt, folder in folders.items():
        stamp = folder / ".done"
        if stamp.exists():
            print(f"{folder}: already there, reused")
            continue
        print(generate(fmt, folder, SynthConfig(seed=cfg.seed), overwrite=True))  # no stamp: an interrupted write
        stamp.touch()
    return {name: folders[fmt] for name, fmt, *_ in RIGS}


def check_datasets(cfg: DemoConfig, roots: dict[str, Path]) -> None:
    _say("2/6 dataset check and projection overlays")
    for name, _, train, _ in RIGS:
        report = check_dataset(CheckConfig(name, roots[name], train, plot_dir=cfg.out / "projection"))
        print("\n".join(report.lines()[:3]))


def extract_stores(cfg: DemoConfig, roots: dict[str, Path]) -> dict[str, FeatureStore]:
    _say(f"3/6 teacher features, extracted once per rig ({cfg.teacher}, RANDOM INIT: the demo downloads nothing)")
    stores = {}
    for name, _, train, _ in RIGS:
        path = cfg.stores / f"{name}-{train}-{cfg.teacher}.zarr"
        existed = path.exists()
        ecfg = ExtractConfig(
            name, roots[name], train, cfg.teacher, path, random_init=True, seed=cfg.seed, num_workers=2
        )
        stores[name] = extract(ecfg)
        points = sum(r["count"] for r in stores[name].manifest().to_pylist())
        print(f"{path}: {'resumed/reused' if existed else 'extracted'}, {points:,} points with targets")
    return stores


def pretrain_students(cfg: DemoConfig, stores: dict[str, FeatureStore]) -> tuple[RunFolder, RunFolder]:
    """(the student distilled on the mix of rigs, the same student untrained)."""
    _say(f"4/6 pretraining {cfg.student} on the mix of the four lidars (cached targets only)")
    distilled = RunFolder(cfg.runs / f"demo-{cfg.student}-distilled")
    pre = PretrainConfig(tuple(s.path for s in stores.values()), distilled.path, cfg.student).resolved()
    train = TrainConfig(batch_size=cfg.batch_size, epochs=cfg.pretrain_epochs, seed=cfg.seed, log_every=1)
    pre = dataclasses.replace(pre, optim=dataclasses.replace(pre.optim, warmup_iters=10), train=train)
    print(f"{distilled.path}: {pretrain(pre)}")
    untrained = RunFolder(cfg.runs / f"demo-{cfg.student}-random-init")
    pretrain(dataclasses.replace(pre, out=untrained.path, train=dataclasses.replace(pre.train, max_steps=0)))
    return distilled, untrained


def probe_students(cfg: DemoConfig, roots: dict[str, Path], distilled: RunFolder, untrained: RunFolder) -> dict:
    """Per rig: the validation mIoU of a linear probe of each student (and of the reference)."""
    _say("5/6 linear probing per rig: distilled student vs the same student at random init")
    results = {}
    for name, _, train, val in RIGS:
        row = {}
        for label, run in (("random-init", untrained), ("distilled", distilled)):
            out = cfg.runs / f"{run.name}-probe-{name}"
            probe = SegmentConfig.for_mode(
                "probe", dataset=name, root=roots[name], split=train, out=out, checkpoint=run.checkpoint
            )
            row[label] = trained_miou(cfg, probe, roots[name], val)
        if cfg.scratch:
            out = cfg.runs / f"demo-{cfg.student}-scratch-{name}"
            scratch = SegmentConfig.for_mode(
                "scratch", dataset=name, root=roots[name], split=train, out=out, student=cfg.student
            )
            row["scratch"] = trained_miou(cfg, scratch, roots[name], val)
        results[name] = row
    return results


def trained_miou(cfg: DemoConfig, seg: SegmentConfig, root: Path, val: str) -> float:
    """Train `seg` for the demo's epochs on short crops (the dataset's released grid; the crop keeps
    the CPU demo short, evaluation sees whole scans) and return its validation mIoU."""
    train = dataclasses.replace(seg.train, epochs=cfg.probe_epochs, batch_size=cfg.batch_size, log_every=1)
    sample = dataclasses.replace(seg.sample, max_points=cfg.downstream_points)
    seg = dataclasses.replace(seg, train=train, warmup_epochs=1, sample=sample)
    checkpoint = Path(train_segmentation(seg)["checkpoint"])
    return evaluate(EvaluateConfig(seg.dataset, root, checkpoint, split=val))["miou"]


def report(
    cfg: DemoConfig, results: dict, stores: dict[str, FeatureStore], distilled: RunFolder, seconds: float
) -> None:
    """The results table (also in OUT/results.txt and .json), the runs table and how to look further."""
    lines = table(results, cfg)
    (cfg.out / "results.txt").write_text("\n".join(lines) + "\n")
    (cfg.out / "results.json").write_text(
        json.dumps({"miou": results, "config": dataclasses.asdict(cfg)}, indent=2, default=str)
    )
    print("\n".join(lines))
    runs = [run_row(r) for r in find_runs([cfg.runs])]
    print("\nRuns (`scalr runs " + str(cfg.runs) + " --plot runs.png`):\n" + "\n".join(runs_table(runs)))
    print(
        f"\nfigures: {cfg.out}/ (projection/, features/, pretraining-loss.png); results: {cfg.out}/results.txt; "
        f"{seconds:.0f} s"
    )
    store = stores[RIGS[0][0]].path
    print(
        "\nLook at the cached features live (click a point: its similarity to every other point, in 3D and on "
        "the image):\n"
        f'  make view STORE={store} VIEW_FLAGS="--checkpoint {distilled.checkpoint}"\n'
        f"  (or: scalr view {store} --checkpoint {distilled.checkpoint}, with .venv/bin on PATH)\n"
        f"  then open http://127.0.0.1:8080 (from another machine: ssh -L 8080:localhost:8080 <this host>)"
    )


def table(results: dict, cfg: DemoConfig) -> list[str]:
    header = f"{'linear probing mIoU %':<24}{'random-init':>13}{'distilled':>11}{'gap':>8}" + (
        f"{'from scratch*':>15}" if cfg.scratch else ""
    )
    lines = [
        f"Synthetic rigs, {cfg.student} pretrained on all rigs together with ScaLR from a random-init {cfg.teacher}:",
        header,
    ]
    for name, row in results.items():
        untrained, distilled = 100 * row["random-init"], 100 * row["distilled"]
        line = f"{name + ' rig (val)':<24}{untrained:>13.1f}{distilled:>11.1f}{distilled - untrained:>+8.1f}"
        if "scratch" in row:
            line += f"{100 * row['scratch']:>15.1f}"
        lines.append(line)
    if cfg.scratch:
        lines.append("* supervised from scratch, all weights trained on the labels: a reference, not a probe")
    lines.append("A random-init teacher has little to teach: use real weights (README) for the paper's gains.")
    return lines
