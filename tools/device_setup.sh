# Source on the GPU machine: installs the carried lark wheel and nnc (editable) for python3.
# Usage (device tool, carry [".whl"]): source tools/device_setup.sh && <command>
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip_nnc.log 2>&1 || { tail -5 /tmp/pip_nnc.log; return 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
