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
from stages.tools.check_dataset import CheckConfig, check_dataset
from stages.downstream.evaluate import EvaluateConfig, evaluate
from stages.extract.extract import ExtractConfig, extract
from stages.tools.inspect import plot_entry, plot_student
from stages.student.pretrain import PretrainConfig, pretrain
from stages.tools.runs import find_runs, run_row
from stages.tools.runs import table_lines as runs_table
from stages.downstream.segment import SegmentConfig, train_segmentation
from stages.student.samples import SampleConfig
from stages.student.train import TrainConfig

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
    folders = {fmt: cfg.data / f"synth-{fmt}" for _, fmt, *_ in RIGS}
    roots = {name: folders[fmt] for name, fmt, *_ in RIGS}

    _say("1/6 synthetic datasets in the nuScenes, SemanticKITTI and PandaSet formats")
    for fmt, folder in folders.items():
        stamp = folder / ".done"
        if stamp.exists():
            print(f"{folder}: already there, reused")
            continue
        print(generate(fmt, folder, SynthConfig(seed=cfg.seed)))
        stamp.touch()

    _say("2/6 dataset check and projection overlays")
    for name, _, train, _ in RIGS:
        report = check_dataset(CheckConfig(name, roots[name], train, plot_dir=cfg.out / "projection"))
        print("\n".join(report.lines()[:3]))

    _say(f"3/6 teacher features, extracted once per rig ({cfg.teacher}, RANDOM INIT: the demo downloads nothing)")
    stores = {}
    for name, _, train, _ in RIGS:
        path = cfg.stores / f"{name}-{train}-{cfg.teacher}.zarr"
        existed = path.exists()
        stores[name] = extract(ExtractConfig(name, roots[name], train, cfg.teacher, path, random_init=True, seed=cfg.seed, num_workers=2))
        print(f"{path}: {'resumed/reused' if existed else 'extracted'}, {sum(r['count'] for r in stores[name].manifest().to_pylist()):,} points with targets")

    _say(f"4/6 pretraining {cfg.student} on the mix of the four lidars (cached targets only)")
    distilled = cfg.runs / f"demo-{cfg.student}-distilled"
    pre = PretrainConfig(tuple(s.path for s in stores.values()), distilled, cfg.student).resolved()
    pre = dataclasses.replace(pre, optim=dataclasses.replace(pre.optim, warmup_iters=10), train=TrainConfig(batch_size=cfg.batch_size, epochs=cfg.pretrain_epochs, seed=cfg.seed, log_every=1))
    print(f"{distilled}: {pretrain(pre)}")
    untrained = cfg.runs / f"demo-{cfg.student}-random-init"
    pretrain(dataclasses.replace(pre, out=untrained, train=dataclasses.replace(pre.train, max_steps=0)))  # the same student, untrained

    _say("5/6 linear probing per rig: distilled student vs the same student at random init")
    def crop(seg: SegmentConfig) -> SampleConfig:  # the dataset's released grid; training crops keep the CPU demo short, evaluation sees whole scans
        return dataclasses.replace(seg.sample, max_points=cfg.downstream_points)

    results = {}
    for name, _, train, val in RIGS:
        row = {}
        for label, run in (("random-init", untrained), ("distilled", distilled)):
            probe = SegmentConfig.for_mode("probe", dataset=name, root=roots[name], split=train, out=cfg.runs / f"{run.name}-probe-{name}", checkpoint=run / "checkpoints/last.pt")
            probe = dataclasses.replace(probe, train=dataclasses.replace(probe.train, epochs=cfg.probe_epochs, batch_size=cfg.batch_size, log_every=1), warmup_epochs=1, sample=crop(probe))
            ckpt = train_segmentation(probe)["checkpoint"]
            row[label] = evaluate(EvaluateConfig(name, roots[name], Path(ckpt), split=val))["miou"]
        if cfg.scratch:
            scratch = SegmentConfig.for_mode("scratch", dataset=name, root=roots[name], split=train, out=cfg.runs / f"demo-{cfg.student}-scratch-{name}", student=cfg.student)
            scratch = dataclasses.replace(scratch, train=dataclasses.replace(scratch.train, epochs=cfg.probe_epochs, batch_size=cfg.batch_size, log_every=1), warmup_epochs=1, sample=crop(scratch))
            row["scratch"] = evaluate(EvaluateConfig(name, roots[name], Path(train_segmentation(scratch)["checkpoint"]), split=val))["miou"]
        results[name] = row

    _say("6/6 pictures of the cached targets and of the students")
    figures = []
    for name, _, train, _ in RIGS:
        store = stores[name]
        first = store.manifest().to_pylist()[0]
        figures += plot_entry(store, first["scan_id"], None, cfg.out / "features")  # every camera
        for run in (distilled, untrained):
            figures += plot_student(run / "checkpoints/last.pt", name, roots[name], train, first["scan_id"], None, cfg.out / "features")
    shutil.copy(distilled / "loss.png", cfg.out / "pretraining-loss.png")

    lines = table(results, cfg)
    (cfg.out / "results.txt").write_text("\n".join(lines) + "\n")
    (cfg.out / "results.json").write_text(json.dumps({"miou": results, "config": dataclasses.asdict(cfg)}, indent=2, default=str))
    print("\n".join(lines))
    runs = [run_row(r) for r in find_runs([cfg.runs])]
    print("\nRuns (`scalr runs " + str(cfg.runs) + " --plot runs.png`):\n" + "\n".join(runs_table(runs)))
    print(f"\nfigures: {cfg.out}/ (projection/, features/, pretraining-loss.png); results: {cfg.out}/results.txt; {time.time() - t0:.0f} s")
    first = RIGS[0][0]
    print(
        f"\nLook at the cached features live (click a point: its similarity to every other point, in 3D and on the image):\n"
        f"  make view STORE={stores[first].path} VIEW_FLAGS=\"--checkpoint {distilled / 'checkpoints/last.pt'}\"\n"
        f"  (or: scalr view {stores[first].path} --checkpoint {distilled / 'checkpoints/last.pt'}, with .venv/bin on PATH)\n"
        f"  then open http://127.0.0.1:8080 (from another machine: ssh -L 8080:localhost:8080 <this host>)"
    )
    return results


def table(results: dict, cfg: DemoConfig) -> list[str]:
    header = f"{'linear probing mIoU %':<24}{'random-init':>13}{'distilled':>11}{'gap':>8}" + (f"{'from scratch*':>15}" if cfg.scratch else "")
    lines = [f"Synthetic rigs, {cfg.student} pretrained on all rigs together with ScaLR from a random-init {cfg.teacher}:", header]
    for name, row in results.items():
        line = f"{name + ' rig (val)':<24}{100 * row['random-init']:>13.1f}{100 * row['distilled']:>11.1f}{100 * (row['distilled'] - row['random-init']):>+8.1f}"
        if "scratch" in row:
            line += f"{100 * row['scratch']:>15.1f}"
        lines.append(line)
    if cfg.scratch:
        lines.append("* supervised from scratch, all weights trained on the labels: a reference, not a probe")
    lines.append("A random-init teacher has little to teach: use real weights (README) for the paper's gains.")
    return lines
