# Source at the start of a command on the GPU box (the device tool runs it from the repository root), after
# `benchmarks/device_carry.py --out .cache/whl3` here and with `.cache/whl3` carried:
#
#     source benchmarks/device_env.sh && python3 -m pytest -q -p no:cacheprovider -m gpu ...
#
# Installs the carried wheels into $SITE (/tmp/site) with their bytecode, compiles the bytecode the box's own
# packages lack (its torch has none: a start-up timed without it reads about 11 s more imports than the serving
# image, whose pip install compiles it; docs/SERVE.md), and exports what the benchmarks and the GPU tests expect.
# CARRY overrides the wheel folder; DEVICE_ENV_NO_COMPILEALL=1 skips the box-wide bytecode (a command that times
# no start-up). Fails (returns 1) when the install fails, leaving the environment as it was.
CARRY="${CARRY:-.cache/whl3}"
SITE="${SITE:-/tmp/site}"
if ! python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" "$CARRY"/*.whl; then
    echo "device_env: the install from $CARRY into $SITE failed" >&2
    return 1
fi
if [ -z "${DEVICE_ENV_NO_COMPILEALL:-}" ]; then
    python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" src \
        > /dev/null 2>&1 || echo "device_env: compileall reported errors (some files may lack bytecode)" >&2
fi
export PYTHONPATH="$SITE:src" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
