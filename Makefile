# Two commands for a new user (each sets up .venv on first use):
#   make demo   train the tiny model on the procedural world, sample, score, write videos
#   make test   run the test suite (make test-fast: without the slow tests)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
WORKDIR ?= runs/demo

.PHONY: demo vae test test-fast install clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test,torch,studio]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/sora-jax demo --config configs/world_tiny.py --workdir $(WORKDIR)

# The VAE shipped in checkpoints/vae_world_tiny (the latent configs' autoencoder), trained
# again by its recorded command (checkpoints/vae_world_tiny/README.md) into runs/vae; a
# latent run reads it with --config.autoencoder.workdir=runs/vae.
vae: $(VENV)/.installed
	$(VENV)/bin/sora-jax train-vae --config configs/vae_world_tiny.py --workdir runs/vae \
	    --config.train.steps=5000

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup --durations=30 tests

# The edit loop: everything but the tests marked slow (whole training runs, processes).
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup -m "not slow" tests

clean:
	rm -rf $(VENV) runs
