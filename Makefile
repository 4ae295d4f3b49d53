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

.PHONY: install test demo synth check-dataset clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest

# The synthetic datasets: a nuScenes-format rig (6 cameras, 32 beams) and a SemanticKITTI-format
# rig (1 camera, 64 beams), written in the datasets' own on-disk formats.
synth: install
	$(SCALR) synth --format nuscenes --out $(DATA)/synth-nuscenes --seed $(SEED)
	$(SCALR) synth --format semantickitti --out $(DATA)/synth-kitti --seed $(SEED)

check-dataset: synth
	$(SCALR) check-dataset --dataset nuscenes --root $(DATA)/synth-nuscenes --split mini_train --plot-dir $(OUT)/check
	$(SCALR) check-dataset --dataset semantickitti --root $(DATA)/synth-kitti --split train --plot-dir $(OUT)/check

demo: check-dataset
	@echo "demo done: datasets under $(DATA)/, figures under $(OUT)/check/"

clean:
	rm -rf $(DATA) $(OUT)
