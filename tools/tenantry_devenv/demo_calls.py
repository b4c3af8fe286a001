"""The tenant apps' half of `make demo`: what a tenant sees of the runtime.

Each sample tenant's key is read from its Secret (as its app would get it), the official
`anthropic` SDK calls the runtime (non-streaming and streaming), a document is ingested and a
question about it answered with the document in the model's context, a spent budget answers
429, and GET /v1/usage shows requests, tokens and cost.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anthropic
import httpx
import redis as redis_client
from tenantry_runtime.api_keys import prefix_of
from tenantry_runtime.contracts.redis_keys import TenantKeys

from .controlplane import ControlPlane

KEYS_SECRET = "tenantry-api-keys"  # noqa: S105 - the Secret's name (operator's api_keys.py)
MAX_TOKENS = 200
DOCUMENT_TAG = re.compile(r'<document id="([0-9a-f-]{36})">[^\n]*')

# One document per tenant, and a question only that document answers.
DOCUMENTS = {
    "acme": ("Acme refund policy",
             "Acme refunds any order within 45 days of delivery. Refunds go back to the card "
             "that paid, within five working days. Opened software is exchanged, not refunded."),
    "globex": ("Globex on-call rota",
               "Globex's database on-call rotates every Monday at 09:00 UTC. This week the "
               "primary is Hank Scorpio and the secondary is Frank Grimes; page through "
               "the #ops-pager channel."),
}
QUESTIONS = {
    "acme": "How many days after delivery can a customer ask for a refund?",
    "globex": "Who is the primary database on-call this week?",
}

T = TypeVar("T")


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the demo's output is for people


@dataclass(frozen=True)
class Upstream:
    """What answers the runtime's calls: Anthropic, or the local stub (which records them)."""

    url: str
    api_key: str
    recorded: Path | None  # the stub's JSON lines of received requests; None for Anthropic

    @property
    def is_stub(self) -> bool:
        return self.recorded is not None

    def last_system_prompt(self) -> str:
        """The system prompt of the last Messages request that reached the stub."""
        assert self.recorded is not None
        lines = [json.loads(line) for line in self.recorded.read_text().splitlines() if line]
        bodies = [r["body"] for r in lines if r["path"] == "/v1/messages"]
        system = bodies[-1].get("system", "") if bodies else ""
        if isinstance(system, list):
            return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
        return str(system)


@dataclass
class TenantApp:
    """One tenant's app: its key, the SDK client on the runtime, what it has done."""

    name: str
    key: str
    runtime_url: str
    model: str = ""
    answered: int = 0  # messages answered (each one a usage row)

    @cached_property
    def client(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.runtime_url, api_key=self.key, max_retries=2)

    def http(self) -> httpx.Client:
        """For the runtime's routes beyond the Messages API (documents, usage)."""
        return httpx.Client(base_url=self.runtime_url, headers={"x-api-key": self.key},
                            timeout=60)


def poll(what: str, attempt: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = attempt()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


class Cluster(Protocol):
    """What the calls need of a cluster: kubectl (the local ControlPlane, or kind's)."""

    def kubectl(self, *args: str, input_text: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]: ...


def key_name(plane: Cluster, tenant: str) -> str:
    """The first of the Tenant's spec.apiKeys (examples/tenants.yaml declares them)."""
    names = plane.kubectl("get", "tnt", tenant, "-o", "jsonpath={.spec.apiKeys[*].name}").stdout
    if not names.split():
        raise RuntimeError(f"Tenant {tenant} declares no spec.apiKeys")
    return names.split()[0]


def read_key(plane: Cluster, tenant: str, name: str) -> str:
    """The tenant's plaintext key from the Secret the operator wrote, as its app reads it."""
    found = plane.kubectl("get", "secret", KEYS_SECRET, "-n", f"tenant-{tenant}", "-o",
                          f"jsonpath={{.data.{name}}}", check=False)
    if found.returncode != 0 or not found.stdout:
        raise RuntimeError(f"no key {name!r} in Secret tenant-{tenant}/{KEYS_SECRET}:"
                           f" {found.stderr.strip()}")
    return base64.b64decode(found.stdout).decode()


def shown(key: str) -> str:
    """The key's lookup prefix only: a demo's terminal is no place for a secret."""
    return f"sk-tnt-{prefix_of(key)}-…"


def connect(plane: Cluster, tenant: str, runtime_url: str) -> TenantApp:
    name = key_name(plane, tenant)
    app = TenantApp(tenant, read_key(plane, tenant, name), runtime_url)
    say(f"key {shown(app.key)} read with kubectl from Secret tenant-{tenant}/{KEYS_SECRET}"
        f" (entry {name!r}, spec.apiKeys of the Tenant)")

    def model() -> str | None:  # None until the runtime's watch has delivered the key
        try:
            return app.client.with_options(max_retries=0).models.list().data[0].id
        except anthropic.AuthenticationError:
            return None

    app.model = poll(f"the runtime to accept {tenant}'s key", model, 60)
    say(f"the runtime knows the key; {tenant}'s model (GET /v1/models): {app.model}")
    return app


def chat(app: TenantApp) -> None:
    """One answer non-streaming, one streaming, with the SDK as any tenant app uses it."""
    question = f"Hello from {app.name}. Say hi in five words."
    message = app.client.messages.create(
        model=app.model, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": question}])
    app.answered += 1
    say(f"{app.name}: messages.create -> {text_of(message)!r}"
        f" ({message.usage.input_tokens} in / {message.usage.output_tokens} out tokens,"
        f" request-id {message._request_id})")
    pieces: list[str] = []
    with app.client.messages.stream(
            model=app.model, max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": "Now the same, streamed."}]) as stream:
        pieces.extend(stream.text_stream)
        final = stream.get_final_message()
    app.answered += 1
    say(f"{app.name}: messages.stream -> {len(pieces)} text deltas: {''.join(pieces)!r}"
        f" ({final.usage.input_tokens} in / {final.usage.output_tokens} out tokens)")


def text_of(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def ingest(app: TenantApp) -> str:
    title, text = DOCUMENTS[app.name]
    with app.http() as http:
        answer = http.post("/v1/documents", json={"title": title, "text": text,
                                                  "metadata": {"source": "make demo"}})
    if answer.status_code != 201:
        raise RuntimeError(f"POST /v1/documents for {app.name}: {answer.status_code}"
                           f" {answer.text}")
    document = answer.json()
    say(f"{app.name}: POST /v1/documents -> id {document['id']} ({title!r},"
        f" {document['chunks']} chunk(s), embedded in-process with all-MiniLM-L6-v2)")
    return str(document["id"])


def ask_about(app: TenantApp, document_id: str, upstream: Upstream) -> None:
    """A question about the document: the runtime adds it to the model's context."""
    question = QUESTIONS[app.name]
    message = app.client.messages.create(
        model=app.model, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": question}])
    app.answered += 1
    answer = text_of(message)
    say(f"{app.name}: asks {question!r}\n{app.name}: answer: {answer!r}")
    if upstream.is_stub:
        tags = list(DOCUMENT_TAG.finditer(upstream.last_system_prompt()))
        if document_id not in [m.group(1) for m in tags]:
            raise RuntimeError(f"document {document_id} is not in the context the stub"
                               f" received (found {[m.group(0) for m in tags]})")
        say(f"{app.name}: the context that reached the model (the stub's recorded request)"
            f" cites document {document_id}:")
        for tag in tags:
            say(f"    system prompt: {tag.group(0)} ...")
    elif document_id in answer:
        say(f"{app.name}: the answer cites document {document_id}")
    else:
        say(f"{app.name}: the model did not quote the id {document_id} this time (the runtime"
            " put the document into its context and asked it to cite the id)")


def spend_budget(plane: ControlPlane, redis_url: str, app: TenantApp, budget: int) -> None:
    """Lower the tenant's daily budget (a kubectl patch, as in GitOps) until a call gets 429."""
    patch = {"spec": {"ai": {"budgets": {"dailyTokens": budget}}}}
    say(f"\n==> budgets: kubectl patch tnt {app.name} dailyTokens={budget}"
        f" (a request reserves its input estimate + max_tokens={MAX_TOKENS})")
    plane.kubectl("patch", "tnt", app.name, "--type", "merge", "-p", json.dumps(patch))
    limits = redis_client.Redis.from_url(redis_url, decode_responses=True)
    limits_key = TenantKeys(app.name).limits
    poll("the operator to write the new budget to Redis", lambda: (
        True if limits.hget(limits_key, "daily_tokens") == str(budget) else None), 60)
    say(f"the operator wrote it to Redis ({limits_key} daily_tokens={budget})")
    try:
        app.client.with_options(max_retries=0).messages.create(
            model=app.model, max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": "One more, please."}])
    except anthropic.RateLimitError as refused:
        kind, message = error_of(refused)
        headers = refused.response.headers
        say(f"{app.name}: messages.create -> {refused.status_code} {kind}: {message}"
            f" (retry-after {headers.get('retry-after')}s,"
            f" x-should-retry {headers.get('x-should-retry')})")
        return
    raise RuntimeError(f"{app.name}'s call was admitted over a daily budget of {budget}")


def error_of(error: anthropic.APIStatusError) -> tuple[str, str]:
    """(type, message) from Anthropic's error body."""
    body = error.body if isinstance(error.body, dict) else {}
    detail = body.get("error")
    if not isinstance(detail, dict):
        detail = body
    return str(detail.get("type", "")), str(detail.get("message", error.message))


def usage_rows(app: TenantApp) -> list[dict[str, Any]] | None:
    """GET /v1/usage once every answered request's row is there (the writer flushes ~1 s)."""
    with app.http() as http:
        answer = http.get("/v1/usage")
    if answer.status_code != 200:
        return None
    rows: list[dict[str, Any]] = answer.json()["data"]
    return rows if sum(r["requests"] for r in rows) >= app.answered else None


def show_usage(app: TenantApp) -> None:
    rows = poll(f"{app.name}'s usage rows", lambda: usage_rows(app), 60)
    total = sum((Decimal(r["cost"]) for r in rows if r["cost"] is not None), Decimal(0))
    currency = next((r["currency"] for r in rows if r["currency"]), "")
    for r in rows:
        say(f"  {app.name:<8} {r['date']}  {r['model']:<18} {r['requests']:>3} requests"
            f"  {r['input_tokens']:>6} in  {r['output_tokens']:>6} out  cost {r['cost']}"
            f" {r['currency']}")
    say(f"  {app.name:<8} total cost {total} {currency}")


class TourFailed(RuntimeError):
    """A step of the tour went wrong; the message says which and what the runtime answered."""


def tour(plane: ControlPlane, redis_url: str, runtime_url: str, upstream: Upstream,
         tenants: tuple[str, ...]) -> None:
    try:
        calls(plane, redis_url, runtime_url, upstream, tenants)
    except anthropic.APIStatusError as error:
        kind, message = error_of(error)
        raise TourFailed(f"the runtime answered {error.status_code} {kind}: {message}") from None
    except (anthropic.APIError, httpx.HTTPError, RuntimeError, TimeoutError) as error:
        raise TourFailed(f"{type(error).__name__}: {error}") from None


def calls(plane: ControlPlane, redis_url: str, runtime_url: str, upstream: Upstream,
          tenants: tuple[str, ...]) -> None:
    """Everything a tenant app does, for each sample tenant, then budgets and usage."""
    apps = []
    for tenant in tenants:
        say(f"\n==> {tenant}: a tenant app with the official anthropic SDK,"
            f" Anthropic(base_url={runtime_url}, api_key=<{tenant}'s key>)")
        app = connect(plane, tenant, runtime_url)
        apps.append(app)
        chat(app)
        document_id = ingest(app)
        ask_about(app, document_id, upstream)
    spend_budget(plane, redis_url, apps[0], budget=100)
    say("\n==> usage and cost per tenant (GET /v1/usage, from ai_usage_logs)")
    for app in apps:
        show_usage(app)
