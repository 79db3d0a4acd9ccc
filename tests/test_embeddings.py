"""The embedding pipeline: chunking, the local model (offline), the OpenAI backend (against a
local OpenAI-compatible HTTP server), batching and the one-model-per-process cache.

No database here.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from pydantic import SecretStr

from fleet.embeddings import (
    LOCAL,
    OPENAI,
    ChunkPolicy,
    chunk_document,
    chunk_text,
    embed_array,
    embed_texts,
    model_spec,
)
from fleet.errors import ConfigurationError, InvalidInput
from fleet.settings import Settings
from tests.processes import ROOT

# --- chunking --------------------------------------------------------------------------------


def _document(sections: int = 4, paragraphs: int = 3, sentences: int = 6) -> str:
    parts = ["# Handbook"]
    n = 0
    for s in range(sections):
        parts.append(f"## Section {s}")
        for _ in range(paragraphs):
            words = []
            for _ in range(sentences):
                n += 1
                words.append(f"Sentence {n} explains rule number {n} of section {s} clearly.")
            parts.append(" ".join(words))
    return "\n\n".join(parts)


def test_short_text_stays_one_chunk_unchanged() -> None:
    text = "Refund not received after 14 days.\n\nResolution: re-pushed the refund."
    assert chunk_text(text, ChunkPolicy(max_words=50, overlap_words=10)) == [text]
    assert chunk_text("   ") == []


def test_long_document_splits_at_semantic_boundaries_with_overlap() -> None:
    policy = ChunkPolicy(max_words=120, overlap_words=20)
    text = _document()
    chunks = chunk_text(text, policy)
    assert len(chunks) > 4
    for chunk in chunks:
        assert len(chunk.split()) <= policy.max_words
        # Never cut mid-sentence: every chunk ends at a sentence end.
        assert chunk.rstrip().endswith(".")
        # Each chunk carries its section's heading as context.
        assert re.match(r"^(# Handbook\n\n)?## Section \d", chunk), chunk[:40]
    # Every sentence of the document is in some chunk.
    for n in range(1, 73):
        assert any(f"Sentence {n} explains" in c for c in chunks), n
    # Consecutive chunks of one section share their boundary sentence (overlap).
    same_section = [(a, b) for a, b in itertools.pairwise(chunks)
                    if a.split("\n")[0] == b.split("\n")[0] or "# Handbook" in a]
    overlapping = 0
    for a, b in same_section:
        last = re.findall(r"Sentence (\d+) explains", a)[-1]
        if f"Sentence {last} explains" in b:
            overlapping += 1
    assert overlapping >= 1
    # A chunk never spans two sections' sentences (sections are the boundaries).
    for chunk in chunks:
        sections = set(re.findall(r"of section (\d+)", chunk))
        assert len(sections) == 1, chunk


def test_small_sections_share_a_chunk() -> None:
    text = "# Policy\n\n" + "\n\n".join(
        f"## Part {i}\n\nShort rule {i} applies to every order." for i in range(6)
    ) + "\n\n" + " ".join(["filler"] * 200)
    chunks = chunk_text(text, ChunkPolicy(max_words=60, overlap_words=10))
    assert "## Part 0" in chunks[0] and "## Part 1" in chunks[0]


def test_run_on_text_is_cut_by_words() -> None:
    text = " ".join(f"w{i}" for i in range(1000))  # no sentence ends at all
    chunks = chunk_text(text, ChunkPolicy(max_words=100, overlap_words=10))
    assert all(len(c.split()) <= 100 for c in chunks)
    assert chunks[0].split()[0] == "w0" and chunks[-1].split()[-1] == "w999"


def test_chunk_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        ChunkPolicy(max_words=10)
    with pytest.raises(ValueError):
        ChunkPolicy(max_words=100, overlap_words=60)


def test_chunk_size_follows_the_model() -> None:
    text = _document(sections=1, paragraphs=8, sentences=8)
    local = chunk_document(text, Settings(fleet_embeddings="local"))
    openai = chunk_document(text, Settings(fleet_embeddings="openai"))
    # MiniLM reads 256 word pieces: its chunks must stay well under that.
    assert max(len(c.split()) for c in local) <= LOCAL.chunking.max_words < 200
    assert len(openai) < len(local)
    assert model_spec(Settings()).dimensions == 384
    assert model_spec(Settings(fleet_embeddings="openai")) == OPENAI


# --- the local model -------------------------------------------------------------------------


def test_local_embeddings_unit_vectors_batched_and_deterministic() -> None:
    texts = ["the refund hasn't arrived", "my package is late", "how do I reset my password"]
    vectors = embed_texts(texts)
    assert isinstance(vectors, list) and len(vectors) == 3
    assert all(isinstance(v, list) and len(v) == 384 for v in vectors)
    assert all(isinstance(x, float) for x in vectors[0])
    array = np.asarray(vectors)
    assert np.allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-4)
    # Batch size changes the number of forward passes, not the vectors.
    one_by_one = embed_array(texts, Settings(fleet_embedding_batch_size=1))
    assert np.allclose(one_by_one, array, atol=1e-5)
    # Meaning, not words: the money-back question is nearest the refund sentence.
    query = np.asarray(embed_texts(["I never got my money back"])[0])
    assert int(np.argmax(array @ query)) == 0


def test_queries_take_the_traced_path_and_get_the_same_vectors() -> None:
    """Queries (one text, or the few the query batcher groups) run through the traced forward
    pass once a server asked for it (``prepare_for_queries``); they must get what the
    sentence-transformers pipeline gives, padding and truncation included: store and search
    share one model (AGENTS.md), so a query vector that drifted would rank the library wrongly.
    """
    from fleet.embeddings import prepare_for_queries
    from fleet.embeddings.backends import MAX_TRACED_BATCH, local_embedder

    prepare_for_queries(Settings(fleet_embeddings="local"))
    embedder = local_embedder()
    assert embedder._queries is not None, "the query encoder was not traced"
    texts = ["where is my refund", "Order #4429 never arrived and nobody answers " * 40,
             "my card was charged twice for one order and I want the second charge back", "hi"]
    expected = embedder._encode(texts, 32)  # sentence-transformers' own pipeline
    singles = np.vstack([embed_array([text]) for text in texts])
    batch = embed_array(texts)  # padded to the longest (truncated) text, attention-masked
    assert np.abs(singles - expected).max() < 1e-5
    assert np.abs(batch - expected).max() < 1e-5
    # Past the query batcher's size, encode is used as before.
    many = [f"question number {i} about order #{4400 + i}" for i in range(MAX_TRACED_BATCH + 1)]
    assert np.abs(embed_array(many) - embedder._encode(many, 32)).max() < 1e-5


def test_embed_texts_refuses_bad_input() -> None:
    with pytest.raises(InvalidInput, match="text #1 to embed is empty"):
        embed_texts(["fine", "  "])
    with pytest.raises(InvalidInput, match="text #0 to embed is of type int, not a string"):
        embed_texts([1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        embed_texts("a string, not a list")  # type: ignore[arg-type]
    assert embed_texts([]) == []


def test_local_model_loads_with_the_network_blocked() -> None:
    """A fresh process with every socket connection refused and no HF_* variables set: the model
    still loads (from the package's files) and embeds; the process ends up offline-flagged."""
    script = """
import os, socket
for k in [k for k in os.environ if k.startswith(("HF_", "TRANSFORMERS_"))]:
    del os.environ[k]
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
from fleet.embeddings import embed_texts
from fleet.embeddings.backends import local_embedder
v = embed_texts(["refund delayed two weeks", "my parcel is late"])
assert local_embedder() is local_embedder()
print(len(v), len(v[0]), os.environ["HF_HUB_OFFLINE"])
"""
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("HF_", "TRANSFORMERS_", "FLEET_"))}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "384", "1"]


# --- the OpenAI backend, against a local OpenAI-compatible server -------------------------------


class _FakeOpenAI(BaseHTTPRequestHandler):
    batches: list[int] = []  # noqa: RUF012 - shared by design: the test reads what was asked

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/embeddings" and body["model"] == "text-embedding-3-small"
        assert self.headers["Authorization"] == "Bearer sk-test"
        texts = body["input"]
        type(self).batches.append(len(texts))
        data = []
        for index, text in enumerate(texts):
            rng = np.random.default_rng(sum(map(ord, text)))
            vector = rng.standard_normal(1536).astype(np.float32)
            vector /= np.linalg.norm(vector)
            encoded: object = (base64.b64encode(vector.tobytes()).decode()
                               if body.get("encoding_format") == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        data.reverse()  # the API does not promise order: the client must sort by index
        payload = json.dumps({"object": "list", "data": data, "model": body["model"],
                              "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def fake_openai() -> Iterator[str]:
    _FakeOpenAI.batches = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_batches_and_keeps_order(fake_openai: str) -> None:
    settings = Settings(fleet_embeddings="openai", openai_api_key=SecretStr("sk-test"),
                        openai_base_url=fake_openai, fleet_embedding_batch_size=4)
    texts = [f"text number {i}" for i in range(10)]
    vectors = embed_array(texts, settings)
    assert vectors.shape == (10, 1536)
    assert _FakeOpenAI.batches == [4, 4, 2]
    single = embed_array([texts[7]], settings)
    assert np.allclose(single[0], vectors[7])  # the reversed response was put back in order


def test_openai_backend_needs_a_key() -> None:
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        embed_texts(["x"], Settings(fleet_embeddings="openai", openai_api_key=None))


async def test_concurrent_queries_share_forward_passes_and_keep_their_vectors(monkeypatch):
    """Searches that arrive together are embedded together (fewer forward passes than
    queries), each gets its own text's vector, and a lone query goes through at once."""
    import fleet.embeddings as embeddings

    texts = [f"order #{4400 + i} has not arrived and I want my money back" for i in range(12)]
    alone = [embed_array([text])[0] for text in texts]
    passes: list[int] = []
    real = embeddings.aembed

    async def counted(batch, settings=None):
        passes.append(len(batch))
        return await real(batch, settings)

    monkeypatch.setattr(embeddings, "aembed", counted)
    together = await asyncio.gather(*(embeddings.aembed_query(text) for text in texts))
    assert sum(passes) == len(texts) and len(passes) < len(texts), passes
    assert np.abs(np.vstack(together) - np.vstack(alone)).max() < 1e-5
    passes.clear()
    await embeddings.aembed_query("where is my parcel")
    assert passes == [1]
    with pytest.raises(InvalidInput):
        await embeddings.aembed_query("   ")
