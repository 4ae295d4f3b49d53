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
from stages.downstream.probe_store import ProbeStoreConfig, probe_store
from stages.downstream.segment import SegmentConfig, train_segmentation
from stages.extract.extract import ExtractConfig, extract
from stages.student.pretrain import PretrainConfig, pretrain
from stages.tools.check_dataset import CheckConfig, check_dataset
from stages.tools.pictures import plot_entry, plot_student
from stages.tools.runs import find_runs, run_row
from stages.tools.runs import table_lines as runs_table
from storage.feature_store import FeatureStore
from storage.runs import RunFolder

# (dataset, synthetic format, train split, validation split): four lidars; PandaSet's two sensors
# come from the same synthetic PandaSet-format folder.
ORACLE = "oracle"  # the teacher that knows the classes (synthetic rigs only): the path's upper bound
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
    recipe: str = "cvpr"  # the released recipe of every step (stages/recipes.py)
    precision: str = "fp32"  # of training and evaluation: bf16 autocast (ScaLR+'s) is emulated, slowly, on most CPUs

    @property
    def tag(self) -> str:
        """Names of the stores and runs of a recipe other than cvpr carry it (they never mix)."""
        return "" if self.recipe == "cvpr" else f"-{self.recipe}"


def _say(step: str) -> None:
    print(f"\n=== {step}", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    roots = synthetic_datasets(cfg)
    check_datasets(cfg, roots)
    teachers = f"{cfg.teacher} (RANDOM INIT: the demo downloads nothing) and the oracle"
    _say(f"3/7 teacher features, extracted once per rig: {teachers}")
    stores = extract_stores(cfg, roots, cfg.teacher)
    oracle_stores = extract_stores(cfg, roots, ORACLE)
    _say(f"4/7 pretraining {cfg.student} on the mix of the four lidars (cached targets only), from each teacher")
    distilled = pretrain_student(cfg, stores, "distilled")
    untrained = pretrain_student(cfg, stores, "random-init", max_steps=0)  # the same student, untrained
    oracle_student = pretrain_student(cfg, oracle_stores, "oracle")
    results = probe_students(cfg, roots, {"random-init": untrained, "distilled": distilled, "oracle": oracle_student})
    _say("6/7 what the oracle can teach: probe-store on its own stores")
    for name, row in results.items():
        row["oracle-store"] = oracle_probe_store(cfg, roots, oracle_stores, name)
    _say("7/7 pictures of the cached targets and of the students")
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
    _say("1/7 synthetic datasets in the nuScenes, SemanticKITTI and PandaSet formats")
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
    _say("2/7 dataset check and projection overlays")
    for name, _, train, _ in RIGS:
        report = check_dataset(CheckConfig(name, roots[name], train, plot_dir=cfg.out / "projection"))
        print("\n".join(report.lines()[:3]))


def extract_stores(
    cfg: DemoConfig, roots: dict[str, Path], teacher: str, split: int = 2, rigs=RIGS
) -> dict[str, FeatureStore]:
    """rig -> the store of `teacher` on its training split (`split` 2: RIGS' column; 3: validation)."""
    stores = {}
    for rig in rigs:
        name, path = rig[0], cfg.stores / f"{rig[0]}-{rig[split]}-{teacher}{cfg.tag}.zarr"
        existed = path.exists()
        ecfg = ExtractConfig(
            name,
            roots[name],
            rig[split],
            teacher,
            path,
            random_init=True,
            seed=cfg.seed,
            num_workers=2,
            recipe=cfg.recipe,
        )
        stores[name] = extract(ecfg)
        points = sum(r["count"] for r in stores[name].manifest().to_pylist())
        print(f"{path}: {'resumed/reused' if existed else 'extracted'}, {points:,} points with targets")
    return stores


def pretrain_student(
    cfg: DemoConfig, stores: dict[str, FeatureStore], label: str, max_steps: int | None = None
) -> RunFolder:
    """The demo's student pretrained on the mix of rigs from `stores` (`max_steps` 0: untrained)."""
    run = RunFolder(cfg.runs / f"demo-{cfg.student}{cfg.tag}-{label}")
    pre = PretrainConfig.preset([s.path for s in stores.values()], run.path, cfg.student, cfg.recipe)
    train = dataclasses.replace(
        pre.train,
        batch_size=cfg.batch_size,
        epochs=cfg.pretrain_epochs,
        seed=cfg.seed,
        log_every=1,
        max_steps=max_steps,
        precision=cfg.precision,
    )
    pre = dataclasses.replace(pre, optim=dataclasses.replace(pre.optim, warmup_iters=10), train=train)
    print(f"{run.path}: {pretrain(pre)}")
    return run


def probe_students(cfg: DemoConfig, roots: dict[str, Path], students: dict[str, RunFolder]) -> dict:
    """Per rig: the validation mIoU of a linear probe of each student (and of the reference)."""
    _say("5/7 linear probing per rig: the student at random init, distilled from each teacher")
    results = {}
    for name, _, train, val in RIGS:
        row = {}
        for label, run in students.items():
            out = cfg.runs / f"{run.name}-probe-{name}"
            probe = SegmentConfig.for_mode(
                "probe", cfg.recipe, dataset=name, root=roots[name], split=train, out=out, checkpoint=run.checkpoint
            )
            row[label] = trained_miou(cfg, probe, roots[name], val)
        if cfg.scratch:
            out = cfg.runs / f"demo-{cfg.student}{cfg.tag}-scratch-{name}"
            scratch = SegmentConfig.for_mode(
                "scratch", cfg.recipe, dataset=name, root=roots[name], split=train, out=out, student=cfg.student
            )
            row["scratch"] = trained_miou(cfg, scratch, roots[name], val)
        results[name] = row
    return results


def oracle_probe_store(cfg: DemoConfig, roots: dict[str, Path], train: dict[str, FeatureStore], name: str) -> float:
    """The oracle's linear-probe mIoU on a rig's validation points, from its stores alone."""
    (val,) = extract_stores(cfg, {name: roots[name]}, ORACLE, split=3, rigs=[r for r in RIGS if r[0] == name]).values()
    out = cfg.runs / f"demo-oracle{cfg.tag}-probe-store-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a run is written whole: redone on a rerun (seconds)
    return probe_store(ProbeStoreConfig((train[name].path,), (val.path,), name, roots[name], out))["miou"]


def trained_miou(cfg: DemoConfig, seg: SegmentConfig, root: Path, val: str) -> float:
    """Train `seg` for the demo's epochs on short crops (the dataset's released grid; the crop keeps
    the CPU demo short, evaluation sees whole scans) and return its validation mIoU."""
    train = dataclasses.replace(
        seg.train, epochs=cfg.probe_epochs, batch_size=cfg.batch_size, log_every=1, precision=cfg.precision
    )
    sample = dataclasses.replace(seg.sample, max_points=cfg.downstream_points)
    seg = dataclasses.replace(seg, train=train, warmup_epochs=1, sample=sample)
    checkpoint = Path(train_segmentation(seg)["checkpoint"])
    return evaluate(EvaluateConfig(seg.dataset, root, checkpoint, split=val, precision=cfg.precision))["miou"]


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
    """The probes' validation mIoU per rig: the student untrained, distilled from the random ViT and
    from the oracle (with their gains over untrained), the oracle's own probe-store mIoU, and the
    supervised reference."""
    columns = (("random-init", 13), ("distilled", 11), ("gap", 8), ("oracle", 9), ("gap", 8), ("oracle store", 14))
    header = f"{'linear probing mIoU %':<24}" + "".join(f"{name:>{width}}" for name, width in columns)
    header += f"{'from scratch*':>15}" if cfg.scratch else ""
    method = "ScaLR" if cfg.recipe == "cvpr" else "ScaLR+"
    lines = [f"Synthetic rigs, {cfg.student} pretrained on all rigs together with {method}, from each teacher:", header]
    for name, row in results.items():
        value = {k: 100 * v for k, v in row.items() if v is not None}
        base = value["random-init"]
        cells = [
            f"{base:>13.1f}",
            _cell(value, "distilled", 11),
            _gap(value, "distilled", base),
            _cell(value, "oracle", 9),
            _gap(value, "oracle", base),
            _cell(value, "oracle-store", 14),
        ]
        lines.append(
            f"{name + ' rig (val)':<24}" + "".join(cells) + (_cell(value, "scratch", 15) if cfg.scratch else "")
        )
    lines.append(
        f"distilled: from a random-init {cfg.teacher}, which has little to teach; oracle: from a teacher that sees the "
        "classes (synthetic rigs only), the upper bound of the path from pixels to points; oracle store: that "
        "teacher's own linear probe (scalr probe-store)"
    )
    if cfg.scratch:
        lines.append("* supervised from scratch, all weights trained on the labels: a reference, not a probe")
    return lines


def _cell(value: dict, key: str, width: int) -> str:
    return f"{value[key]:>{width}.1f}" if key in value else f"{'-':>{width}}"


def _gap(value: dict, key: str, base: float) -> str:
    return f"{value[key] - base:>+8.1f}" if key in value else f"{'-':>8}"
