# Source on a GPU machine that cannot reach a package index: installs the project's missing dependencies from
# wheels in ./.whl (downloaded beforehand with `pip download --python-version 3.12 ...`, keeping only what the
# machine's image lacks) and puts them and the checkout on PYTHONPATH.
#   source benchmarks/gpu_env.sh
# The wheels go in without dependency resolution: resolving them against the image's own packages fails (a
# carried package may ask for a newer release of one the image pins), and the image already has the rest.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/rlvr-site .whl/*.whl 2>&1 | tail -3
export PATH="/tmp/rlvr-site/bin:$PATH" PYTHONPATH="/tmp/rlvr-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    RLVR_CACHE=/tmp/rlvr-cache
