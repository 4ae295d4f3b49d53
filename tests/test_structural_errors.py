"""Malformed index files in every format: a DatasetError naming the file (never a KeyError or
TypeError), check-dataset lists every bad file and goes on, and nothing is dropped silently."""

import gzip
import json
import logging
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import tiny_store
from PIL import Image

from pipeline.datasets import open_dataset
from pipeline.errors import DatasetError
from pipeline.synth import SynthConfig, generate
from pipeline.transforms import Grid
from stages.cli import main
from stages.extract.extract import ExtractConfig, extract
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.samples import DistillationData, SampleConfig
from stages.student.train import OptimConfig, TrainConfig
from stages.student.waffleiron import WaffleIronConfig
from storage.verify import verify_store


def edit_json(path, edit):
    value = json.loads(path.read_text())
    value = edit(value) or value
    path.write_text(json.dumps(value))


def set_field(table_index, key, value):
    def edit(rows):
        rows[table_index][key] = value

    return edit


def drop_field(table_index, key):
    def edit(rows):
        del rows[table_index][key]

    return edit


NUSCENES_TABLES = [
    ("sample_data", lambda rows: {"rows": rows}, "sample_data.json: sample_data is a dict, not a list of records"),
    ("sample", lambda rows: rows + ["a string"], r"sample.json: sample record \d+ is a str, not a record"),
    ("sample", drop_field(0, "scene_token"), "sample.json: sample record 0 has no field 'scene_token'"),
    (
        "sample",
        set_field(0, "timestamp", "noon"),
        "sample.json: sample record 0: field 'timestamp' is 'noon', not an integer",
    ),
    ("scene", set_field(0, "name", 61), "scene.json: scene record 0: field 'name' is 61, not a string"),
    (
        "sample_data",
        set_field(1, "height", "225"),
        r"sample_data.json: sample_data record 1: field 'height' is '225', not an integer",
    ),
    ("sample_data", drop_field(1, "filename"), "sample_data.json: sample_data record 1 has no field 'filename'"),
    (
        "calibrated_sensor",
        set_field(1, "rotation", [1, 0, 0]),
        r"calibrated_sensor.json: calibrated_sensor record 1: field 'rotation' is \[1, 0, 0\], not finite numbers "
        r"of shape \(4,\)",
    ),
    (
        "calibrated_sensor",
        set_field(1, "camera_intrinsic", "K"),
        r"field 'camera_intrinsic' is 'K', not numbers of shape \(3, 3\)",
    ),
    ("ego_pose", drop_field(0, "translation"), "ego_pose.json: ego_pose record 0 has no field 'translation'"),
    ("sensor", set_field(0, "channel", None), "sensor.json: sensor record 0: field 'channel' is None, not a string"),
    (
        "category",
        set_field(3, "index", "three"),
        "category.json: category record 3: field 'index' is 'three', not an integer",
    ),
    ("lidarseg", lambda rows: [{"token": "x"}], "lidarseg.json: lidarseg record 0 has no field 'sample_data_token'"),
]


@pytest.mark.parametrize(
    "table, edit, message", NUSCENES_TABLES, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(NUSCENES_TABLES)]
)
def test_malformed_nuscenes_tables(nuscenes_copy, table, edit, message):
    edit_json(nuscenes_copy / f"v1.0-mini/{table}.json", edit)
    with pytest.raises(DatasetError, match=message) as err:
        open_dataset("nuscenes", nuscenes_copy, "mini_train")
    assert err.value.path.endswith(f"{table}.json")


def test_check_dataset_lists_every_bad_file_and_goes_on(nuscenes_copy):
    """A broken record breaks only the scan that uses it; the check reads every other scan."""
    ds = open_dataset("nuscenes", nuscenes_copy, "mini_train")
    first, second = ds.scan_ids
    poses = nuscenes_copy / "v1.0-mini/ego_pose.json"
    lidar_pose = next(
        r["ego_pose_token"]
        for r in json.loads((nuscenes_copy / "v1.0-mini/sample_data.json").read_text())
        if r["token"] == first
    )
    edit_json(poses, lambda rows: [r if r["token"] != lidar_pose else {**r, "rotation": "up"} for r in rows])
    lidar = nuscenes_copy / ds._records[1].filename
    lidar.write_bytes(lidar.read_bytes()[:-3])
    result = CliRunner().invoke(
        main, ["check-dataset", "--dataset", "nuscenes", "--root", str(nuscenes_copy), "--split", "mini_train"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "problems: 2" in result.output
    assert "ego_pose.json: ego_pose record" in result.output and "field 'rotation' is 'up'" in result.output
    assert f"{lidar}: size" in result.output and "not a multiple of the 20-byte record" in result.output
    with pytest.raises(DatasetError, match="field 'rotation' is 'up'"):  # every other command stops at it
        open_dataset("nuscenes", nuscenes_copy, "mini_train")


def test_extraction_records_scans_of_a_bad_record_as_skipped(nuscenes_copy, tmp_path, caplog):

    first = open_dataset("nuscenes", nuscenes_copy, "mini_train").scan_ids[0]
    edit_json(
        nuscenes_copy / "v1.0-mini/sample_data.json",
        lambda rows: [r if r["token"] != first else {**r, "filename": 7} for r in rows],
    )
    cfg = ExtractConfig(
        "nuscenes",
        nuscenes_copy,
        "mini_train",
        "test-vit",
        tmp_path / "s.zarr",
        random_init=True,
        image_size=(32, 64),
        num_workers=0,
    )
    with pytest.raises(DatasetError, match="field 'filename' is 7, not a string"):
        extract(cfg)
    with caplog.at_level(logging.WARNING):
        store = extract(ExtractConfig(**{**cfg.__dict__, "on_error": "skip"}))
    assert "1 bad index file(s)" in caplog.text and "field 'filename' is 7" in caplog.text
    rows = [r for r in store.manifest().to_pylist() if r["scan_id"] == first]
    assert len(rows) == 6 and all(r["status"] == "skipped" and "field 'filename' is 7" in r["reason"] for r in rows)
    assert verify_store(store.path)[0] == []
    result = CliRunner().invoke(main, ["inspect", str(store.path)])
    assert "6 skipped" in result.output and "bad index files passed over" in result.output


def test_kitti_calibration_that_is_not_text(kitti_copy):
    calib = kitti_copy / "sequences/00/calib.txt"
    calib.write_bytes(b"P2: \xff\xfe\x00\x81 binary")
    with pytest.raises(DatasetError, match="calib.txt: calibration file is not text"):
        open_dataset("semantickitti", kitti_copy, "train")
    shutil.rmtree(kitti_copy / "sequences/08")  # check-dataset still reads and lists the sequence
    result = CliRunner().invoke(
        main, ["check-dataset", "--dataset", "semantickitti", "--root", str(kitti_copy), "--split", "train"]
    )
    assert (
        result.exit_code == 1
        and "calib.txt: calibration file is not text" in result.output
        and "problems: 1" in result.output
    )


def test_kitti_images_of_a_sequence_share_one_size(kitti_copy):
    odd = kitti_copy / "sequences/00/image_2/000001.png"
    image = Image.open(odd)
    image.resize((image.width + 2, image.height)).save(odd)
    ds = open_dataset("semantickitti", kitti_copy, "train")
    ds[0]  # the first image sets the sequence's size
    with pytest.raises(
        DatasetError,
        match=f"000001.png: image is {image.width + 2}x{image.height} but sequence 00's images \\(and its "
        f"calibration\\) are {image.width}x{image.height}",
    ):
        ds[1]


def test_the_odd_image_is_named_even_when_it_comes_first(tmp_path):
    root = tmp_path / "kitti"
    generate("semantickitti", root, SynthConfig(seed=7, scenes=1, frames=4, azimuth_steps=256, image_scale=0.4))
    odd = root / "sequences/00/image_2/000000.png"
    image = Image.open(odd)
    image.resize((image.width + 2, image.height)).save(odd)
    result = CliRunner().invoke(main, ["check-dataset", "--dataset", "semantickitti", "--root", str(root)])
    found = f"sizes found: {image.width}x{image.height} (3 images), {image.width + 2}x{image.height} (1 images)"
    assert result.exit_code == 1 and "problems: 1" in result.output and found in result.output, result.output
    assert f"{odd}: image is {image.width + 2}x{image.height} but sequence 00's images" in result.output


def test_a_zero_byte_point_file_is_a_damaged_file(kitti_copy):
    empty = kitti_copy / "sequences/00/velodyne/000001.bin"
    empty.write_bytes(b"")
    result = CliRunner().invoke(
        main, ["check-dataset", "--dataset", "semantickitti", "--root", str(kitti_copy), "--split", "train"]
    )
    assert result.exit_code == 1 and "problems: 1" in result.output
    assert f"{empty}: file is empty (0 bytes): a damaged file, not a scan without points" in result.output


def test_empty_scan_is_counted_listed_and_warned_about(pandaset_root, tmp_path, caplog):
    root = shutil.copytree(pandaset_root, tmp_path / "p")
    lidar = root / "001/lidar/01.pkl.gz"
    pickle_frame(lidar, pd.read_pickle(lidar).assign(d=1))  # every point the forward lidar's: none for Pandar64
    result = CliRunner().invoke(
        main, ["check-dataset", "--dataset", "pandar64", "--root", str(root), "--split", "train"]
    )
    assert result.exit_code == 0 and "1 scans have zero points: 001/01" in result.output, result.output

    store = tiny_store(root, tmp_path / "s.zarr", "pandar64")
    assert store.entry("001/01", "front_camera")[0]["scan_points"] == 0
    with caplog.at_level(logging.WARNING):
        DistillationData([store.path], SampleConfig())
    assert "1 of 2 scans have zero points and are not trained on (001/01)" in caplog.text


def pickle_frame(path, value):
    with gzip.open(path, "wb") as f:
        pickle.dump(value, f)


def test_malformed_pandaset_files(pandaset_root, tmp_path):
    root = shutil.copytree(pandaset_root, tmp_path / "p")
    lidar = root / "001/lidar/00.pkl.gz"
    frame = pd.read_pickle(lidar)
    pickle_frame(lidar, frame.to_numpy().tolist())
    with pytest.raises(DatasetError, match="00.pkl.gz: holds a list, not a pandas DataFrame"):
        open_dataset("pandar64", root, "train")[0]
    pickle_frame(lidar, frame.drop(columns=["d"]))
    with pytest.raises(DatasetError, match=r"00.pkl.gz: columns \['d'\] are missing"):
        open_dataset("pandar64", root, "train")[0]
    pickle_frame(lidar, frame.assign(x=frame["x"].astype(str)))
    with pytest.raises(DatasetError, match="00.pkl.gz: column 'x' holds object values, not numbers"):
        open_dataset("pandar64", root, "train")[0]
    pickle_frame(lidar, frame)
    semseg = root / "001/annotations/semseg/00.pkl.gz"
    labels = pd.read_pickle(semseg)
    pickle_frame(semseg, labels.assign(**{"class": np.where(np.arange(len(labels)) == 3, 99, labels["class"])}))
    with pytest.raises(DatasetError, match=r"semseg/00.pkl.gz: label ids \[99\] are not in the pandar64 learning map"):
        open_dataset("pandar64", root, "train")[0]
    pickle_frame(semseg, labels)
    intrinsics = root / "001/camera/front_camera/intrinsics.json"
    edit_json(intrinsics, lambda v: {**v, "fx": "1000"})
    with pytest.raises(DatasetError, match="intrinsics.json: intrinsics: field 'fx' is '1000', not a finite number"):
        open_dataset("pandargt", root, "train")[0]
    intrinsics.write_text("[1, 2, 3, 4]")
    with pytest.raises(DatasetError, match="intrinsics.json: intrinsics is a list, not a record"):
        open_dataset("pandargt", root, "train")[0]
    edit_json(root / "001/lidar/poses.json", lambda v: [{**v[0], "heading": [1, 0, 0, 0]}] + v[1:])
    with pytest.raises(DatasetError, match="poses.json: pose record 0, field 'heading', is a list, not a record"):
        open_dataset("pandar64", root, "train")[0]


def test_pandaset_sequence_without_gps_is_never_dropped_silently(pandaset_root, tmp_path):
    root = shutil.copytree(pandaset_root, tmp_path / "p")
    (root / "002/meta/gps.json").unlink()
    with pytest.raises(DatasetError, match="002/meta/gps.json: missing: the sequence's split"):
        open_dataset("pandar64", root, "train")
    result = CliRunner().invoke(
        main, ["check-dataset", "--dataset", "pandar64", "--root", str(root), "--split", "train"]
    )
    assert result.exit_code == 1 and "002/meta/gps.json: missing" in result.output
    assert "pandar64 train: 2 scans" in result.output  # the other sequence is still checked


def test_bad_file_met_in_a_loader_worker_is_one_line(kitti_copy, tmp_path):
    """A DatasetError raised in a DataLoader worker reaches the command line as its own message."""

    grid = Grid(cell=4.0)
    store = tiny_store(kitti_copy, tmp_path / "s.zarr")
    cfg = PretrainConfig(
        (store.path,),
        tmp_path / "pre",
        model=WaffleIronConfig(depth=2, width=8, grid_shape=grid.shape),
        sample=SampleConfig(max_points=1000, grid=grid),
        optim=OptimConfig(warmup_iters=1),
        train=TrainConfig(batch_size=2, epochs=1, num_workers=0),
    )
    checkpoint = pretrain(cfg)["checkpoint"]
    bad = kitti_copy / "sequences/00/velodyne/000001.bin"
    bad.write_bytes(bad.read_bytes()[:-6])
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--dataset",
            "semantickitti",
            "--root",
            str(kitti_copy),
            "--checkpoint",
            checkpoint,
            "--out",
            str(tmp_path / "probe"),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--num-workers",
            "1",
            "--set",
            "sample.grid.cell=4.0",
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: {bad}: size" in result.output and "not a multiple of the 16-byte record" in result.output
