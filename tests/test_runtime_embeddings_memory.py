"""The in-process embedding model's memory layout (bfloat16 dense weights, word embeddings read
from the file row by row, passes of bounded size) and the precision it keeps: its vectors
against the float32 model's, and retrieval ranking."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from tenantry_runtime.embeddings import LocalMiniLM, from_bfloat16, to_bfloat16

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
MODEL = LocalMiniLM()  # the default: bfloat16
EXACT = LocalMiniLM(precision="float32")
# Printed by sentence-transformers for all-MiniLM-L6-v2 (see test_runtime_embeddings.py).
REFERENCE = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
REFERENCE_SIMILARITIES = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]


def sample_texts() -> list[str]:
    """Varied real text: the project's docs, paragraph by paragraph (short and long, code,
    tables, lists), plus a few edge cases."""
    paragraphs = [p.strip() for f in ("docs/architecture.md", "docs/runtime.md")
                  for p in (ROOT / f).read_text().split("\n\n") if p.strip()]
    return [*paragraphs[:60:2], "x", "ünïcödé accents and CJK 東京 text", "word " * 400]


def test_bfloat16_rounds_to_nearest_and_widens_exactly() -> None:
    values = np.array([1.0, -2.5, 1.00390625, 1.01171875, 3.0e-8, -65504.0], dtype=np.float32)
    widened = from_bfloat16(to_bfloat16(values))
    # 1 + 2^-8 is halfway between two bfloat16 values: to even (1.0); 1 + 3*2^-8 rounds up.
    assert widened.tolist()[:4] == [1.0, -2.5, 1.0, 1.015625]
    np.testing.assert_allclose(widened, values, rtol=2.0**-8)
    assert widened.dtype == np.float32


@pytest.mark.parametrize("model", [MODEL, EXACT], ids=["bfloat16", "float32"])
def test_both_precisions_reproduce_sentence_transformers(model: LocalMiniLM) -> None:
    vectors = model.encode(REFERENCE)
    np.testing.assert_allclose(vectors @ vectors.T, REFERENCE_SIMILARITIES, atol=6e-4)


def test_bfloat16_vectors_agree_with_float32_ones() -> None:
    texts = sample_texts()
    fast, exact = MODEL.encode(texts), EXACT.encode(texts)
    agreement = (fast * exact).sum(axis=1)  # both unit length
    assert agreement.min() >= 0.9999, agreement.min()
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)


def test_related_texts_rank_above_unrelated_ones() -> None:
    documents = [
        "To reset a forgotten password, open the login page and follow 'Forgot password'.",
        "Invoices are issued on the first day of each month and list usage per model.",
        "The cluster autoscaler adds nodes when pods cannot be scheduled.",
        "Our bakery sells sourdough bread, croissants and seasonal fruit tarts.",
        "Rate limits are enforced per tenant in requests and tokens per minute.",
    ]
    queries = ["I can't remember my password, how do I log in?",
               "When do I get my monthly bill?",
               "Why were new machines added to my Kubernetes cluster?",
               "Where can I buy fresh bread and pastries?",
               "How many API calls per minute may one customer make?"]
    for model in (MODEL, EXACT):
        docs, asked = model.encode(documents), model.encode(queries)
        scores = asked @ docs.T
        assert scores.argmax(axis=1).tolist() == list(range(len(queries)))
        # and the right document leads by a clear margin
        ordered = np.sort(scores, axis=1)
        assert (ordered[:, -1] - ordered[:, -2]).min() > 0.1


def test_weights_are_private_bfloat16_and_the_model_file_stays_unmapped() -> None:
    model = LocalMiniLM()
    weights = model.load()
    assert all(w.dtype == np.uint16 for w in weights.dense.values())
    # 6 layers x (4 x 384^2 + 2 x 384 x 1536) x 2 bytes = 21.2 MB, plus < 1 MB of small tensors
    assert 21_000_000 < weights.private_bytes < 23_000_000
    assert LocalMiniLM(precision="float32").load().private_bytes > 42_000_000
    path = Path(weights.words.file.name).resolve()
    assert path.name == "model.safetensors" and path.stat().st_size > 80_000_000
    # The word embeddings (47 MB) are read with pread: the file is mapped only while loading.
    assert str(path) not in Path("/proc/self/maps").read_text()
    texts = ["a query", "a longer document " * 50]
    vectors = model.encode(texts)
    assert str(path) not in Path("/proc/self/maps").read_text()
    np.testing.assert_allclose(vectors, EXACT.encode(texts), atol=5e-3)


def test_passes_are_bounded_in_texts_and_tokens() -> None:
    model = LocalMiniLM(batch_size=4)
    lengths = [10, 300, 500, 400, 5, 5, 5, 5, 5, 1500]
    passes = model._passes([[0] * n for n in lengths])
    assert [n for chosen in passes for n in chosen] == list(range(len(lengths)))
    for chosen in passes:
        assert len(chosen) <= 4
        assert len(chosen) == 1 or sum(lengths[n] for n in chosen) <= 512
    assert passes == [[0, 1], [2], [3, 4, 5, 6], [7, 8], [9]]


async def test_concurrent_embeds_run_one_at_a_time_with_the_same_vectors() -> None:
    model = LocalMiniLM()
    texts = [[f"text number {n} about tenants"] * 3 for n in range(6)]
    together = await asyncio.gather(*(model.embed(t, "document") for t in texts))
    alone = [model.encode(t).tolist() for t in texts]
    np.testing.assert_allclose(np.array(together), np.array(alone), atol=1e-6)
