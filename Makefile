# scalr: every target installs what it needs first (`make install` is idempotent and fast when done).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SCALR  := $(BIN)/scalr
# Nothing may touch the network at run time: timm's hub client would otherwise retry DNS for ~45 s.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Where the demo writes (all generated, all git-ignored).
DATA ?= data
OUT  ?= out
SEED ?= 0
# The released recipe: cvpr (ScaLR, CVPR 2024) or scalr-plus (ScaLR+). make demo RECIPE=scalr-plus
RECIPE ?= cvpr

# Stage 1 defaults: the synthetic nuScenes-format set with a tiny random-init teacher. Real data:
#   make extract-features DATASET=nuscenes ROOT=/data/nuscenes SPLIT=train TEACHER=dinov2-vitl14 WEIGHTS=/weights/dinov2_vitl14_pretrain.pth
DATASET ?= nuscenes
ROOT    ?= $(DATA)/synth-nuscenes
SPLIT   ?= mini_train
TEACHER ?= test-vit
WEIGHTS ?=
STORE   ?= stores/$(DATASET)-$(SPLIT)-$(TEACHER)$(if $(filter-out cvpr,$(RECIPE)),-$(RECIPE)).zarr
TEACHER_FLAGS = $(if $(WEIGHTS),--weights $(WEIGHTS),--random-init)
EXTRACT_FLAGS ?=

# Stage 2 defaults: a small student on the store made by `make extract-features`. Real data:
#   make pretrain STORES="stores/nuscenes-train-dinov2-vitl14.zarr" STUDENT=WI-48-768 RUN=runs/wi768 PRETRAIN_FLAGS="--precision bf16"
STORES  ?= $(STORE)
STUDENT ?= WI-12-64
RUN     ?= runs/pretrain-$(STUDENT)
PRETRAIN_FLAGS ?= --epochs 4 --batch-size 4 --set optim.warmup_iters=6 --set train.log_every=1

# Downstream defaults: probe / finetune the student of `make pretrain` on the synthetic labels.
#   make probe DATASET=nuscenes ROOT=/data/nuscenes SPLIT=train EVAL_SPLIT=val RUN=runs/wi768
EVAL_SPLIT ?= mini_val
DOWNSTREAM_FLAGS ?= --epochs 6 --batch-size 4 --set train.log_every=1

.PHONY: install lint format test demo synth check-dataset extract-features pretrain probe finetune evaluate view screenshot bench-extract bench-pretrain clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The formatter and linter (ruff, configured in pyproject.toml) on the whole tree; `make format` applies them.
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

# The synthetic datasets, written in the datasets' own on-disk formats: nuScenes (6 cameras, 32
# beams), SemanticKITTI (1 camera, 64 beams), PandaSet (Pandar64 + PandarGT, 6 cameras).
# Written once (a stamp marks completion; --overwrite replaces an interrupted write); `make clean` to regenerate.
synth: $(DATA)/synth-nuscenes/.done $(DATA)/synth-semantickitti/.done $(DATA)/synth-pandaset/.done

$(DATA)/synth-nuscenes/.done: | install
	$(SCALR) synth --format nuscenes --out $(DATA)/synth-nuscenes --seed $(SEED) --overwrite
	touch $@

$(DATA)/synth-semantickitti/.done: | install
	$(SCALR) synth --format semantickitti --out $(DATA)/synth-semantickitti --seed $(SEED) --overwrite
	touch $@

$(DATA)/synth-pandaset/.done: | install
	$(SCALR) synth --format pandaset --out $(DATA)/synth-pandaset --seed $(SEED) --overwrite
	touch $@

check-dataset: synth
	$(SCALR) check-dataset --dataset nuscenes --root $(DATA)/synth-nuscenes --split mini_train --plot-dir $(OUT)/check
	$(SCALR) check-dataset --dataset semantickitti --root $(DATA)/synth-semantickitti --split train --plot-dir $(OUT)/check
	$(SCALR) check-dataset --dataset pandar64 --root $(DATA)/synth-pandaset --split train --plot-dir $(OUT)/check
	$(SCALR) check-dataset --dataset pandargt --root $(DATA)/synth-pandaset --split train --plot-dir $(OUT)/check

# Resumable: rerunning computes only the parts that are not committed yet.
extract-features: install $(if $(filter $(DATA)/%,$(ROOT)),synth)
	$(SCALR) extract-features --dataset $(DATASET) --root $(ROOT) --split $(SPLIT) --teacher $(TEACHER) $(TEACHER_FLAGS) --recipe $(RECIPE) --out $(STORE) $(EXTRACT_FLAGS)
	$(SCALR) verify $(STORE)

# Resumes from $(RUN)/checkpoints/last.pt when it exists.
pretrain: $(if $(filter stores/%,$(STORES)),extract-features,install)
	$(SCALR) pretrain $(foreach s,$(STORES),--store $(s)) --student $(STUDENT) --out $(RUN) $(PRETRAIN_FLAGS)

probe: pretrain
	$(SCALR) probe --dataset $(DATASET) --root $(ROOT) --split $(SPLIT) --checkpoint $(RUN)/checkpoints/last.pt --out $(RUN)-probe $(DOWNSTREAM_FLAGS)

finetune: pretrain
	$(SCALR) finetune --dataset $(DATASET) --root $(ROOT) --split $(SPLIT) --checkpoint $(RUN)/checkpoints/last.pt --out $(RUN)-finetune $(DOWNSTREAM_FLAGS)

evaluate: probe
	$(SCALR) evaluate --dataset $(DATASET) --root $(ROOT) --split $(EVAL_SPLIT) --checkpoint $(RUN)-probe/checkpoints/last.pt

# The live feature viewer on $(STORE) (http://127.0.0.1:8080; Ctrl-C stops). VIEW_FLAGS="--checkpoint runs/x/checkpoints/last.pt"
VIEW_FLAGS ?=
view: install
	$(SCALR) view $(STORE) $(VIEW_FLAGS)

# The README's viewer picture, taken by the viewer's headless-Chromium test.
screenshot: install
	SCALR_VIEWER_SCREENSHOT=.readme/viewer.png $(BIN)/python -m pytest tests/test_view.py -k chromium

bench-pretrain: extract-features
	$(SCALR) bench pretrain --store $(STORE) --student WI-48-256

bench-extract: install synth
	$(SCALR) bench extract --dataset $(DATASET) --root $(ROOT) --split $(SPLIT) --teacher dinov2-vits14

# The whole method on the synthetic rigs, four lidars (about 16 minutes on 2 CPU cores, RECIPE=scalr-plus about 25); reruns reuse what is there.
demo: install
	$(SCALR) demo --data $(DATA) --out $(OUT)/demo$(if $(filter-out cvpr,$(RECIPE)),-$(RECIPE)) --recipe $(RECIPE)

clean:
	rm -rf $(DATA) $(OUT) stores runs
