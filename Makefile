# make demo: set up, then run the whole pipeline on the embedded synthetic data.
# make test: set up, then run the tests.
# Each creates the virtual environment .venv on first use, and installs again when the
# setup files or the C extensions (loaders/*.c) change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo
WORKERS ?= 2
PACK_FLAGS ?=  # more pack flags for the demo, e.g. make demo PACK_FLAGS='--flow farneback'

.PHONY: demo test clean

$(VENV)/.installed: setup.cfg setup.py pyproject.toml constraints.txt loaders/_jpeg_region.c loaders/_crash_hint.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y opencv-python-headless  # replaced by opencv-contrib-python-headless (TV-L1): never both
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=10

# Synthesize -> pack -> train RGB -> train flow -> score both -> fuse -> the results table -> predict two raw videos.
TRAIN := --arch resnet18 --input-size 80 --batch-size 32 --lr 0.01 --max-iterations 200 --step-values 150 \
	--val-every 100 --val-batches 10 --ckpt-every 100 --workers $(WORKERS) --log-every 20 --deterministic
demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) -m pack.synth --out $(DEMO)/raw
	$(PY) -m pack --csv $(DEMO)/raw/train.csv --videos $(DEMO)/raw/videos --out $(DEMO)/data \
		--stride 4 --flow-len 2 --short-side 96 --shard-videos 10 --workers $(WORKERS) $(PACK_FLAGS)
	$(PY) -m pack --csv $(DEMO)/raw/val.csv --videos $(DEMO)/raw/videos --out $(DEMO)/data \
		--stride 4 --flow-len 2 --short-side 96 --shard-videos 10 --workers $(WORKERS) $(PACK_FLAGS)
	$(PY) train.py --data $(DEMO)/data --modality rgb --save-dir $(DEMO)/runs/rgb $(TRAIN)
	$(PY) train.py --data $(DEMO)/data --modality flow --save-dir $(DEMO)/runs/flow $(TRAIN)
	$(PY) score.py --checkpoint $(DEMO)/runs/rgb/latest.pt --data $(DEMO)/data --split val --out $(DEMO)/scores/rgb_val.npz --workers $(WORKERS)
	$(PY) score.py --checkpoint $(DEMO)/runs/flow/latest.pt --data $(DEMO)/data --split val --out $(DEMO)/scores/flow_val.npz --workers $(WORKERS)
	$(PY) fuse.py $(DEMO)/scores/rgb_val.npz $(DEMO)/scores/flow_val.npz --out $(DEMO)/results
	$(PY) predict.py $$(ls $(DEMO)/raw/videos/val/red_moving_up/*.mp4 | head -1) \
		$$(ls $(DEMO)/raw/videos/val/blue_moving_down/*.mp4 | head -1) \
		--rgb $(DEMO)/runs/rgb/latest.pt --flow $(DEMO)/runs/flow/latest.pt --out $(DEMO)/predictions.json --timeline $(DEMO)/timeline

clean:
	rm -rf $(DEMO) $(VENV)
