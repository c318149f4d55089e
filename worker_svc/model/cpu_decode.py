"""The C++ decode stack (csrc/decode.cpp) for small steps on a CPU.

At batch 1 a step streams every weight once; the TorchScript stack (fast_decode.py) adds
~40 small ops per layer on top, each with a dispatch and an OpenMP fork/join. The C++
stack runs the 30 layers in one OpenMP region with its own GEMV and the small ops fused
into it (see the file's header). Same math as LlamaModel + TorchAttention in fp32.

A step with prompt tokens runs here too while it holds at most MAX_NUM_ROWS tokens: each
prompt token is a row like a decode, reading its sequence's blocks through a mask that
ends at its own position (attention.build_row_metadata). The stack writes every row's K/V
before any row attends, so a chunk's later tokens see its earlier ones. Against the eager
model (with the same GEMM) this saves the per-op overhead a step pays there: on
SmolLM2-135M, the forward of 4 decodes + an 8 / 32 / 56-token chunk took 30 / 61 / 85 ms
against 48 / 74 / 104 (docs/performance.md).

With a GGUF model the stack reads the matrices the GGUF quantized in Q4_0, Q4_1 or Q8_0
as those blocks (the converter keeps them, gguf_convert.BLOCKS_FILE) in steps of up to
MAX_BLOCK_ROWS rows, dequantizing on the way into the tiles' FMAs: the same weights bit
for bit, so the same outputs bit for bit, at a sixth of the bytes a step streams; at one
row 1.65x faster on this 2-core machine (`--cpu-weights`, docs/performance.md). On AVX2
builds the worker goes further by default (`--cpu-activations int16`): those steps quantize
each matrix's input to int16 per 32-value block and multiply in integers, 1.4-1.7x faster
again, with logits within ~2e-4 of the fp32 stack's instead of bit for bit.

Built once per (source, compile flags, torch, python) with torch.utils.cpp_extension and
cached under the bros cache dir, so a later start only loads the .so. `make install`
builds it (`python -m worker_svc.model.cpu_decode`); if a build fails the worker logs a
warning and keeps the TorchScript path.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .llama import FUSED_MATRICES, LlamaModel, fused_matrix

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"
# Rows (tokens) per step up to which the C++ stack runs: kMaxRows in decode.cpp, and the
# default --max-num-seqs. It measured faster than the TorchScript stack (MKL GEMMs) at
# every decode batch from 1 to 64, and than the eager model at every mixed step of up to
# 64 tokens (docs/performance.md); larger decode steps take TorchScript, larger steps with
# prompt tokens the eager model.
MAX_NUM_ROWS = 64
# Steps of up to this many tokens run the eager model's matmuls (prefill and mixed steps)
# through the same GEMM (`linear_small`) instead of torch's MKL GEMM, by the build's
# instruction set. On a 2-core AVX-512 CPU, SmolLM2-135M's 30 layers of matmuls took 24 ms
# against MKL's 68 at 8 rows, 161 against 245 at 128, 593 against 790 at 512, and about
# the same at 1024. AVX2 builds' broadcast tiles are half as wide (4 weight rows against
# 16 x rows: decode.cpp, kBcastTileRows): on a 2-core AVX2 CPU whole eager prompt steps
# took 45 / 104 / 179 ms against MKL's 70 / 114 / 154 at 8 / 32 / 64 tokens before AVX2
# had broadcast tiles, and with them 279 / 569 / 1,210 against 249 / 474 / 964 at
# 128 / 256 / 512 (docs/performance.md; why torch's MKL call is this slow at few rows
# was not pinned down).
MAX_EAGER_LINEAR_ROWS = {"avx512": 512}
MAX_EAGER_LINEAR_ROWS_DEFAULT = 32

# /proc/cpuinfo flag sets, best first, and the gcc flags each one allows. No -march=native:
# the flags name exactly what this CPU reported, so the build runs on any CPU that has them.
_ISA_LEVELS = [
    ({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"},
     ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]),
    ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
]

_loaded: dict[tuple[Path, Path | None], object] = {}   # (source, root) -> module or None
_errors: dict[tuple[Path, Path | None], Exception] = {}


def isa_flags(cpu_flags: set[str] | None = None) -> list[str]:
    """Compiler flags for the best instruction set this CPU supports ([] = the x86-64 or
    aarch64 baseline, which the vector code also compiles to)."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    for needed, gcc_flags in _ISA_LEVELS:
        if needed <= flags:
            return gcc_flags
    return []


def _cpu_flags() -> set[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def extension_dir() -> Path:
    """$BROS_CACHE_DIR/ext, else ~/.cache/bros/ext (converted models live beside it)."""
    root = os.environ.get("BROS_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "bros") / "ext"


def _build_args(source: Path) -> tuple[str, list[str], list[str]]:
    cflags = ["-O3", "-fopenmp", "-DNDEBUG", *isa_flags()]
    # libgomp by soname: torch already loaded its own copy (same soname), so our parallel
    # regions run on torch's OpenMP thread pool instead of starting a second one.
    ldflags = ["-fopenmp"]
    key = hashlib.sha256("\n".join([source.read_text(), *cflags, *ldflags, torch.__version__,
                                    sys.version, platform.machine()]).encode()).hexdigest()[:12]
    return f"bros_cpu_decode_{key}", cflags, ldflags


def load_extension(source: Path = SOURCE, root: Path | None = None, verbose: bool = False):
    """The compiled module, building it under root (default extension_dir()) on first use;
    None, with a warning, if it cannot be built here. One attempt per process."""
    key = (source, root)
    if key not in _loaded:
        try:
            _loaded[key] = _build_and_load(source, root or extension_dir(), verbose)
        except Exception as e:  # noqa: BLE001 - a compiler problem must never stop the worker
            log.warning("C++ decode stack unavailable, using the TorchScript path: %s", _first_lines(e))
            _loaded[key] = None
            _errors[key] = e
    return _loaded[key]


def _build_and_load(source: Path, root: Path, verbose: bool):
    from torch.utils import cpp_extension

    name, cflags, ldflags = _build_args(source)
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        log.info("building the C++ decode stack in %s (once; about a minute)", build_dir)
    # cpp_extension's own lock is a file that a killed build leaves behind, after which
    # every later load waits forever. An flock dies with its holder: take it, and any
    # `lock` file found while holding it is such a leftover.
    with open(build_dir / "bros.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags,
                                  build_directory=str(build_dir), verbose=verbose)


def _first_lines(e: Exception, n: int = 6) -> str:
    return " | ".join(str(e).strip().splitlines()[:n])


def extension_for(model: LlamaModel):
    """The compiled module where the C++ code applies to this model (fp32 weights on a
    CPU, the extension built), else None."""
    w = model.embed_tokens.weight
    if not (w.device.type == "cpu" and w.dtype == torch.float32):
        return None
    return load_extension()


def eager_linear(model: LlamaModel):
    """(the C++ GEMM, the most rows it takes) for the eager model's matmuls where it
    applies, else (None, 0): LlamaModel.use_linear's arguments."""
    ext = extension_for(model)
    if ext is None:
        return None, 0
    return ext.linear_small, MAX_EAGER_LINEAR_ROWS.get(ext.isa(), MAX_EAGER_LINEAR_ROWS_DEFAULT)


class CpuDecode:
    """Binds a model's fp32 weights (or their GGUF blocks) and the KV pool to the C++
    stack; steps of at most MAX_NUM_ROWS tokens go through `forward` (decode-only, or with
    prompt tokens as rows of their own), and logits of that many rows through `logits`."""

    def __init__(self, ext, model: LlamaModel, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
                 blocks: dict[str, tuple[torch.Tensor, int]] | None = None, int16_activations: bool = False):
        cfg, layers = model.cfg, model.layers
        rope = torch.view_as_real(model.rope.freqs).contiguous()          # [P, D/2, (cos, sin)]
        self.model = model
        self.max_int16_rows = ext.MAX_INT16_ROWS   # 0 where the build has no int16 tiles
        self.stack = ext.DecodeStack(
            model.embed_tokens.weight, rope, model.norm,
            [l.input_norm for l in layers], [l.qkv_proj.weight for l in layers], [l.o_proj.weight for l in layers],
            [l.post_attn_norm for l in layers], [l.gate_up_proj.weight for l in layers],
            [l.down_proj.weight for l in layers], k_cache, v_cache,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size, cfg.rms_norm_eps)
        self._linear_small = ext.linear_small
        self._lm_head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        self._lm_head_blocks = None
        # What a step of up to MAX_BLOCK_ROWS rows streams: the matrices and the LM head,
        # fp32 or blocks (the norms are noise).
        self.weight_bytes = sum(_nbytes(getattr(l, f"{which}_proj").weight) for l in layers
                                for which in FUSED_MATRICES) + _nbytes(self._lm_head)
        # Matrices read as GGUF blocks, of the 4 per layer + the LM head.
        self.num_block_matrices = self._use_blocks(ext, blocks or {})
        self.set_int16_activations(int16_activations)

    def set_int16_activations(self, on: bool) -> None:
        """Steps of up to MAX_INT16_ROWS rows (8) read the block matrices and quantize their
        inputs to int16 (decode.cpp, "int16 activations"), or not: then steps of up to
        MAX_BLOCK_ROWS (4) read the blocks, exactly, and larger ones the fp32 weights.
        Only AVX2 builds have those tiles; elsewhere this stays off (int16_activations)."""
        self.stack.set_int16_activations(on)
        if self._lm_head_blocks is not None:
            self._lm_head_blocks.set_int16_activations(on)

    @property
    def int16_activations(self) -> bool:
        """Whether small steps run on int16 activations (asked for, an AVX2 build, blocks)."""
        return bool(self.num_block_matrices) and self.stack.int16_activations()

    def _use_blocks(self, ext, blocks: dict[str, tuple[torch.Tensor, int]]) -> int:
        """Binds every matrix whose parts all have blocks, of one type; the stack checks
        each against the fp32 weights (the same values bit for bit) before taking it."""
        if not blocks:
            return 0
        cfg = self.model.cfg
        for layer in range(cfg.num_layers):
            for which in FUSED_MATRICES:
                fused = _fused_blocks(cfg, layer, which, blocks)
                if fused is None:
                    continue
                data, ggml_type = fused
                try:
                    self.stack.set_blocks(layer, which, data, ggml_type)
                except RuntimeError as e:  # not these weights: keep reading fp32
                    log.warning("layer %d %s: GGUF blocks refused, reading fp32: %s", layer, which, _first_lines(e, 1))
                    continue
                self.weight_bytes += _nbytes(data) - _nbytes(getattr(self.model.layers[layer], f"{which}_proj").weight)
        head = "model.embed_tokens.weight" if self.model.lm_head is None else "lm_head.weight"
        if head in blocks:
            data, ggml_type = blocks[head]
            try:
                self._lm_head_blocks = ext.BlockLinear(self._lm_head, data, ggml_type, head)
                self.weight_bytes += _nbytes(data) - _nbytes(self._lm_head)
            except RuntimeError as e:
                log.warning("%s: GGUF blocks refused, reading fp32: %s", head, _first_lines(e, 1))
        return self.stack.num_block_matrices() + (self._lm_head_blocks is not None)

    @classmethod
    def create(cls, model: LlamaModel, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
               blocks: dict[str, tuple[torch.Tensor, int]] | None = None,
               int16_activations: bool = False) -> "CpuDecode | None":
        """The C++ path for this model and pool, or None where it does not apply (not fp32
        on CPU) or the extension is unavailable. blocks: checkpoint.load_blocks(), read in
        place of the fp32 matrices they hold (none: fp32 throughout)."""
        if not (k_cache.device.type == "cpu" and k_cache.dtype == torch.float32):
            return None
        ext = extension_for(model)
        return None if ext is None else cls(ext, model, k_cache, v_cache, block_size, blocks, int16_activations)

    def handles(self, num_rows: int) -> bool:
        return 0 < num_rows <= MAX_NUM_ROWS

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """Same contract as LlamaModel.forward: [S] ids and positions -> final hidden states
        [S, hidden]; meta has every token as a single-token row (build_row_metadata)."""
        return self.stack.forward(input_ids, positions, meta.slot_mapping, meta.decode_blocks,
                                  None if meta.decode_mask is None else meta.decode_mask.view(-1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab], as LlamaModel.compute_logits."""
        if self._lm_head_blocks is not None:
            return self._lm_head_blocks.forward(hidden.contiguous())
        return self._linear_small(hidden.contiguous(), self._lm_head)


def _fused_blocks(cfg, layer: int, which: str,
                  blocks: dict[str, tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int] | None:
    """The blocks of a layer's fused matrix and their ggml type, fused as the fp32 weights
    are (llama.fused_matrix); None unless every part has blocks, all of one type."""
    types: set[int] = set()

    def take(name: str) -> torch.Tensor:
        data, ggml_type = blocks[name]
        types.add(ggml_type)
        return data

    try:
        data = fused_matrix(cfg, layer, which, take).contiguous()
    except (KeyError, RuntimeError):  # a part without blocks; parts of other types (other widths)
        return None
    return (data, types.pop()) if len(types) == 1 else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def main() -> None:
    """`make install`: build (or find) the extension and say how long it took."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    ext = load_extension(verbose="-v" in sys.argv)
    took = time.perf_counter() - t0
    if ext is None:
        print(f"cpu_decode: build failed after {took:.1f} s; the worker will use the TorchScript path:\n"
              f"{_errors.get((SOURCE, None))}", file=sys.stderr)
        return
    print(f"cpu_decode: {ext.isa()} build ready in {extension_dir() / _build_args(SOURCE)[0]} ({took:.1f} s)")


if __name__ == "__main__":
    main()
